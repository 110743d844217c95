"""The streaming engine: joint prefill, the chunk loop, and garment switching by KV-cache rescheduling.

One `StreamingEngine` per loaded model; one `Stream` per user stream. The chunk loop (`Stream.next_latents`)
is the only one in the project: the CLI, `bench` and the app iterate a `Stream`, and training's self-forcing
rollout (`Stream.rollout`) runs the same loop on a stream opened with `start_from_latents`.

Per chunk (METHOD.md §3.5-3.6): fresh noise -> for each warped step predict x0 and re-noise with fresh noise
(read-only on the cache) -> a commit pass at t = 0 writes the chunk's K/V (SINK for the first chunk after a
prefill, HISTORY after) -> the streaming VAE decoder turns it into 9 (first chunk) or 12 pixel frames.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from . import media
from .models.causal_wan import TextKV, block_causal_mask
from .models.kv_cache import KVCache, KVSlot
from .models.text import filter_garment_words
from .pipeline import FashionChameleonPipeline
from .presets import StreamConfig

logger = logging.getLogger(__name__)

CONDITION_FRAMES = 2  # reference + garment, one latent frame each, at RoPE positions 0 and 1
REFERENCE_POSITION, GARMENT_POSITION = 0, 1


class SwitchMode(str, enum.Enum):
    """Which KV-rescheduling primitives a garment switch applies (the paper's ablation, METHOD.md §7)."""

    REFRESH = "refresh"  # garment KV refresh only: the paper shows the garment does not change
    REFRESH_WITHDRAW = "refresh+withdraw"  # + historical KV withdraw: switches, but motion jumps
    FULL = "full"  # + reference KV disentangle: the paper's method (default)


def embedding_timesteps(t: torch.Tensor) -> torch.Tensor:
    """Timesteps as the time embedding saw them in training: rounded through bf16, then to an integer
    (937.5 -> 936, 833.3 -> 832, 625 -> 624; METHOD.md §1). The noise level uses the exact value."""
    return t.to(torch.bfloat16).long().float()


@dataclass
class Chunk:
    """One generated chunk: its pixel frames and where it sits in the stream."""

    index: int
    frames: np.ndarray  # uint8 [F, H, W, 3]
    garment_version: int
    first_frame: int  # index of frames[0] in the whole stream
    latents: torch.Tensor  # the chunk's clean latents [1, C, chunk_frames, h, w]
    timings: dict[str, float] = field(default_factory=dict)  # seconds; filled when the engine profiles


@dataclass
class _SwitchRequest:
    garment: Image.Image
    prompt: str | None


class StreamingEngine:
    """Holds the model and the stream settings; `start` opens a stream.

    `use_kv_cache=False` is the benchmark's recompute baseline: every pass re-runs the whole visible
    context (same window, same outputs up to rounding) instead of reading cached K/V.
    """

    def __init__(
        self,
        pipe: FashionChameleonPipeline,
        stream: StreamConfig,
        *,
        switch_mode: SwitchMode | str = SwitchMode.FULL,
        use_kv_cache: bool = True,
        profile: bool = False,
    ) -> None:
        self.pipe = pipe
        self.config = stream
        self.switch_mode = SwitchMode(switch_mode)
        self.use_kv_cache = use_kv_cache
        self.profile = profile
        self.codec = pipe.codec
        self.sigmas = pipe.student_sigmas(stream.denoising_steps)
        self.timesteps = self.sigmas * pipe.scheduler.config.num_train_timesteps
        factor = self.codec.spatial_factor
        if stream.height % factor or stream.width % factor:
            raise ValueError(f"stream size {stream.width}x{stream.height} must be a multiple of {factor}")
        self.latent_height, self.latent_width = stream.height // factor, stream.width // factor

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    def start(
        self,
        reference: Image.Image | str,
        garment: Image.Image | str,
        prompt: str = "",
        seed: int = 0,
        chunks: int | None = None,
    ) -> "Stream":
        """Open a stream of `chunks` chunks (None: until `stop()`). Inputs are validated before any compute."""
        reference, garment = media.load_image(reference), media.load_image(garment)
        prompt, removed = filter_garment_words(prompt)
        with torch.no_grad():
            text_kv = self.pipe.encode_text_kv(prompt, self.config.max_text_tokens)
            reference_latent, garment_latent = self.encode_reference(reference), self.encode_garment(garment)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return Stream(self, reference_latent, garment_latent, generator, chunks, text_kv=text_kv, prompt=prompt,
                      removed_words=removed)

    def start_from_latents(
        self,
        reference_latent: torch.Tensor,
        garment_latent: torch.Tensor,
        text_embeds: torch.Tensor,
        generator: torch.Generator,
        *,
        model: torch.nn.Module | None = None,
        exit_step: int | None = None,
        context_noise: float = 0.0,
    ) -> "Stream":
        """A stream over already encoded inputs, for the self-forcing rollout of training (METHOD.md §3.7).

        `reference_latent`/`garment_latent` [B, C, 1, h, w], `text_embeds` [B, text_len, text_dim] (UMT5 output;
        passed to every forward so that gradients reach the text embedder and FSDP sees only root forwards).
        `model` is the callable that runs the transformer (an accelerate/FSDP wrapper of `pipe.transformer`).
        `exit_step` stops every chunk's denoising at that step, with gradient at that step only; `context_noise`
        re-noises each chunk to that sigma before its commit pass (the authors' training pipeline: ~0.005).
        """
        if exit_step is not None and not 0 <= exit_step < len(self.sigmas):
            raise ValueError(f"exit_step must be in [0, {len(self.sigmas) - 1}], got {exit_step}")
        return Stream(self, reference_latent, garment_latent, generator, text_embeds=text_embeds, model=model,
                      exit_step=exit_step, context_noise=context_noise)

    # -- images <-> latents -----------------------------------------------------------------------------
    def encode_reference(self, image: Image.Image) -> torch.Tensor:
        """Reference photo: cover + centre crop to the stream size, one latent frame."""
        fitted = media.fit_reference(image, self.config.width, self.config.height)
        return self.encode_pixels(media.image_to_tensor(fitted))

    def encode_garment(self, image: Image.Image) -> torch.Tensor:
        """Garment photo: letterboxed on white to the stream size, one latent frame."""
        boxed = media.letterbox_garment(image, self.config.width, self.config.height)
        return self.encode_pixels(media.image_to_tensor(boxed))

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[3, H, W] in [-1, 1] at the stream size -> one normalized latent frame [1, C, 1, h, w]."""
        latent = self.codec.encode_image(pixels[None].to(self.device))
        return latent.to(self.dtype)


class Stream:
    """One user's stream: iterate it for `Chunk`s; `request_switch` and `stop` may come from other threads."""

    def __init__(
        self,
        engine: StreamingEngine,
        reference_latent: torch.Tensor,
        garment_latent: torch.Tensor,
        generator: torch.Generator,
        chunks: int | None = None,
        *,
        text_kv: TextKV | None = None,
        text_embeds: torch.Tensor | None = None,
        model: torch.nn.Module | None = None,
        exit_step: int | None = None,
        context_noise: float = 0.0,
        prompt: str | None = None,
        removed_words: list[str] | None = None,
    ) -> None:
        """Open a stream over encoded inputs (see `StreamingEngine.start` / `start_from_latents`) and prefill."""
        self.engine = engine
        self.prompt, self.removed_words = prompt, removed_words or []
        self.max_chunks = chunks
        self.chunk_index = 0
        self.garment_version = 0
        self.frames_out = 0
        self._lock = threading.Lock()
        self._pending: _SwitchRequest | None = None
        self._stopped = threading.Event()
        self.generator = generator
        self.model = model or engine.pipe.transformer
        self.text_kv, self.text_embeds = text_kv, text_embeds
        self.exit_step, self.context_noise = exit_step, context_noise
        self.reference_latent, self.garment_latent = reference_latent, garment_latent
        self.batch_size = reference_latent.shape[0]
        self.cache: KVCache = engine.pipe.transformer.new_kv_cache(
            self.batch_size, engine.latent_height, engine.latent_width, policy=engine.config.window,
            dtype=engine.dtype, device=engine.device,
        )
        self.decoder = engine.codec.stream_decoder()
        self.last_frame: np.ndarray | None = None
        # Clean latents of the cached frames by slot, for the recompute baseline (which keeps no K/V).
        self._context: dict[KVSlot, list[tuple[torch.Tensor, int, int]]] = {slot: [] for slot in KVSlot}
        self._group = 0
        self.next_position = CONDITION_FRAMES
        self.prefill()

    # -- the paper's operations -------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self) -> None:
        """Joint t = 0 pass of [reference, garment] at RoPE positions 0/1: they attend to each other only and
        fill the REFERENCE and GARMENT slots (the reference KV depends on the garment)."""
        latents = torch.cat([self.reference_latent, self.garment_latent], dim=2)
        self._forward(latents, 0.0, [REFERENCE_POSITION, GARMENT_POSITION], write=[KVSlot.REFERENCE, KVSlot.GARMENT],
                      read=())

    def denoise_chunk(self, positions: list[int]) -> torch.Tensor:
        """The 4-step student: predict x0 at each warped step, re-noise with fresh noise to the next level.

        A training stream (`exit_step` set) stops after that step; only that step's forward records gradients
        (if the caller has them enabled), so the output carries the gradient of exactly one pass.
        """
        engine = self.engine
        shape = (self.batch_size, engine.codec.latent_channels, len(positions), engine.latent_height,
                 engine.latent_width)
        last = len(engine.sigmas) - 1 if self.exit_step is None else self.exit_step
        grad = self.exit_step is not None and torch.is_grad_enabled()
        x = self._noise(shape)
        for i, (sigma, t) in enumerate(zip(engine.sigmas[: last + 1], engine.timesteps)):
            with torch.set_grad_enabled(grad and i == last):
                velocity = self._forward(x, t, positions)
                x0 = x - sigma.to(x.dtype) * velocity  # flow matching: v = noise - x0
            if i < last:
                x = self._renoise(x0, engine.sigmas[i + 1])
        return x0

    @torch.no_grad()
    def commit_chunk(self, x0: torch.Tensor, positions: list[int]) -> None:
        """Clean re-run at t = 0 that stores the chunk's K/V: the sink after a prefill, history after that."""
        slot = KVSlot.SINK if self.cache.num_frames(KVSlot.SINK) == 0 else KVSlot.HISTORY
        if self.context_noise:
            x0 = self._renoise(x0, torch.tensor(self.context_noise))
        self._forward(x0, 0.0, positions, write=slot)

    def next_latents(self) -> torch.Tensor:
        """The next chunk in latent space [B, C, chunk_frames, h, w]: denoise, then commit its clean K/V."""
        n = self.engine.config.chunk_frames
        if self.next_position + n > self.engine.pipe.transformer.config.rope_max_seq_len:
            self.reanchor()
        positions = list(range(self.next_position, self.next_position + n))
        self.cache.make_room(n)
        x0 = self.denoise_chunk(positions)
        self.commit_chunk(x0, positions)
        self.next_position += n
        return x0

    def rollout(self, chunks: int) -> torch.Tensor:
        """Self-forcing rollout (METHOD.md §3.7): `chunks` chunks generated on the model's own clean context,
        concatenated [B, C, chunks * chunk_frames, h, w]. No gradient crosses chunks (the cache holds detached K/V)."""
        return torch.cat([self.next_latents() for _ in range(chunks)], dim=2)

    # -- iteration --------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        if self._stopped.is_set() or (self.max_chunks is not None and self.chunk_index >= self.max_chunks):
            raise StopIteration
        timer = _Timer(self.engine.profile, self.engine.device)
        self._apply_pending_switch(timer)
        x0 = self.next_latents()
        timer.lap("transformer")
        with torch.no_grad():
            frames = media.tensor_to_frames(self.decoder.decode(x0))  # host copy: the one sync per chunk
        timer.lap("decode")
        chunk = Chunk(self.chunk_index, frames, self.garment_version, self.frames_out, x0, timer.laps)
        self.chunk_index += 1
        self.frames_out += len(frames)
        self.last_frame = frames[-1]
        return chunk

    def play(self, switches: dict[int, Image.Image | str]) -> Iterator[Chunk]:
        """The chunks, switching to `switches[k]` before chunk k (a scripted session: CLI `--switch`, eval)."""
        for chunk in self:
            yield chunk
            if chunk.index + 1 in switches:
                self.request_switch(switches[chunk.index + 1])

    def stop(self) -> None:
        """End the stream at the next chunk boundary (thread-safe)."""
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def request_switch(self, garment: Image.Image | str, prompt: str | None = None) -> list[str]:
        """Queue a garment switch for the next chunk boundary (thread-safe; the last request before a boundary
        wins). Returns the garment words removed from `prompt`, if one is given."""
        image = media.load_image(garment)
        removed: list[str] = []
        if prompt is not None:
            prompt, removed = filter_garment_words(prompt)
        with self._lock:
            self._pending = _SwitchRequest(image, prompt)
        return removed

    # -- switching ----------------------------------------------------------------------------------------
    def _apply_pending_switch(self, timer: "_Timer") -> None:
        with self._lock:
            request, self._pending = self._pending, None
        if request is None:
            return
        self.switch_garment(request.garment, request.prompt)
        timer.lap("switch")

    @torch.no_grad()
    def switch_garment(self, garment: Image.Image, prompt: str | None = None) -> None:
        """Apply a switch now (at a chunk boundary) with the engine's `SwitchMode`."""
        mode = self.engine.switch_mode
        if prompt is not None:
            self.prompt = prompt
            self.text_kv = self.engine.pipe.encode_text_kv(prompt, self.engine.config.max_text_tokens)
        self.garment_latent = self.engine.encode_garment(garment)
        if mode is not SwitchMode.REFRESH:
            self.withdraw_history_kv()
        if mode is SwitchMode.FULL:
            self.disentangle_reference()
        self.refresh_garment_kv()
        self.garment_version += 1

    @torch.no_grad()
    def reanchor(self) -> None:
        """Restart RoPE positions before they run past the table (a long stream without switches): the same
        rescheduling as a full switch, with the current garment. Positions then stay below the table forever."""
        logger.info("stream reached RoPE position %d: re-anchoring at position %d", self.next_position,
                    CONDITION_FRAMES)
        self.withdraw_history_kv()
        self.disentangle_reference()
        self.refresh_garment_kv()

    def refresh_garment_kv(self) -> None:
        """Garment KV refresh: replace REFERENCE/GARMENT by a joint prefill with the current garment latent."""
        self.prefill()

    def withdraw_history_kv(self) -> None:
        """Historical KV withdraw: drop SINK and HISTORY; the next chunk restarts at RoPE position 2 and
        becomes the new sink."""
        self.cache.clear([KVSlot.SINK, KVSlot.HISTORY])
        self._context[KVSlot.SINK].clear()
        self._context[KVSlot.HISTORY].clear()
        self.next_position = CONDITION_FRAMES

    def disentangle_reference(self) -> None:
        """Reference KV disentangle: the last frame the user saw, VAE-encoded as a single image, becomes the
        reference (it is already at the stream size, so it is not re-cropped)."""
        if self.last_frame is None:
            return
        pixels = media.image_to_tensor(media.frame_to_image(self.last_frame))
        self.reference_latent = self.engine.encode_pixels(pixels)

    # -- the one model call ---------------------------------------------------------------------------------
    def _forward(
        self,
        latents: torch.Tensor,
        t: float | torch.Tensor,
        positions: list[int],
        write: KVSlot | list[KVSlot] | None = None,
        read: tuple[KVSlot, ...] | None = None,
    ) -> torch.Tensor:
        timestep = embedding_timesteps(torch.as_tensor(t, device=latents.device).reshape(1).float())
        timestep = timestep.expand(latents.shape[0])
        if self.engine.use_kv_cache:
            return self.model(latents, timestep, self.text_embeds, frame_positions=positions, kv_cache=self.cache,
                              cache_write=write, cache_read=read, text_kv=self.text_kv).sample
        return self._forward_recompute(latents, timestep, positions, write, read)

    def _forward_recompute(self, latents, timestep, positions, write, read) -> torch.Tensor:
        """No K/V kept: run [visible clean context ; latents] under the block-causal mask, keep the last frames.

        Each stored frame carries the id of the call that wrote it, so context frames see exactly what they
        saw when they were committed; outputs equal the cached path until the window starts evicting (then
        the cache holds K/V computed with frames that are no longer visible, which recompute cannot see).
        """
        n = len(positions)
        self.cache.plan(positions, write=write, read=read)  # bookkeeping only: which frames stay visible
        context = [frame for slot in (tuple(KVSlot) if read is None else read) for frame in self._visible(slot)]
        frames = torch.cat([latent for latent, _, _ in context] + [latents], dim=2)
        t = torch.cat([torch.zeros(len(context), device=latents.device), timestep[0].expand(n)])
        t = t.expand(latents.shape[0], -1)
        ids = [group for _, _, group in context] + [self._group] * n
        mask = block_causal_mask(ids, self.cache.frame_tokens, device=latents.device)
        frame_positions = [pos for _, pos, _ in context] + positions
        out = self.model(frames, t, self.text_embeds, frame_positions=frame_positions, attention_mask=mask,
                         text_kv=self.text_kv)
        if write is not None:
            for i, slot in enumerate([write] * n if isinstance(write, KVSlot) else write):
                if slot in (KVSlot.REFERENCE, KVSlot.GARMENT):
                    self._context[slot].clear()
                self._context[slot].append((latents[:, :, i : i + 1], positions[i], self._group))
            self._group += 1
        return out.sample[:, :, -n:]

    def _visible(self, slot: KVSlot) -> list[tuple[torch.Tensor, int, int]]:
        kept = self.cache.positions(slot)
        self._context[slot] = [frame for frame in self._context[slot] if frame[1] in kept]
        return self._context[slot]

    def _renoise(self, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Fresh noise mixed in to level `sigma` (flow matching: x = (1 - sigma) x0 + sigma noise)."""
        sigma = sigma.to(x0.dtype)
        return (1 - sigma) * x0 + sigma * self._noise(x0.shape)

    def _noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        engine = self.engine
        return torch.randn(shape, generator=self.generator, device=engine.device, dtype=torch.float32).to(engine.dtype)


@torch.no_grad()
def sample_bidirectional(
    engine: StreamingEngine,
    reference: Image.Image | str,
    garment: Image.Image | str,
    prompt: str = "",
    *,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """The in-context teacher's way of sampling (METHOD.md §9): the whole clip at once, bidirectional attention,
    [reference, garment, video] at t = 0 / t, Euler flow-matching steps with classifier-free guidance on the text
    or (`guidance_condition="garment"`) on the garment.
    Returns uint8 frames [F, H, W, 3]. `bench` uses it as the non-streaming baseline."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config, pipe = engine.config, engine.pipe
    model = pipe.transformer
    steps = steps or config.teacher_steps
    guidance = config.teacher_guidance if guidance is None else guidance
    prompt, _ = filter_garment_words(prompt)
    cond_kv = pipe.encode_text_kv(prompt, config.max_text_tokens)
    reference_latent = engine.encode_reference(media.load_image(reference))
    condition = torch.cat([reference_latent, engine.encode_garment(media.load_image(garment))], dim=2)
    uncond_kv, uncond_condition = cond_kv, condition  # the unconditional branch drops the text or the garment
    if config.guidance_condition == "garment":
        blank = engine.encode_garment(media.blank_garment(config.width, config.height))
        uncond_condition = torch.cat([reference_latent, blank], dim=2)
    else:
        uncond_kv = pipe.encode_text_kv("", config.max_text_tokens)
    frames = config.teacher_latent_frames
    generator = torch.Generator(device=engine.device).manual_seed(seed)
    shape = (1, engine.codec.latent_channels, frames, engine.latent_height, engine.latent_width)
    x = torch.randn(shape, generator=generator, device=engine.device, dtype=torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=engine.device)
    for t in scheduler.timesteps:
        frame_t = torch.cat([torch.zeros(CONDITION_FRAMES, device=t.device), t.expand(frames)])[None]
        inputs = torch.cat([condition, x.to(engine.dtype)], dim=2)
        timestep = embedding_timesteps(frame_t)
        velocity = model(inputs, timestep, text_kv=cond_kv).sample[:, :, CONDITION_FRAMES:].float()
        if guidance != 1.0:
            uncond_inputs = torch.cat([uncond_condition, x.to(engine.dtype)], dim=2)
            uncond = model(uncond_inputs, timestep, text_kv=uncond_kv).sample[:, :, CONDITION_FRAMES:].float()
            velocity = uncond + guidance * (velocity - uncond)
        x = scheduler.step(velocity, t, x).prev_sample
    return media.tensor_to_frames(engine.codec.decode_video(x.to(engine.dtype)))


class _Timer:
    """Wall-clock laps for `bench`; synchronises the device only when profiling (never in normal streaming)."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.device = device
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter() if enabled else 0.0

    def lap(self, name: str) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now
