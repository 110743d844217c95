"""Image input and video output for the generator.

Inputs (a person photo and a garment photo) arrive as paths, bytes, PIL images or the numpy
arrays gradio gives; everything becomes an 8-bit RGB PIL image with bad files turned into one
readable :class:`UserInputError`. Outputs are H.264 yuv420p mp4 files written as the frames come
(:class:`VideoWriter`), and per chunk one image of its frames stacked top to bottom
(:func:`encode_strip`), which the app's page draws frame by frame as it arrives.

H.264 backend: PyAV's bundled libx264 (the av 18 wheels ship it; ``"libx264" in
av.codecs_available``). It encodes in-process from numpy frames, so no subprocess per chunk,
no pipe plumbing and no dependency on an ffmpeg binary being on PATH; imageio-ffmpeg's binary
would also work but needs a process and a pipe per video.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import UserInputError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MIN_IMAGE_SIDE",
    "VIDEO_CODEC",
    "PIX_FMT",
    "CRF",
    "PRESET",
    "VideoWriter",
    "load_image",
    "probe_image",
    "fit_reference",
    "letterbox_garment",
    "blank_garment",
    "image_to_tensor",
    "frame_to_tensor",
    "quantize",
    "tensor_to_frames",
    "frame_to_image",
    "encode_strip",
    "STRIP_FORMATS",
]

# --- image limits -------------------------------------------------------------------------
#: Larger images are refused before decoding: 40 MP covers ordinary camera and phone photos
#: yet keeps a decoded RGBA copy under ~160 MB (PIL's own default limit is ~89 MP).
MAX_IMAGE_PIXELS = 40_000_000
#: Smaller images carry too little detail to condition the model (and break resizing).
MIN_IMAGE_SIDE = 32
#: 16-bit and float pixels are scaled to 8 bits this many at a time, so the arithmetic's temporaries stay a few MB
#: (the whole of a near-limit image in float64 took ~1 GB).
SCALE_STRIP_PIXELS = 1 << 20

# --- H.264 encoding settings (VideoWriter) -------------------------------------------------
VIDEO_CODEC = "libx264"
#: yuv420p is the only H.264 flavour every browser decodes; it needs even width and height.
PIX_FMT = "yuv420p"
#: x264's quality scale (lower = better, 23 = default); 20 keeps generated texture detail.
CRF = 20
#: veryfast: a 12-frame 704x1280 chunk encodes in ~0.15-0.25 s on CPU, well under its 0.5 s.
PRESET = "veryfast"
#: Tagged in the stream so players do not guess BT.601 vs BT.709 (colour shifts otherwise).
_COLORSPACE = "ITU709"
_BT709 = 1  # H.273 code for colour primaries / transfer / matrix "BT.709"
_RANGE_TV = 1  # AVCOL_RANGE_MPEG (limited range, what players expect for yuv420p)

_WHITE = (255, 255, 255)


# =============================================================================================
# Images
# =============================================================================================


def _describe(source: Any) -> str:
    """How messages call the image: the path for files, a generic noun otherwise."""
    if isinstance(source, (str, os.PathLike)):
        return f"image file '{os.fspath(source)}'"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "the uploaded image"
    if isinstance(source, np.ndarray):
        return "the image array"
    return "the image"


def _cap(label: str) -> str:
    """Capitalise the first letter only (keeps the case of file names)."""
    return label[:1].upper() + label[1:]


def _check_size(size: tuple[int, int], name: str) -> None:
    """Refuse bombs and thumbnails before any pixel is decoded."""
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise UserInputError(
            f"{_cap(name)} is too large ({width}x{height} pixels); "
            f"the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels."
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise UserInputError(
            f"{_cap(name)} is too small ({width}x{height} pixels); "
            f"each side must be at least {MIN_IMAGE_SIDE} pixels."
        )


def _open_and_load(fp: Any, name: str, *, draft: bool = False) -> Image.Image:
    """Open and fully decode, turning every PIL/OS failure into one user-facing sentence.

    ``draft`` decodes a JPEG at 1/8 scale: every byte is still read and checked, but only 1/64 of the
    pixels are kept (for checks that throw the pixels away; other formats ignore it).
    The bomb warning is made an error only inside this call (``catch_warnings`` restores the
    filters), so PIL's global ``MAX_IMAGE_PIXELS`` and other code's warning state stay as they were.
    (Before Python 3.14 the filter list is process-wide, so another thread opening a >89 MP image
    during these milliseconds would also get the error instead of PIL's warning; acceptable.)
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                _check_size(im.size, name)
                if draft:
                    im.draft(im.mode, (1, 1))
                im.load()
                ImageOps.exif_transpose(im, in_place=True)  # a copy would double a large image's memory
                return im  # loaded: its pixels outlive the file handle
    except UserInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserInputError(
            f"{_cap(name)} is too large to decode safely; "
            f"the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels."
        ) from None
    except Image.UnidentifiedImageError:
        raise UserInputError(f"{_cap(name)} is not a readable image (unknown format or corrupt data).") from None
    except PermissionError:
        raise UserInputError(f"{_cap(name)} cannot be read (permission denied).") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        # OSError covers "image file is truncated"; the others are what broken headers raise.
        raise UserInputError(f"{_cap(name)} is corrupt or truncated and cannot be decoded ({exc}).") from None


def _array_to_image(array: np.ndarray) -> Image.Image:
    """Wrap what gr.Image gives: HxWx3/HxWx4 uint8, or HxW(x1) when it was asked for greyscale."""
    if array.dtype != np.uint8:
        raise UserInputError(f"The image array has dtype {array.dtype}; expected uint8 pixel values 0-255.")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array), "L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        mode = "RGB" if array.shape[2] == 3 else "RGBA"
        return Image.fromarray(np.ascontiguousarray(array), mode)
    raise UserInputError(f"The image array has shape {array.shape}; expected HxWx3 or HxWx4.")


