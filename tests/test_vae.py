"""WanLatentCodec on a tiny seeded Wan2.2-style VAE: streaming decode equals a full decode, with negative controls.

The tiny VAE has the 5B VAE's structure (z 48, residual blocks, patch 2, 16x spatial, 4x temporal) at small width,
and goes through `save_pretrained` / `from_pretrained` so the real loader is exercised.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan

from fashionchameleon.models.vae import StreamingDecoder, WanLatentCodec

# 64x96 pixels <-> 4x6 latents.
HEIGHT, WIDTH = 64, 96
LAT_H, LAT_W = HEIGHT // 16, WIDTH // 16
NUM_LATENTS = 10  # -> 37 pixel frames

# Streaming must reproduce the full decode; on CPU it is bit-exact, the bound leaves room for other kernels.
EXACT_ATOL = 1e-5
# A restarted decoder must differ from the continued stream by far more than that.
CONTROL_MIN_DIFF = 1e-2


def tiny_vae_config() -> dict:
    """Wan2.2 VAE structure at test size (reference notes §6)."""
    gen = torch.Generator().manual_seed(1)
    z_dim = 48
    return dict(
        base_dim=8,
        decoder_base_dim=16,
        z_dim=z_dim,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=[round(v, 4) for v in (torch.randn(z_dim, generator=gen) * 0.5).tolist()],
        latents_std=[round(v, 4) for v in (0.5 + torch.rand(z_dim, generator=gen) * 2.0).tolist()],
    )


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory) -> AutoencoderKLWan:
    """Seeded tiny VAE with perturbed weights (norm scales/biases off their identity init), saved and reloaded."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**tiny_vae_config())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("gamma"):  # WanRMS_norm scale, initialised to ones
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):  # zeros for norms; small random for convs
                p.add_(0.05 * noise)
            else:
                p.add_(0.02 * noise)
    path = tmp_path_factory.mktemp("tiny_wan_vae")
    vae.save_pretrained(path)
    loaded = AutoencoderKLWan.from_pretrained(path)
    loaded.eval()
    # The loaded copy really carries the perturbed weights.
    for (name, a), (_, b) in zip(vae.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    return loaded


@pytest.fixture(scope="session")
def codec(tiny_vae) -> WanLatentCodec:
    return WanLatentCodec(tiny_vae)


@pytest.fixture(scope="session")
def latents() -> torch.Tensor:
    """Normalised latents of a 10-latent stream, batch 2."""
    gen = torch.Generator().manual_seed(2)
    return torch.randn(2, 48, NUM_LATENTS, LAT_H, LAT_W, generator=gen)


@pytest.fixture(scope="session")
def full_decode(codec, latents) -> torch.Tensor:
    return codec.decode_video(latents)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def stream(decoder: StreamingDecoder, latents: torch.Tensor, split: list[int]) -> list[torch.Tensor]:
    outs, start = [], 0
    for n in split:
        outs.append(decoder.decode(latents[:, :, start : start + n]))
        start += n
    assert start == latents.shape[2]
    return outs


def test_sizes(codec):
    assert (codec.spatial_factor, codec.temporal_factor, codec.latent_channels) == (16, 4, 48)
    assert [codec.pixel_frames(n, first=True) for n in (1, 3, 10)] == [1, 9, 37]
    assert [codec.pixel_frames(n, first=False) for n in (1, 3)] == [4, 12]
    with pytest.raises(ValueError):
        codec.pixel_frames(0, first=True)


def test_full_decode_is_stock_decode(codec, tiny_vae, latents, full_decode):
    assert full_decode.shape == (2, 3, 37, HEIGHT, WIDTH)
    assert full_decode.min() >= -1.0 and full_decode.max() <= 1.0
    # Not saturated: the comparisons below look at real values, not at the clamp.
    assert (full_decode.abs() < 1.0).float().mean() > 0.5
    assert full_decode.std() > 0.05
    stock = tiny_vae.decode(codec.denormalize(latents)).sample
    assert max_abs(full_decode, stock) == 0.0


@pytest.mark.parametrize(
    "split",
    [[1, 3, 3, 3], [3, 3, 3, 1], [2, 1, 4, 3], [1] * 10, [3, 3, 3]],
    ids=["1-3-3-3", "3-3-3-1", "2-1-4-3", "1x10", "3x3"],
)
def test_streaming_decode_equals_full_decode(codec, latents, full_decode, split):
    lat = latents[:, :, : sum(split)]
    expected = full_decode[:, :, : codec.pixel_frames(sum(split), first=True)]
    decoder = codec.stream_decoder()
    outs = stream(decoder, lat, split)

    assert [o.shape[2] for o in outs] == [codec.pixel_frames(n, first=(k == 0)) for k, n in enumerate(split)]
    assert decoder.frames_out == expected.shape[2]
    for o in outs:
        assert o.min() >= -1.0 and o.max() <= 1.0
    err = max_abs(torch.cat(outs, dim=2), expected)
    assert err <= EXACT_ATOL, f"split {split}: max abs error {err}"


def test_engine_chunks_give_9_then_12_frames(codec, latents):
    decoder = codec.stream_decoder()
    assert [o.shape[2] for o in stream(decoder, latents[:, :, :9], [3, 3, 3])] == [9, 12, 12]


def test_restarted_decoder_is_a_negative_control(codec, latents, full_decode):
    """Decoding each chunk as a new video (fresh decoder, or reset()) loses frames and changes the pixels."""
    split = [3, 3, 3, 1]
    fresh, start = [], 0
    for n in split:
        fresh.append(codec.stream_decoder().decode(latents[:, :, start : start + n]))
        start += n
    assert sum(o.shape[2] for o in fresh) == 28 < full_decode.shape[2] == 37

    # Align each restarted chunk with the frames of the continued stream it stands for: a chunk starting at latent
    # s decodes its first latent to one frame, the last of the 4 frames latent s gives in the stream (frame 4s).
    diffs = []
    start = 0
    for k, n in enumerate(split):
        if k > 0:
            first_frame = codec.temporal_factor * start
            diffs.append(max_abs(fresh[k], full_decode[:, :, first_frame : first_frame + fresh[k].shape[2]]))
        start += n
    assert min(diffs) > CONTROL_MIN_DIFF, diffs

    # reset() behaves exactly like a fresh decoder.
    decoder = codec.stream_decoder()
    decoder.decode(latents[:, :, :3])
    decoder.reset()
    assert decoder.frames_out == 0
    again = decoder.decode(latents[:, :, 3:6])
    assert max_abs(again, fresh[1]) == 0.0
    assert decoder.frames_out == 9


def test_streams_sharing_one_vae_are_independent(codec, tiny_vae, latents, full_decode):
    """Two interleaved streams plus a stateless decode in between: each stream still equals its full decode."""
    other = torch.flip(latents, dims=[2])
    other_full = codec.decode_video(other)
    a, b = codec.stream_decoder(), codec.stream_decoder()
    outs_a, outs_b = [], []
    for start in range(0, NUM_LATENTS, 3):
        chunk = slice(start, min(start + 3, NUM_LATENTS))
        outs_a.append(a.decode(latents[:, :, chunk]))
        codec.decode_video(latents[:, :, :2])  # stock decode clears the VAE's own cache, not ours
        outs_b.append(b.decode(other[:, :, chunk]))
    assert max_abs(torch.cat(outs_a, dim=2), full_decode) <= EXACT_ATOL
    assert max_abs(torch.cat(outs_b, dim=2), other_full) <= EXACT_ATOL


def test_stream_rejects_a_different_shape_without_reset(codec, latents):
    decoder = codec.stream_decoder()
    decoder.decode(latents[:, :, :1])
    with pytest.raises(ValueError, match="reset"):
        decoder.decode(latents[:1, :, 1:2])
    decoder.reset()
    assert decoder.decode(latents[:1, :, 1:2]).shape == (1, 3, 1, HEIGHT, WIDTH)


def test_inputs_follow_the_vae_dtype(codec, latents, full_decode):
    out = codec.stream_decoder().decode(latents[:, :, :3].double())
    assert out.dtype == torch.float32
    assert max_abs(out, full_decode[:, :, :9]) <= EXACT_ATOL


def test_encode_image_equals_first_latent_of_video(codec):
    gen = torch.Generator().manual_seed(3)
    video = torch.rand(2, 3, 9, HEIGHT, WIDTH, generator=gen) * 2 - 1
    image = video[:, :, 0].clone()

    z_video = codec.encode_video(video)
    z_image = codec.encode_image(image)
    assert z_video.shape == (2, 48, 3, LAT_H, LAT_W)
    assert z_image.shape == (2, 48, 1, LAT_H, LAT_W)
    assert max_abs(z_image, z_video[:, :, :1]) <= EXACT_ATOL
    # Negative control: a different first frame gives a different latent.
    other = codec.encode_image(torch.flip(image, dims=[-1]))
    assert max_abs(other, z_video[:, :, :1]) > CONTROL_MIN_DIFF
    # Deterministic (posterior mode, no sampling).
    assert torch.equal(codec.encode_image(image), z_image)


def test_encode_rejects_bad_shapes(codec):
    with pytest.raises(ValueError, match="4k\\+1"):
        codec.encode_video(torch.zeros(1, 3, 8, HEIGHT, WIDTH))
    with pytest.raises(ValueError, match="multiples of 16"):
        codec.encode_video(torch.zeros(1, 3, 1, 40, WIDTH))
    with pytest.raises(ValueError):
        codec.encode_image(torch.zeros(1, 3, 1, HEIGHT, WIDTH))


def test_normalize_round_trip(codec, tiny_vae):
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(2, 48, 3, LAT_H, LAT_W, generator=gen) * 3
    mean = torch.tensor(tiny_vae.config.latents_mean).view(1, 48, 1, 1, 1)
    std = torch.tensor(tiny_vae.config.latents_std).view(1, 48, 1, 1, 1)
    assert max_abs(codec.normalize(z), (z - mean) / std) <= 1e-6
    assert max_abs(codec.denormalize(codec.normalize(z)), z) <= 1e-5
    # The stats are per channel and non-trivial, so normalising really changes the latents.
    assert max_abs(codec.normalize(z), z) > 0.1
