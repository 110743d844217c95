"""ZeroGPU time: how much a stream asks for, and so how long a stream may be.

ZeroGPU lends the GPU for the duration a call asks for up front (`spaces.GPU(duration=...)`) and refuses calls that
ask for more than the visitor's per-call cap. Paced output lasts at least its playback time, so a stream's need is
its playback time with a margin, plus start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine import StreamingEngine

#: ZeroGPU time requested on top of the chunks: worker fork, moving the weights, prefill.
GPU_STARTUP_SECONDS = 20.0
#: Generation may run slower than real time (a busy or shared GPU); pacing makes it at least real time.
GPU_DURATION_MARGIN = 1.3
#: ZeroGPU refuses calls that ask for more than the visitor's per-call cap; stay well inside it.
MAX_GPU_SECONDS = 120.0


def chunk_seconds(engine: StreamingEngine) -> float:
    """Playback length of one (non-first) chunk of the streams `engine` makes."""
    stream = engine.config
    return engine.pipe.codec.pixel_frames(stream.chunk_frames, first=False) / stream.fps


def gpu_seconds(chunks: int, seconds_per_chunk: float) -> float:
    """GPU time to ask for a stream of `chunks` chunks."""
    return GPU_STARTUP_SECONDS + chunks * seconds_per_chunk * GPU_DURATION_MARGIN


def max_chunks(seconds_per_chunk: float) -> int:
    """The longest stream whose GPU time stays within `MAX_GPU_SECONDS`."""
    return int((MAX_GPU_SECONDS - GPU_STARTUP_SECONDS) / (seconds_per_chunk * GPU_DURATION_MARGIN))
