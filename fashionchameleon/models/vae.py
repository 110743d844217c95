"""Latent codecs behind one interface: diffusers' `AutoencoderKLWan` (Wan2.2 VAE) and the `mini` preset's
frame-wise pixel-shuffle codec, each with a streaming decoder.

The Wan VAE is causal in time: every `WanCausalConv3d` keeps the last two input frames of the previous call in a
feature cache. The stock `vae.decode` clears that cache at the start and end of each call, so decoding a stream
chunk by chunk with it restarts the video at every chunk (fewer frames and a seam). `StreamingDecoder` instead
keeps one cache per stream and feeds the decoder the same per-frame calls a full decode makes, so chunked decoding
reproduces one full decode of all latents.

Shapes: pixels `[B, 3, F, H, W]` in [-1, 1]; latents `[B, C, f, h, w]` with `h = H / spatial_factor`,
`w = W / spatial_factor` and `f = (F - 1) / temporal_factor + 1`. Latents crossing this module's public
interface are normalised per channel with the VAE config's `latents_mean` / `latents_std`, as the Wan pipelines
feed them to the transformer.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

# diffusers internals (0.42.x): the causal conv class (to size a feature cache) and the pixel-unshuffle inverse
# that `AutoencoderKLWan._decode` applies when `patch_size` is set. Neither is re-exported at the package top level.
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

__all__ = ["AutoencoderPixelShuffle", "PixelShuffleCodec", "StreamingDecoder", "WanLatentCodec", "latent_codec"]


def _check_5d(name: str, x: torch.Tensor) -> None:
    if x.ndim != 5:
        raise ValueError(f"{name} must be a 5-D tensor [B, C, F, H, W], got shape {tuple(x.shape)}.")


class WanLatentCodec:
    """Encode pixels to normalised Wan latents and decode them back, statelessly or as a stream.

    Several `StreamingDecoder`s may share one codec (and one VAE): each keeps its own feature cache and never
    touches the VAE's internal `_feat_map`.
    """

    def __init__(self, vae: "AutoencoderKLWan | AutoencoderPixelShuffle") -> None:
        self.vae = vae
        z_dim = self.latent_channels
        mean, std = self._channel_stats()
        if mean.numel() != z_dim or std.numel() != z_dim:
            raise ValueError(
                f"latents_mean/latents_std must have {z_dim} values (the latent channels), got {mean.numel()} and {std.numel()}."
            )
        # [1, C, 1, 1, 1] fp32, one copy per device (no host-to-device copy per chunk in the stream loop).
        self._stats_by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {
            torch.device("cpu"): (mean.view(1, z_dim, 1, 1, 1), std.view(1, z_dim, 1, 1, 1))
        }

    def _channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 per-channel mean and std of raw latents (the Wan VAE keeps them in its config)."""
        config = self.vae.config
        return (torch.tensor(config.latents_mean, dtype=torch.float32),
                torch.tensor(config.latents_std, dtype=torch.float32))

    # ---- sizes (all from the VAE config) ----

    @property
    def spatial_factor(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    @property
    def temporal_factor(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    def pixel_frames(self, latent_frames: int, first: bool) -> int:
        """Pixel frames decoded from `latent_frames` latents: `1 + t(n-1)` at a stream start, `t*n` after."""
        if latent_frames < (1 if first else 0):
            raise ValueError(f"latent_frames must be >= {1 if first else 0}, got {latent_frames}.")
        if first:
            return 1 + self.temporal_factor * (latent_frames - 1)
        return self.temporal_factor * latent_frames

    # ---- normalisation ----

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_5d("latents", z)
        if z.shape[1] != self.latent_channels:
            raise ValueError(f"latents must have {self.latent_channels} channels, got {z.shape[1]}.")
        if z.device not in self._stats_by_device:
            mean, std = self._stats_by_device[torch.device("cpu")]
            self._stats_by_device[z.device] = (mean.to(z.device), std.to(z.device))
        return self._stats_by_device[z.device]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> `(z - mean) / std` per channel; computed in fp32, returned in `z`'s dtype."""
        mean, std = self._stats(z)
        return ((z.float() - mean) / std).to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`: `z * std + mean`; computed in fp32, returned in `z`'s dtype."""
        mean, std = self._stats(z)
        return (z.float() * std + mean).to(z.dtype)

    # ---- encode ----

    def _to_vae(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.vae.device, dtype=self.vae.dtype)

    def _decoder_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> raw latents on the VAE's device and dtype (denormalised in fp32 first)."""
        return self._to_vae(self.denormalize(latents.float()))

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """`[B, 3, F, H, W]` in [-1, 1], `F = tk + 1` -> normalised latents `[B, C, (F-1)/t + 1, H/s, W/s]`.

        The Wan VAE uses the posterior mode (its mean), as the Wan pipelines do (`sample_mode="argmax"`):
        deterministic. Returned in the VAE's dtype.
        """
        _check_5d("video", video)
        frames, height, width = video.shape[2:]
        t, s = self.temporal_factor, self.spatial_factor
        if video.shape[1] != 3:
            raise ValueError(f"video must have 3 colour channels, got {video.shape[1]}.")
        if (frames - 1) % t != 0:
            raise ValueError(f"video must have {t}k+1 frames (1, {t + 1}, {2 * t + 1}, ...), got {frames}.")
        if height % s != 0 or width % s != 0:
            raise ValueError(f"video height and width must be multiples of {s}, got {height}x{width}.")
        return self.normalize(self._encode_raw(self._to_vae(video)))

    def _encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video).latent_dist.mode()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` in [-1, 1] -> normalised latents `[B, C, 1, H/16, W/16]` (a one-frame video).

        Equals the first latent frame of a video that starts with this image.
        """
        if images.ndim != 4:
            raise ValueError(f"images must be a 4-D tensor [B, 3, H, W], got shape {tuple(images.shape)}.")
        return self.encode_video(images.unsqueeze(2))

    # ---- decode ----

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents `[B, C, f, h, w]` -> `[B, 3, 1 + 4(f-1), 16h, 16w]` in [-1, 1].

        The stock stateless `vae.decode` (a new video start every call); for streams use `stream_decoder()`.
        """
        return self.vae.decode(self._decoder_input(latents)).sample

    def stream_decoder(self) -> "StreamingDecoder":
        """A new decoder state for one stream (its first `decode` call is a video start)."""
        return StreamingDecoder(self)


class StreamingDecoder:
    """One decoder state for a whole stream: decoding latents chunk by chunk gives exactly what one full decode
    of all of them gives.

    It mirrors `AutoencoderKLWan._decode` (diffusers 0.42.x) with the feature cache kept across calls:
    `post_quant_conv` (a 1x1x1 conv, so per chunk equals per video), then `vae.decoder` one latent frame at a time
    with `first_chunk=True` only for the very first latent of the stream, then `unpatchify` and a clamp.
    Spatial tiling (`vae.enable_tiling`) is not applied here.
    """

    def __init__(self, codec: WanLatentCodec) -> None:
        self.codec = codec
        # Number of causal convs in the decoder = number of cache entries the decoder walks per frame
        # (diffusers internal: `AutoencoderKLWan.clear_cache` sizes `_feat_map` the same way).
        self._num_cache_entries = sum(isinstance(m, WanCausalConv3d) for m in codec.vae.decoder.modules())
        self.reset()

    def reset(self) -> None:
        """Hard cut: drop the cached features; the next `decode` starts a new video."""
        self._feat_cache: list = [None] * self._num_cache_entries
        self._shape: tuple[int, int, int] | None = None  # (B, h, w) the cache was built for
        self.frames_out = 0

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents `[B, C, n, h, w]` -> pixels `[B, 3, frames, 16h, 16w]` clamped to [-1, 1].

        `frames` is `1 + 4(n-1)` on the stream's first call and `4n` after. Returned in the VAE's dtype.
        """
        codec, vae = self.codec, self.codec.vae
        _check_5d("latents", latents)
        batch, _, num_latents, height, width = latents.shape
        if num_latents < 1:
            raise ValueError("latents must hold at least one latent frame, got 0.")
        if self._shape is not None and self._shape != (batch, height, width):
            raise ValueError(
                f"latents of batch {batch} and size {height}x{width} do not continue a stream of batch "
                f"{self._shape[0]} and size {self._shape[1]}x{self._shape[2]}; call reset() first."
            )
        first = self._shape is None

        # Same as `apply_forward_hook` on `vae.decode`: let an accelerate offload hook move the VAE to its device,
        # since we call its submodules directly.
        hook = getattr(vae, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(vae)

        x = vae.post_quant_conv(codec._decoder_input(latents))
        outs = []
        for i in range(num_latents):
            # diffusers internal: `WanDecoder3d.forward(x, feat_cache, feat_idx, first_chunk)`; `feat_idx` is a
            # one-element list the decoder advances through the cache, restarted at 0 for every latent frame.
            outs.append(
                vae.decoder(
                    x[:, :, i : i + 1],
                    feat_cache=self._feat_cache,
                    feat_idx=[0],
                    first_chunk=first and i == 0,
                )
            )
        out = torch.cat(outs, dim=2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        out = out.clamp(-1.0, 1.0)

        self._shape = (batch, height, width)
        self.frames_out += out.shape[2]
        return out


class AutoencoderPixelShuffle(ModelMixin, ConfigMixin):
    """The `mini` preset's codec as a diffusers model (so a pipeline folder saves and loads it), one latent per
    frame: an exact space-to-depth (`factor` x `factor` pixel blocks become `3 factor^2` channels), then, with
    `latent_channels`, a small learned encoder/decoder at that resolution (diffusers' tiny-autoencoder blocks)
    that compresses those channels to `latent_channels`.

    Without `latent_channels` it is parameter-free and lossless: the transformer must then draw every pixel value
    itself. The learned codec (trained by `training.codec.train_codec`) hands it `latent_channels` numbers per
    `factor` x `factor` pixels and lets its decoder draw the flat colours and edges of the world. The buffers
    `latents_mean`/`latents_std` normalise the channels (set from data with `fit_channel_stats`)."""

    @register_to_config
    def __init__(self, factor: int = 4, latent_channels: int | None = None, width: int = 96,
                 num_blocks: int = 2) -> None:
        super().__init__()
        from diffusers.models.autoencoders.vae import DecoderTiny, EncoderTiny

        packed = 3 * factor**2
        channels = latent_channels or packed
        if latent_channels:
            self.encoder = EncoderTiny(packed, latent_channels, (num_blocks,), (width,), "relu")
            # one stage, so no upsampling inside: the pixel shuffle does it
            self.decoder = DecoderTiny(latent_channels, packed, (num_blocks,), (width,), 1, "relu", "nearest")
        self.register_buffer("latents_mean", torch.zeros(channels))
        self.register_buffer("latents_std", torch.ones(channels))

    @property
    def latent_channels(self) -> int:
        return int(self.latents_mean.numel())

    @torch.no_grad()
    def fit_channel_stats(self, video: torch.Tensor) -> None:
        """Set the normalisation from sample pixels [B, 3, F, H, W] in [-1, 1]."""
        z = self.encode(video.float()).transpose(0, 1).flatten(1)
        self.latents_mean.copy_(z.mean(dim=1))
        self.latents_std.copy_(z.std(dim=1).clamp_min(1e-3))

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] -> raw latents [B, C, F, H/factor, W/factor]."""
        b, _, f, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * f, 3, h, w)
        z = torch.nn.functional.pixel_unshuffle(frames, self.config.factor)
        if self.config.latent_channels:
            # EncoderTiny maps its input from [-1, 1] to [0, 1] first, as TAESD's does
            z = self.encoder(z)
        return z.reshape(b, f, *z.shape[1:]).transpose(1, 2)

    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Inverse of `encode` (exact without `latent_channels`), clamped to [-1, 1] (training takes it
        unclamped: the clamp has no gradient outside)."""
        b, c, f, h, w = z.shape
        frames = z.transpose(1, 2).reshape(b * f, c, h, w)
        if self.config.latent_channels:
            frames = self.decoder(frames)
        frames = torch.nn.functional.pixel_shuffle(frames, self.config.factor)
        frames = frames.reshape(b, f, *frames.shape[1:]).transpose(1, 2)
        return frames.clamp(-1.0, 1.0) if clamp else frames


class PixelShuffleCodec(WanLatentCodec):
    """`WanLatentCodec`'s interface over `AutoencoderPixelShuffle`: spatial factor `factor`, no temporal
    compression (one latent per frame, so `pixel_frames(n) = n`)."""

    @property
    def spatial_factor(self) -> int:
        return int(self.vae.config.factor)

    @property
    def temporal_factor(self) -> int:
        return 1

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    def _channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vae.latents_mean.detach().float().cpu(), self.vae.latents_std.detach().float().cpu()

    def _encode_raw(self, video: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(video)

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self._decoder_input(latents))

    def stream_decoder(self) -> "FrameDecoder":
        return FrameDecoder(self)


class FrameDecoder:
    """Streaming decoder of a frame-wise codec: no state between chunks is needed, so chunked decoding equals one
    full decode trivially; the bookkeeping mirrors `StreamingDecoder`'s."""

    def __init__(self, codec: WanLatentCodec) -> None:
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        self.frames_out = 0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        _check_5d("latents", latents)
        out = self.codec.decode_video(latents)
        self.frames_out += out.shape[2]
        return out


def latent_codec(vae: "AutoencoderKLWan | AutoencoderPixelShuffle") -> WanLatentCodec:
    """The codec adapter for a pipeline's `vae` component."""
    return PixelShuffleCodec(vae) if isinstance(vae, AutoencoderPixelShuffle) else WanLatentCodec(vae)
