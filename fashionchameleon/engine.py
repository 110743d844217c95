"""The streaming engine: user-facing streams over the rollout core, with garment switching at chunk boundaries.

One `StreamingEngine` per loaded pipeline; one `Stream` per user stream. A `Stream` wraps a `rollout.Rollout`
(the KV cache and the paper's operations) with what a viewer needs: the streaming VAE decoder (one decoder state
for the whole stream, so the video has no cut at a switch), iteration over `Chunk`s, and thread-safe `request_switch`
and `stop`. The CLI, `bench`, `eval`, the pipeline's `__call__` and the app all iterate a `Stream`.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from . import media
from .models.text import filter_garment_words
from .rollout import Rollout, StreamConfig

if TYPE_CHECKING:
    from .pipeline import FashionChameleonPipeline

logger = logging.getLogger(__name__)


#: Chunks of a scripted video when none are asked for: 7 x 3 latent frames = 81 frames with the Wan VAE, the paper's clip.
DEFAULT_CHUNKS = 7


class SwitchMode(str, enum.Enum):
    """Which KV-rescheduling primitives a garment switch applies (the paper's ablation, docs/method.md §7)."""

    REFRESH = "refresh"  # garment KV refresh only: the paper shows the garment does not change
    REFRESH_WITHDRAW = "refresh+withdraw"  # + historical KV withdraw: switches, but motion jumps
    FULL = "full"  # + reference KV disentangle: the paper's method (default)


@dataclass
class Chunk:
    """One generated chunk: its pixel frames and where it sits in the stream.

    The frames may still be on their way to the host (a CUDA copy the engine does not wait for, so that it can go
    on to the next chunk): `frames` waits for that copy, `num_frames` never does.
    """

    index: int
    host_frames: torch.Tensor = field(repr=False)  # uint8 [F, H, W, 3] on the host, pinned if copied from CUDA
    garment_version: int
    first_frame: int  # index of frames[0] in the whole stream
    switch_requests: int  # `request_switch` calls this chunk follows: all taken at its boundary or before
    timings: dict[str, float] = field(default_factory=dict)  # seconds; filled when the engine profiles
    copied: torch.cuda.Event | None = field(default=None, repr=False)  # recorded after the copy; None: no copy

    @property
    def num_frames(self) -> int:
        return self.host_frames.shape[0]

    @property
    def frames(self) -> np.ndarray:
        """uint8 [F, H, W, 3]; waits for the host copy if it is still in flight."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host_frames.numpy()


def _copy_to_host(frames: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying device `frames` to the host without waiting; the event, recorded after the copy on the stream
    that made the frames, says when it is done (None where the copy is already done). Pinned memory makes a CUDA
    copy truly asynchronous; torch's host allocator caches the pinned blocks, so a stream reuses them chunk after
    chunk. A blocking event lets the waiting thread sleep instead of spinning a core the encoder could use."""
    if frames.device.type != "cuda":
        return frames.cpu(), None
    host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
    host.copy_(frames, non_blocking=True)
    copied = torch.cuda.Event(blocking=True)
    copied.record(torch.cuda.current_stream(frames.device))
    return host, copied


@dataclass
class _SwitchRequest:
    garment: Image.Image
    prompt: str | None


class StreamingEngine:
    """Holds the pipeline and the stream settings (default: the pipeline's); `start` opens a stream.

    `rollout_class` is the core a stream runs on (`bench` swaps in its recompute baseline).
    """

    rollout_class: type[Rollout] = Rollout

    def __init__(
        self,
        pipe: FashionChameleonPipeline,
        stream: StreamConfig | None = None,
        *,
        switch_mode: SwitchMode | str = SwitchMode.FULL,
        profile: bool = False,
    ) -> None:
        self.pipe = pipe
        self.config = stream or pipe.stream
        self.switch_mode = SwitchMode(switch_mode)
        self.profile = profile
        self.sigmas = pipe.student_sigmas(self.config.denoising_steps)
        factor = pipe.codec.spatial_factor
        if self.config.height % factor or self.config.width % factor:
            raise ValueError(f"stream size {self.config.width}x{self.config.height} must be a multiple of {factor}")

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

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
        pipe, config = self.pipe, self.config
        with torch.no_grad():
            text_kv = pipe.encode_text_kv(prompt, config.max_text_tokens)
            reference_latent, garment_latent = pipe.encode_reference(reference, config), pipe.encode_garment(garment,
                                                                                                            config)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        rollout = self.rollout_class(pipe.transformer, config, self.sigmas, reference_latent, garment_latent, text_kv,
                                     generator)
        return Stream(self, rollout, chunks, prompt=prompt, removed_words=removed)


class Stream:
    """One user's stream: iterate it for `Chunk`s; `request_switch` and `stop` may come from other threads."""

    def __init__(self, engine: StreamingEngine, rollout: Rollout, chunks: int | None = None, *, prompt: str = "",
                 removed_words: list[str] | None = None) -> None:
        self.engine = engine
        self.rollout = rollout
        self.prompt, self.removed_words = prompt, removed_words or []
        self.max_chunks = chunks
        self.chunk_index = 0
        self.garment_version = 0
        self.frames_out = 0
        self.switch_requests_taken = 0  # requests taken at boundaries so far (several at one boundary: the last wins)
        self._requests: queue.SimpleQueue[_SwitchRequest] = queue.SimpleQueue()  # thread-safe, also without a GIL
        self._stopped = threading.Event()
        self.decoder = engine.pipe.codec.stream_decoder()
        self.last_frame: torch.Tensor | None = None  # uint8 [H, W, 3], on the device: the last frame shown

    # -- iteration --------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        if self._stopped.is_set() or (self.max_chunks is not None and self.chunk_index >= self.max_chunks):
            raise StopIteration
        timer = _Timer(self.engine.profile, self.engine.device)
        request = self._take_switch_request()
        if request is not None:
            self.switch_garment(request.garment, request.prompt)
            timer.lap("switch")
        if self.rollout.chunk_frames > self.rollout.positions_left:
            self.reanchor()
        x0 = self.rollout.next_latents()
        timer.lap("transformer")
        with torch.no_grad():
            frames = media.quantize(self.decoder.decode(x0))  # on the device: no host sync in the engine
        host_frames, copied = _copy_to_host(frames)
        timer.lap("decode")
        chunk = Chunk(self.chunk_index, host_frames, self.garment_version, self.frames_out, self.switch_requests_taken,
                      timer.laps, copied)
        self.chunk_index += 1
        self.frames_out += chunk.num_frames
        self.last_frame = frames[-1].clone()  # a copy, so that the rest of the chunk's device frames can be freed
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

    # -- switching ----------------------------------------------------------------------------------------------
    def request_switch(self, garment: Image.Image | str, prompt: str | None = None) -> list[str]:
        """Queue a garment switch for the next chunk boundary (thread-safe; the last request before a boundary
        wins). Returns the garment words removed from `prompt`, if one is given."""
        image = media.load_image(garment)
        removed: list[str] = []
        if prompt is not None:
            prompt, removed = filter_garment_words(prompt)
        self._requests.put(_SwitchRequest(image, prompt))
        return removed

    def _take_switch_request(self) -> _SwitchRequest | None:
        """The newest request since the last boundary (it supersedes older ones), or None. A request put while this
        drains is either taken now or left for the next boundary, never lost."""
        request = None
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return request
            self.switch_requests_taken += 1

    @torch.no_grad()
    def switch_garment(self, garment: Image.Image, prompt: str | None = None) -> None:
        """Apply a switch now (at a chunk boundary) with the engine's `SwitchMode`."""
        mode, pipe, config = self.engine.switch_mode, self.engine.pipe, self.engine.config
        if prompt is not None:
            self.prompt = prompt
            self.rollout.text = pipe.encode_text_kv(prompt, config.max_text_tokens)
        garment_latent = pipe.encode_garment(garment, config)
        if mode is not SwitchMode.REFRESH:
            self.rollout.withdraw_history_kv()
        if mode is SwitchMode.FULL:
            self.disentangle_reference()
        self.rollout.refresh_garment_kv(garment_latent)
        self.garment_version += 1

    def disentangle_reference(self) -> None:
        """Reference KV disentangle: the last frame the user saw, VAE-encoded as a single image, becomes the
        reference (it is already at the stream size, so it is not re-cropped). Takes effect at the next prefill."""
        if self.last_frame is None:
            return
        pixels = media.frame_to_tensor(self.last_frame)  # on the device: a switch does not wait for the host
        self.rollout.replace_reference(self.engine.pipe.encode_pixels(pixels))

    @torch.no_grad()
    def reanchor(self) -> None:
        """Restart RoPE positions before they run past the table (a long stream without switches): the same
        rescheduling as a full switch, with the current garment. Positions then stay below the table forever."""
        logger.info("stream reached RoPE position %d: re-anchoring", self.rollout.next_position)
        self.rollout.withdraw_history_kv()
        self.disentangle_reference()
        self.rollout.refresh_garment_kv()


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
