"""Tests for fashionchameleon.media: image loading/normalisation and H.264 output."""

from __future__ import annotations

import inspect
import io
import json
import math
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from fashionchameleon import media
from fashionchameleon.errors import UserInputError
from helpers import GARMENTS, REFERENCE, ROOT, probe_video

W, H = 64, 96  # small even frame size used for the video tests


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` but carries no pixel data (nothing is allocated)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _frames(n: int, width: int = W, height: int = H, seed: int = 0) -> np.ndarray:
    """Smooth moving gradients (compress like real video, unlike noise)."""
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        out[i, ..., 0] = (xx * 255 // max(width - 1, 1) + 5 * i + seed) % 256
        out[i, ..., 1] = yy * 255 // max(height - 1, 1)
        out[i, ..., 2] = 128
    return out


# --- load_image: modes ----------------------------------------------------------------------


def test_rgba_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    im.putpixel((1, 0), (0, 0, 255, 128))  # half transparent blue -> light blue
    path = tmp_path / "rgba.png"
    im.save(path)
    out = media.load_image(path)
    assert out.mode == "RGB" and out.size == (40, 40)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    r, g, b = out.getpixel((1, 0))
    assert 120 <= r <= 135 and 120 <= g <= 135 and b == 255
    assert out.getpixel((5, 5)) == (255, 0, 0)


def test_la_and_palette_transparency_become_white():
    la = Image.new("LA", (40, 40), (10, 0))
    assert media.load_image(_png_bytes(la)).getpixel((3, 3)) == (255, 255, 255)

    p = Image.new("P", (40, 40), 1)
    p.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    p.info["transparency"] = 1
    buf = io.BytesIO()
    p.save(buf, format="PNG", transparency=1)
    assert media.load_image(buf.getvalue()).getpixel((3, 3)) == (255, 255, 255)


def test_grayscale_palette_cmyk_to_rgb(tmp_path):
    gray = media.load_image(_png_bytes(Image.new("L", (40, 40), 77)))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)

    p = Image.new("P", (40, 40), 2)
    p.putpalette([0, 0, 0, 0, 0, 0, 10, 20, 30] + [0] * 759)
    assert media.load_image(_png_bytes(p)).getpixel((0, 0)) == (10, 20, 30)

    path = tmp_path / "cmyk.tif"
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    assert media.load_image(path).getpixel((0, 0)) == (255, 0, 0)


def test_16_bit_grayscale_is_scaled_not_clipped():
    arr = np.full((40, 40), 65535, np.uint16)
    arr[:, 20:] = 32896  # 128 * 257
    im = Image.fromarray(arr)  # mode I;16
    assert im.mode.startswith("I")
    out = media.load_image(_png_bytes(im))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((30, 0)) == (128, 128, 128)


def _float64_to_l8(im: Image.Image) -> np.ndarray:
    """How load_image scaled 16-bit, integer and float pixels before it went strip by strip: one float64 pass over the
    whole image. The values it must keep, and the memory it must not take."""
    arr = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    top = 65535.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 255.0
    return np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)


def _wide_images() -> dict[str, Image.Image]:
    """Every 16-bit value, and integer and float images whose scale is decided by one value in the last rows."""
    rng = np.random.default_rng(0)
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    low = (np.arange(256 * 40, dtype=np.int32).reshape(256, 40) % 300) - 20  # -20..279: over 255 in every row
    low = np.clip(low, -20, 255)
    low_then_high = low.copy()
    low_then_high[-1, -1] = 300  # one value over 255 in the last strip: the whole image is scaled from 0-65535
    unit = rng.random((256, 40), dtype=np.float32)
    unit[:, 0] = np.arange(256) / 510  # exact halves of a level: ties round to even
    unit_then_big = unit.copy()
    unit_then_big[-1, -1] = 1.5  # one value over 1: the whole image is taken as 0-255
    return {
        "I;16": Image.fromarray(every),
        "I;16B": Image.frombytes("I;16B", (256, 256), every.astype(">u2").tobytes()),
        "I 0-255": Image.fromarray(low),
        "I one high": Image.fromarray(low_then_high),
        "I every 16-bit": Image.fromarray(every.astype(np.int32)),
        "I wide": Image.fromarray(rng.integers(-100_000, 100_000, (256, 40), dtype=np.int32)),
        "F 0-1": Image.fromarray(unit),
        "F one high": Image.fromarray(unit_then_big),
        "F wide": Image.fromarray(rng.uniform(-10, 300, (256, 40)).astype(np.float32)),
    }


def test_16_bit_integer_and_float_pixels_keep_their_values_strip_by_strip(monkeypatch):
    images = _wide_images()
    assert {im.mode for im in images.values()} == {"I;16", "I;16B", "I", "F"}
    monkeypatch.setattr(media, "SCALE_STRIP_PIXELS", 4 * 256)  # strips of 4 rows (16 of the 40-wide images')
    for name, im in images.items():
        rgb = np.asarray(media.load_image(im))
        expected = _float64_to_l8(im)
        assert np.array_equal(rgb, np.repeat(expected[..., None], 3, axis=2)), name
    # The cases that test the whole-image scale: a strip alone would have been scaled otherwise.
    assert np.asarray(images["I one high"])[:-1].max() <= 255 and np.asarray(images["F one high"])[:-1].max() <= 1


#: A 16-bit greyscale PNG just under the pixel limit: the issue's case (a 77 KB file that cost ~0.9 GB to convert).
NEAR_LIMIT_SIDE = math.isqrt(media.MAX_IMAGE_PIXELS)
#: Peak memory growth allowed per pixel of it: load_image holds the 16-bit pixels (2 bytes), their 8-bit version (1)
#: and the RGB result (4: PIL pads RGB); measured 6.9 bytes, against 25 for one float64 pass. probe_image holds only the
#: 16-bit pixels: measured 1.9 bytes.
LOAD_BYTES_PER_PIXEL, PROBE_BYTES_PER_PIXEL = 8, 3
MEMORY_PROBE = """
import json, sys
import numpy as np
from PIL import Image
from fashionchameleon import media

FLOAT64_TO_L8


def float64(path):  # load_image before it went strip by strip: the negative control
    with Image.open(path) as im:
        return Image.fromarray(_float64_to_l8(im)).convert("RGB")


def peak_kb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))


decode = {"load": media.load_image, "probe": media.probe_image, "float64": float64}[sys.argv[2]]
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := the current resident size
before = peak_kb()
decode(sys.argv[1])
print(json.dumps((peak_kb() - before) * 1024))
"""


@pytest.fixture(scope="module")
def near_limit_png(tmp_path_factory) -> Path:
    side = NEAR_LIMIT_SIDE
    ramp = (np.arange(side, dtype=np.uint32) * 65535 // (side - 1)).astype(np.uint16)
    path = tmp_path_factory.mktemp("near-limit") / "ramp16.png"
    Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()).save(path)  # I;16, ~90 KB
    return path


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory")
def test_near_limit_16_bit_png_decodes_within_a_memory_bound(near_limit_png):
    """Peak resident memory of decoding in a fresh process (VmHWM, reset through clear_refs)."""
    def growth(mode: str) -> float:
        script = MEMORY_PROBE.replace("FLOAT64_TO_L8", inspect.getsource(_float64_to_l8))  # not importing this module
        out = subprocess.run([sys.executable, "-c", script, str(near_limit_png), mode], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    pixels = NEAR_LIMIT_SIDE**2
    assert media.MAX_IMAGE_PIXELS - pixels < 20_000 and near_limit_png.stat().st_size < 200_000
    assert growth("load") < LOAD_BYTES_PER_PIXEL * pixels
    assert growth("probe") < PROBE_BYTES_PER_PIXEL * pixels
    assert growth("float64") > 3 * LOAD_BYTES_PER_PIXEL * pixels  # negative control: the conversion as it was


def test_probe_refuses_what_load_refuses_and_keeps_no_pixels(tmp_path):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    cases = {
        "jpeg": jpeg,
        "truncated jpeg": jpeg[: len(jpeg) * 2 // 3],
        "cut in the header": jpeg[:300],
        "text": b"not an image",
        "bomb": _png_header_only(10000, 10000),
        "16-bit": _png_bytes(Image.fromarray(np.full((40, 40), 4000, np.uint16))),
        "rgba": _png_bytes(Image.new("RGBA", (40, 40), (1, 2, 3, 4))),
    }

    def outcome(function, data):
        try:
            return function(data)
        except UserInputError as error:
            return str(error)

    for name, data in cases.items():
        loaded, probed = outcome(media.load_image, data), outcome(media.probe_image, data)
        assert isinstance(loaded, str) == isinstance(probed, str), name
        if isinstance(loaded, str):
            assert loaded == probed, name
    assert outcome(media.probe_image, cases["16-bit"]) == ("I;16", False)
    assert outcome(media.probe_image, cases["rgba"]) == ("RGBA", True)
    assert isinstance(outcome(media.probe_image, cases["truncated jpeg"]), str)  # decoded to the last byte


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (60, 40), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    assert media.load_image(buf.getvalue()).size == (40, 60)


def test_numpy_and_pil_inputs():
    rgb = np.zeros((48, 40, 3), np.uint8)
    rgb[..., 1] = 200
    out = media.load_image(rgb)
    assert out.size == (40, 48) and out.getpixel((0, 0)) == (0, 200, 0)

    rgba = np.zeros((48, 40, 4), np.uint8)  # all transparent
    assert media.load_image(rgba).getpixel((0, 0)) == (255, 255, 255)

    assert media.load_image(Image.new("L", (40, 40), 9)).getpixel((0, 0)) == (9, 9, 9)

    with pytest.raises(UserInputError, match="dtype"):
        media.load_image(rgb.astype(np.float32))


# --- load_image: errors ---------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="does not exist") as info:
        media.load_image(tmp_path / "nope.png")
    assert "nope.png" in str(info.value)


def test_directory(tmp_path):
    with pytest.raises(UserInputError, match="directory"):
        media.load_image(tmp_path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(UserInputError, match="not a readable image") as info:
        media.load_image(path)
    assert "notes.png" in str(info.value)


def test_truncated_png(tmp_path):
    data = _png_bytes(Image.fromarray(_frames(1, 200, 200)[0]))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match="truncated") as info:
        media.load_image(path)
    assert "cut.png" in str(info.value)


@pytest.mark.parametrize(
    "size",
    [
        (8000, 6000),  # 48 MP: over our limit, under PIL's warning threshold
        (10000, 10000),  # 100 MP: PIL only warns; the warning must become an error
        (100000, 100000),  # 10 GP: PIL's DecompressionBombError
    ],
)
def test_decompression_bomb(tmp_path, size):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(*size))
    pil_limit = Image.MAX_IMAGE_PIXELS
    filters = list(warnings.filters)
    with pytest.raises(UserInputError, match="too large") as info:
        media.load_image(path)
    assert "bomb.png" in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # global PIL state untouched
    assert warnings.filters == filters


def test_too_small_image():
    with pytest.raises(UserInputError, match="too small"):
        media.load_image(_png_bytes(Image.new("RGB", (100, media.MIN_IMAGE_SIDE - 1))))
    with pytest.raises(UserInputError, match="too small"):
        media.load_image(np.zeros((10, 100, 3), np.uint8))


def test_custom_name_in_message():
    with pytest.raises(UserInputError, match="The garment image"):
        media.load_image(b"garbage", name="the garment image")


# --- resizing and tensors -------------------------------------------------------------------


def test_fit_reference_covers_and_crops():
    im = Image.new("RGB", (300, 100), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 50, 100))  # red strip at the left edge gets cropped away
    out = media.fit_reference(im, W, H)
    assert out.size == (W, H)
    arr = np.asarray(out)
    assert (arr[..., 2] > 250).all() and (arr[..., 0] < 5).all()


def test_letterbox_pads_white_and_keeps_whole_garment():
    im = Image.new("RGB", (200, 100), (200, 0, 0))  # wide garment into a tall canvas
    out = media.letterbox_garment(im, W, H)
    assert out.size == (W, H)
    arr = np.asarray(out).astype(int)
    # Content is scaled to 64x32 and centred vertically: rows 32..63.
    assert (arr[:30] == 255).all() and (arr[66:] == 255).all()
    middle = arr[34:62]
    assert (abs(middle - [200, 0, 0]) <= 2).all()  # left and right edges of the garment kept
    # A tall garment is padded left/right instead.
    tall = media.letterbox_garment(Image.new("RGB", (50, 300), (0, 0, 0)), W, H)
    t = np.asarray(tall)
    assert (t[:, :20] == 255).all() and (t[:, -20:] == 255).all() and (t[:, 30:34] == 0).all()


def test_image_to_tensor_and_back_is_lossless():
    frame = _frames(1)[0]
    frame[0, 0] = (0, 255, 0)
    x = media.image_to_tensor(Image.fromarray(frame))
    assert x.shape == (3, H, W) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    video = x[:, None].repeat(1, 3, 1, 1)  # [3, F, H, W]
    frames = media.tensor_to_frames(video)
    assert frames.shape == (3, H, W, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames[2], frame)
    assert np.array_equal(media.tensor_to_frames(video[None]), frames)
    assert np.array_equal(np.asarray(media.frame_to_image(frames[0])), frame)


def test_tensor_to_frames_clamps_and_rounds():
    v = torch.tensor([-3.0, -1.0, 0.0, 0.999, 5.0]).view(1, 1, 1, 5).expand(3, 1, 1, 5)
    out = media.tensor_to_frames(v.to(torch.bfloat16))
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(ValueError):
        media.tensor_to_frames(torch.zeros(3, H, W))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_on_the_device_equals_the_host_frames(device):
    video = torch.rand(3, 4, H, W, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2  # overshoots too
    video[0, 0, 0, 0] = float("nan")
    frames = media.quantize(video.to(device))
    assert frames.device.type == device and frames.dtype == torch.uint8 and frames.shape == (4, H, W, 3)
    assert np.array_equal(frames.cpu().numpy(), media.tensor_to_frames(video))


@pytest.mark.parametrize("device", DEVICES)
def test_frame_to_tensor_on_the_device_equals_the_image_path(device):
    """What reference KV disentangle does with the last frame, without the host: the same tensor as the frame
    taken through PIL and `image_to_tensor`, for every uint8 level."""
    frame = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    frame.reshape(-1)[:256] = np.arange(256)  # every level at least once
    pixels = media.frame_to_tensor(torch.from_numpy(frame).to(device))
    assert pixels.device.type == device
    expected = media.image_to_tensor(media.frame_to_image(frame))
    assert pixels.dtype == expected.dtype and torch.equal(pixels.cpu(), expected)
    assert pixels.stride() == expected.stride()  # the same layout, so the VAE runs the same kernels on it
    # Negative control: dividing through the reciprocal (what CUDA does for a scalar divisor) is not equal.
    reciprocal = torch.from_numpy(frame).permute(2, 0, 1).float().mul(1 / 127.5).sub(1.0)
    assert not torch.equal(reciprocal, expected)


# --- video ----------------------------------------------------------------------------------


def _decode_rgb(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24", threads=1) for f in c.decode(video=0)])  # fork-safe on av 19


def test_video_writer_incremental(tmp_path):
    path = tmp_path / "out.mp4"
    frames = _frames(33)
    with media.VideoWriter(path, fps=24) as writer:
        for start, stop in ((0, 9), (9, 21), (21, 33)):
            writer.write(frames[start:stop])
        assert writer.frames_written == 33
    info = probe_video(path)
    assert (info.codec, info.frames, info.width, info.height) == ("h264", 33, W, H)
    assert info.fps == pytest.approx(24.0) and info.pix_fmt == media.PIX_FMT
    decoded = _decode_rgb(path)
    assert np.abs(decoded.astype(int) - frames).mean() < 6  # lossy, but the same pictures


def test_video_writer_rejects_odd_and_mismatched_sizes(tmp_path):
    with media.VideoWriter(tmp_path / "odd.mp4", fps=24) as writer:
        with pytest.raises(ValueError, match="even"):
            writer.write(np.zeros((2, 95, 64, 3), np.uint8))
        writer.write(np.zeros((2, H, W, 3), np.uint8))
        with pytest.raises(ValueError, match="differs"):
            writer.write(np.zeros((2, H + 2, W, 3), np.uint8))
    unused = media.VideoWriter(tmp_path / "unused.mp4", fps=24)
    unused.close()
    assert not (tmp_path / "unused.mp4").exists()


def test_encode_strip_holds_every_frame_top_to_bottom():
    frames = _frames(3, seed=40)
    png = Image.open(io.BytesIO(media.encode_strip(frames)))
    assert (png.format, png.size) == ("PNG", (W, 3 * H))
    assert np.array_equal(np.asarray(png).reshape(3, H, W, 3), frames)  # exact: small frames are drawn pixel by pixel
    jpeg = Image.open(io.BytesIO(media.encode_strip(frames, "jpeg")))
    assert (jpeg.format, jpeg.size) == ("JPEG", (W, 3 * H))
    assert np.abs(np.asarray(jpeg).reshape(3, H, W, 3).astype(int) - frames).mean() < 12
    with pytest.raises(ValueError, match="strip format"):
        media.encode_strip(frames, "gif")


# --- shipped example inputs -----------------------------------------------------------------


def test_shipped_examples_load_with_intended_shapes():
    ref = media.load_image(REFERENCE)
    assert ref.height > ref.width  # portrait person
    for path in GARMENTS:
        garment = np.asarray(media.load_image(path))
        assert (garment[:4] == 255).all() and (garment[:, :4] == 255).all()  # laid flat on white
        assert (garment != 255).any(axis=2).mean() > 0.1  # and there is a garment on it
        assert Path(path).stat().st_size < 64_000
