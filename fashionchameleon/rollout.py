"""The block-causal student's operations on one KV cache: the core that streaming and training share.

A `Rollout` holds one cache and the conditioning of one stream, and implements the paper's operations by name
(docs/method.md §3.4-3.7, §7): the joint `prefill` of [reference, garment], `denoise_chunk` (the 4-step student),
`commit_chunk` (the clean re-run that stores a chunk's K/V), and the KV-rescheduling primitives
`refresh_garment_kv` and `withdraw_history_kv` (reference KV disentangle needs pixels, so the streaming engine does
it and hands the new latent to `replace_reference`). The streaming engine (`engine.Stream`) wraps a rollout with a
decoder, a switch queue and iteration; GR-DMD's self-forcing rollout (`training.losses`) runs one directly.

Per chunk: fresh noise -> for each warped step predict x0 and re-noise with fresh noise (read-only on the cache) ->
a commit pass at t = 0 writes the chunk's K/V (SINK for the first chunk after a prefill, HISTORY after).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from .models.causal_wan import CausalWanTransformer3DModel, TextKV
from .models.kv_cache import KVCache, KVSlot, WindowPolicy


@dataclass(frozen=True)
class StreamConfig:
    """How a stream is generated (docs/method.md §3): frame size, chunking, the few-step schedule, the cache window.

    A preset holds one (`presets.py` is the home of every number); a saved pipeline folder carries a copy.
    """

    height: int  # pixels
    width: int
    chunk_frames: int = 3  # latent frames per chunk: 9 pixel frames for the first chunk, 12 after (Wan VAE)
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)  # warped by the scheduler's shift
    sink_frames: int = 3
    history_frames: int = 18
    max_text_tokens: int = 512
    fps: int = 24

    @property
    def window(self) -> WindowPolicy:
        return WindowPolicy(sink_frames=self.sink_frames, history_frames=self.history_frames)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "StreamConfig":
        return cls(**{**values, "denoising_steps": tuple(values.get("denoising_steps", cls.denoising_steps))})


class Rollout:
    """One stream's KV cache and conditioning, and the operations on them.

    `transformer` sizes the cache and is called unless `model` (a wrapper that calls it: accelerate, DDP, FSDP) is
    given. `sigmas` [steps] are the warped noise levels of the student. `reference_latent`/`garment_latent`
    [B, C, 1, h, w] are the conditioning frames; `text` is a prompt's precomputed `TextKV` or UMT5 embeddings
    [B, L, D] (training passes embeddings so that gradients reach the text embedder). Noise comes from `generator`.

    Training only: `exit_step` stops every chunk's denoising at that step, with gradient at that step only;
    `context_noise` re-noises each chunk to that sigma before its commit pass (the authors' training: ~0.005).
    """

    def __init__(
        self,
        transformer: CausalWanTransformer3DModel,
        stream: StreamConfig,
        sigmas: torch.Tensor,
        reference_latent: torch.Tensor,
        garment_latent: torch.Tensor,
        text: TextKV | torch.Tensor,
        generator: torch.Generator,
        *,
        model: Callable[..., object] | None = None,
        exit_step: int | None = None,
        context_noise: float = 0.0,
    ) -> None:
        if exit_step is not None and not 0 <= exit_step < len(sigmas):
            raise ValueError(f"exit_step must be in [0, {len(sigmas) - 1}], got {exit_step}")
        self.transformer, self.model = transformer, model or transformer
        self.chunk_frames = stream.chunk_frames
        self.reference_latent, self.garment_latent = reference_latent, garment_latent
        self.text = text
        self.generator = generator
        self.exit_step, self.context_noise = exit_step, context_noise
        self.batch_size, self.latent_channels, _, height, width = reference_latent.shape
        self.latent_size = (height, width)
        device = reference_latent.device
        # The schedule lives on the device in fp32: the chunk loop indexes it and never copies host data.
        self.sigmas = sigmas.to(device, torch.float32)
        self.timesteps = self.sigmas * transformer.config.num_train_timesteps
        self.clean_timestep = torch.zeros((), device=device)
        self.context_sigma = torch.tensor(float(context_noise), device=device)
        self.cache: KVCache = transformer.new_kv_cache(self.batch_size, height, width, policy=stream.window,
                                                       dtype=compute_dtype(transformer, device))
        self.condition_frames = reference_latent.shape[2] + garment_latent.shape[2]  # RoPE 0, 1; video from 2
        self.next_position = self.condition_frames
        self.prefill()

    @property
    def positions_left(self) -> int:
        """RoPE frame positions left in the transformer's table (a long stream must re-anchor before 0)."""
        return self.transformer.config.rope_max_seq_len - self.next_position

    # -- the paper's operations -----------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self) -> None:
        """Joint t = 0 pass of [reference, garment] at RoPE 0/1: they attend to each other only and fill the
        REFERENCE and GARMENT slots (the reference KV depends on the garment)."""
        latents = torch.cat([self.reference_latent, self.garment_latent], dim=2)
        self._forward(latents, self.clean_timestep, range(self.condition_frames),
                      write=[KVSlot.REFERENCE, KVSlot.GARMENT], read=())

    def denoise_chunk(self, positions: range) -> torch.Tensor:
        """The few-step student: predict x0 at each warped step, re-noise with fresh noise to the next level.

        The latents and the sigma arithmetic stay in fp32 whatever the model's dtype (in bf16, sigma 0.8333 would
        be 0.8320); only the model's input is cast. Returns x0 in fp32.
        With `exit_step` it stops after that step, and only that step's forward records gradients (if the caller
        has them enabled), so the output carries the gradient of exactly one pass.
        """
        height, width = self.latent_size
        shape = (self.batch_size, self.latent_channels, len(positions), height, width)
        last = len(self.sigmas) - 1 if self.exit_step is None else self.exit_step
        grad = self.exit_step is not None and torch.is_grad_enabled()
        x = self._noise(shape)
        for i in range(last + 1):
            with torch.set_grad_enabled(grad and i == last):
                velocity = self._forward(x, self.timesteps[i], positions)
                x0 = x - self.sigmas[i] * velocity.float()  # flow matching: v = noise - x0
            if i < last:
                x = self._renoise(x0, self.sigmas[i + 1])
        return x0

    @torch.no_grad()
    def commit_chunk(self, x0: torch.Tensor, positions: range) -> None:
        """Clean re-run at t = 0 that stores the chunk's K/V: the sink after a prefill, history after that."""
        slot = KVSlot.SINK if self.cache.num_frames(KVSlot.SINK) == 0 else KVSlot.HISTORY
        if self.context_noise:
            x0 = self._renoise(x0, self.context_sigma)
        self._forward(x0, self.clean_timestep, positions, write=slot)

    def next_latents(self) -> torch.Tensor:
        """The next chunk in latent space [B, C, chunk_frames, h, w]: denoise, then commit its clean K/V."""
        n = self.chunk_frames
        if n > self.positions_left:
            raise ValueError(f"RoPE position {self.next_position + n} exceeds the table "
                             f"({self.transformer.config.rope_max_seq_len}); re-anchor the stream first")
        positions = range(self.next_position, self.next_position + n)
        self.cache.make_room(n)
        x0 = self.denoise_chunk(positions)
        self.commit_chunk(x0, positions)
        self.next_position += n
        return x0

    def rollout(self, chunks: int) -> torch.Tensor:
        """Self-forcing rollout (docs/method.md §3.7): `chunks` chunks on the model's own clean context,
        [B, C, chunks * chunk_frames, h, w]. No gradient crosses chunks (the cache holds detached K/V)."""
        return torch.cat([self.next_latents() for _ in range(chunks)], dim=2)

    def refresh_garment_kv(self, garment_latent: torch.Tensor | None = None) -> None:
        """Garment KV refresh: replace REFERENCE/GARMENT by a joint prefill (with a new garment latent, if given)."""
        if garment_latent is not None:
            self.garment_latent = garment_latent
        self.prefill()

    def withdraw_history_kv(self) -> None:
        """Historical KV withdraw: drop SINK and HISTORY; the next chunk restarts right after the conditioning
        frames (RoPE 2) and becomes the new sink."""
        self.cache.clear([KVSlot.SINK, KVSlot.HISTORY])
        self.next_position = self.condition_frames

    def replace_reference(self, reference_latent: torch.Tensor) -> None:
        """The cache side of reference KV disentangle: the next prefill conditions on this latent."""
        self.reference_latent = reference_latent

    # -- the one model call ---------------------------------------------------------------------------------
    def _forward(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        positions: range | list[int],
        write: KVSlot | Sequence[KVSlot] | None = None,
        read: tuple[KVSlot, ...] | None = None,
    ) -> torch.Tensor:
        """The transformer's flow velocity for `latents` at exact timestep `t` (a 0-d tensor on the device; the
        model rounds it itself). `latents` are cast to the model's dtype here, the one place they meet it."""
        timestep = t.reshape(1).expand(latents.shape[0])
        return self.model(latents.to(self.transformer.dtype), timestep, self.text, frame_positions=positions,
                          kv_cache=self.cache, cache_write=write, cache_read=read).sample

    def _renoise(self, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Fresh noise mixed in to level `sigma` in fp32 (flow matching: x = (1 - sigma) x0 + sigma noise)."""
        return (1 - sigma) * x0.float() + sigma * self._noise(x0.shape)

    def _noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.reference_latent.device, dtype=torch.float32)


def compute_dtype(transformer: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype the transformer computes K/V in: autocast's when it is on (training keeps fp32 master weights
    and runs bf16), else the weights'. The cache is allocated in it (an fp32 cache of the 5B is ~15 GB)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return transformer.dtype