def _strips(im: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, pixels as numpy) for row strips of about SCALE_STRIP_PIXELS pixels each."""
    width, height = im.size
    rows = max(1, SCALE_STRIP_PIXELS // width)
    for top in range(0, height, rows):
        yield top, np.asarray(im.crop((0, top, width, min(top + rows, height))))


def _to_l8(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float greyscale -> 8-bit "L", scaled rather than clipped (convert("L") would turn
    almost every 16-bit value white): from 0-65535 for 16-bit modes; for "I" from 0-255, or 0-65535 if a value is
    above 255; for "F" from 0-1, or 0-255 if a value is above 1 (or NaN). Strip by strip, so no full-size
    temporaries; the values are those one float64 pass over the whole image gave."""
    peak = None if im.mode.startswith("I;16") else np.max([strip.max(initial=0) for _, strip in _strips(im)])
    out = np.empty((im.height, im.width), np.uint8)
    for top, strip in _strips(im):
        out[top:top + len(strip)] = _scale_to_8bit(strip, im.mode, peak)
    return Image.fromarray(out)


def _scale_to_8bit(pixels: np.ndarray, mode: str, peak: float | None) -> np.ndarray:
    """One strip of `_to_l8`; `peak` is the image's largest value (NaN if it has one), None for 16-bit modes."""
    if mode == "F":  # float64, so that rint rounds float32 values as before
        scale = 255.0 if peak <= 1.0 else 1.0
        return np.clip(np.rint(pixels.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    if mode == "I" and peak <= 255:
        return np.clip(pixels, 0, 255).astype(np.uint8)
    # (v + 128) // 257 is round(v * 255 / 65535) exactly: no integer v lies within 0.002 of a tie.
    return ((np.clip(pixels, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparent pixels become white (garment shots are on white)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        im = _to_l8(im)

    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode == "RGB":
        return im
    return im.convert("RGB")


def load_image(source: Any, *, name: str | None = None) -> Image.Image:
    """Load a person or garment photo from a path, bytes, PIL image or numpy array as RGB.

    ``name`` overrides how the image is called in error messages (e.g. "the garment image").
    Raises :class:`UserInputError` with one sentence for anything a user could have got wrong.

    Full size, though the model only needs the stream size: shrinking before the conversion changes the pixels
    the model sees. Measured on a 4800x6400 JPEG (quality 95) fitted to 704x1280: a JPEG draft decoded to at least
    the stream size moves them by up to 3 levels (mean 0.4), Image.reduce(2) by up to 2 (mean 0.2); at 64x96
    both by up to 1. `probe_image`, which keeps no pixels, is where drafts are used.
    """
    label = name or _describe(source)
    return _converted(_decode(source, label), label)


def probe_image(source: Any, *, name: str | None = None) -> tuple[str, bool]:
    """Refuse what `load_image` would refuse, keeping no pixels: for checking uploads that are decoded again
    later. Returns the image's mode and whether it has transparency data (what a note on its conversion needs).

    The file is decoded whole (a truncated one fails only there), a JPEG at 1/8 scale; the conversion is tried
    on one pixel, as whether it works depends on the mode, not on the values.
    """
    label = name or _describe(source)
    im = _decode(source, label, draft=True)
    _converted(im.crop((0, 0, 1, 1)), label)
    return im.mode, im.has_transparency_data


def _converted(im: Image.Image, label: str) -> Image.Image:
    """`_to_rgb`, with its failures as one sentence."""
    try:
        return _to_rgb(im)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{_cap(label)} (mode {im.mode}) cannot be decoded or converted to RGB ({exc}).") from None


def _decode(source: Any, label: str, *, draft: bool = False) -> Image.Image:
    """`source` as a decoded PIL image of any mode, upright (EXIF orientation applied); see `_open_and_load`."""
    if isinstance(source, Image.Image):
        _check_size(source.size, label)
        try:
            return ImageOps.exif_transpose(source)
        except (OSError, ValueError) as exc:
            raise UserInputError(f"{_cap(label)} cannot be decoded ({exc}).") from None
    if isinstance(source, np.ndarray):
        im = _array_to_image(source)
        _check_size(im.size, label)
        return im
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise UserInputError(f"{_cap(label)} is empty (0 bytes).")
        return _open_and_load(io.BytesIO(bytes(source)), label, draft=draft)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise UserInputError(f"{_cap(label)} does not exist.")
        if path.is_dir():
            raise UserInputError(f"{_cap(label)} is a directory, not an image file.")
        if path.stat().st_size == 0:
            raise UserInputError(f"{_cap(label)} is empty (0 bytes).")
        return _open_and_load(path, label, draft=draft)
    if source is None:
        raise UserInputError("No image was given.")
    raise UserInputError(f"Cannot read an image from a {type(source).__name__}; give a file path, bytes or an image.")


def _as_rgb(image: Any) -> Image.Image:
    """Let the resize helpers take anything load_image takes."""
    if isinstance(image, Image.Image) and image.mode == "RGB":
        return image
    return load_image(image)


def _check_target(width: int, height: int) -> tuple[int, int]:
    if int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    return int(width), int(height)


def fit_reference(image: Any, width: int, height: int) -> Image.Image:
    """Resize to cover ``width`` x ``height`` and centre-crop (Lanczos), as the model was trained.

    The reference frame is the first video frame, so it must fill the canvas; cropping the
    borders is the lesser evil compared with bars the model would animate.
    """
    size = _check_target(width, height)
    return ImageOps.fit(_as_rgb(image), size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def letterbox_garment(image: Any, width: int, height: int) -> Image.Image:
    """Fit the whole garment inside ``width`` x ``height``, keep its aspect, centre-pad on white.

    Cropping could cut off sleeves or a hem the model must copy; training used white padding.
    """
    size = _check_target(width, height)
    return ImageOps.pad(
        _as_rgb(image), size, method=Image.Resampling.LANCZOS, color=_WHITE, centering=(0.5, 0.5)
    )


def blank_garment(width: int, height: int) -> Image.Image:
    """The garment canvas with no garment on it: what garment guidance's unconditional branch is shown."""
    return Image.new("RGB", (width, height), (255, 255, 255))


def _unit_range(levels: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1] (the VAE's input range): the one place this arithmetic lives."""
    return levels.to(torch.float32).div_(127.5).sub_(1.0)


#: `_unit_range` of every uint8 level, computed on the CPU. Devices look values up here rather than divide: CUDA
#: divides by a scalar through its reciprocal, a bit off the CPU's division for about half the levels.
_LEVELS = _unit_range(torch.arange(256, dtype=torch.uint8))


def image_to_tensor(image: Any) -> torch.Tensor:
    """RGB image -> float32 tensor [3, H, W] in [-1, 1] (the VAE's input range)."""
    arr = np.asarray(_as_rgb(image), dtype=np.uint8)
    return _unit_range(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())


def frame_to_tensor(frame: torch.Tensor) -> torch.Tensor:
    """uint8 frame [H, W, 3] on any device -> float32 [3, H, W] in [-1, 1] on that device, without a trip through
    the host; equal to `image_to_tensor` of the same pixels."""
    if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] frame, got {frame.dtype} {tuple(frame.shape)}")
    levels = _LEVELS.to(frame.device, non_blocking=True)  # 1 KB; a constant, so an async copy is safe
    return levels[frame.long()].permute(2, 0, 1).contiguous()  # contiguous as image_to_tensor's: same conv kernels


def quantize(video: torch.Tensor) -> torch.Tensor:
    """Decoded video [3, F, H, W] or [1, 3, F, H, W] in [-1, 1] -> uint8 frames [F, H, W, 3] on the video's own
    device, so that a GPU stream quantizes without waiting and copies only bytes to the host.

    Values are clamped (the VAE overshoots slightly) and rounded, not truncated, so that
    image_to_tensor followed by this function is lossless.
    """
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(video).__name__}")
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"expected batch size 1, got shape {tuple(video.shape)}")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected [3, F, H, W] or [1, 3, F, H, W], got shape {tuple(video.shape)}")
    x = video.detach().to(torch.float32)
    x = torch.nan_to_num(x, nan=0.0).clamp_(-1.0, 1.0).add_(1.0).mul_(127.5).round_()
    return x.to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """`quantize`, as a numpy array on the host."""
    return quantize(video).cpu().numpy()


def frame_to_image(frame: np.ndarray) -> Image.Image:
    """One uint8 frame [H, W, 3] -> PIL RGB image (e.g. for a preview or a thumbnail)."""
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] frame, got {frame.dtype} {frame.shape}")
    return Image.fromarray(np.ascontiguousarray(frame), "RGB")


# =============================================================================================
# Video
# =============================================================================================


def _check_frames(frames: np.ndarray) -> np.ndarray:
    """Accept [F, H, W, 3] (or a single [H, W, 3]) uint8; refuse odd sizes yuv420p cannot hold."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if width % 2 or height % 2:
        # Padding would silently change the output size; the model only makes even sizes anyway.
        raise ValueError(
            f"H.264 {PIX_FMT} needs even width and height, got {width}x{height}; "
            "crop or pad the frames to even dimensions first"
        )
    return frames


class VideoWriter:
    """Incremental H.264 mp4 writer: call :meth:`write` once per generated chunk, then close.

    The file is opened on the first write (its size fixes the video size), so an unused writer
    leaves nothing behind. ``frames_written`` counts frames handed to the encoder.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: int,
        *,
        crf: int = CRF,
        preset: str = PRESET,
    ) -> None:
        if int(fps) <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.path = Path(path)
        self.fps = int(fps)
        self.frames_written = 0
        self._options = {"crf": str(crf), "preset": preset}
        self._container: Any = None
        self._stream: Any = None
        self._size: tuple[int, int] | None = None
        self._closed = False

    # -- context manager ---------------------------------------------------------------------
    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------------------
    def _open(self, width: int, height: int) -> None:
        import av  # imported where video is written, so the engine and the GPU check run without PyAV

        # faststart moves the index to the front at close, so browsers can play before downloading.
        self._container = av.open(str(self.path), mode="w", format="mp4", options={"movflags": "+faststart"})
        stream = self._container.add_stream(VIDEO_CODEC, rate=self.fps, options=dict(self._options))
        stream.width, stream.height = width, height
        stream.pix_fmt = PIX_FMT
        stream.codec_context.time_base = Fraction(1, self.fps)
        stream.codec_context.color_primaries = _BT709
        stream.codec_context.color_trc = _BT709
        stream.codec_context.colorspace = _BT709
        stream.codec_context.color_range = _RANGE_TV
        self._stream = stream
        self._size = (width, height)

    def write(self, frames: np.ndarray) -> None:
        """Encode uint8 frames [F, H, W, 3] (RGB); every call must use the same size."""
        if self._closed:
            raise RuntimeError(f"VideoWriter for {self.path} is already closed")
        frames = _check_frames(frames)
        height, width = frames.shape[1:3]
        if self._container is None:
            self._open(width, height)
        elif (width, height) != self._size:
            raise ValueError(f"frame size {width}x{height} differs from the video's {self._size[0]}x{self._size[1]}")
        import av

        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            # One thread: PyAV 19 keeps a scaler per thread whose worker threads do not survive a fork (ZeroGPU forks).
            frame = frame.reformat(format=PIX_FMT, dst_colorspace=_COLORSPACE, dst_color_range="MPEG", threads=1)
            frame.pts = self.frames_written
            frame.time_base = Fraction(1, self.fps)
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and finish the file; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._container is None:
            return
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        finally:
            self._container.close()


#: Image formats a chunk's strip may use, with the options PIL writes them with: PNG keeps small frames exact at a
#: fast zlib level; JPEG keeps large frames (the 5B's 704 x 1280) to about a tenth of PNG's bytes (still 50-70 KB a
#: frame at 704 x 1280; H.264 decoded by the browser's WebCodecs would take about a tenth of that).
STRIP_FORMATS = {"png": {"format": "PNG", "compress_level": 1}, "jpeg": {"format": "JPEG", "quality": 80}}


def encode_strip(frames: np.ndarray, image_format: str = "png") -> bytes:
    """uint8 frames [F, H, W, 3] as one image file of F*H x W pixels, frame 0 on top: one decode in a browser gives
    every frame of a chunk, which a canvas then shows one by one at the stream's frame rate."""
    frames = _check_frames(frames)
    if image_format not in STRIP_FORMATS:
        raise ValueError(f"strip format must be one of {sorted(STRIP_FORMATS)}, got {image_format!r}")
    buffer = io.BytesIO()
    Image.fromarray(frames.reshape(-1, *frames.shape[2:])).save(buffer, **STRIP_FORMATS[image_format])
    return buffer.getvalue()
