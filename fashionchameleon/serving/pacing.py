"""Pacing: a viewer plays the preset's frame rate however fast frames are made, so the producer waits rather than
fill the player's buffer with video a garment switch would have to play out first.

The lead (video made but not yet played) is what a switch waits behind, and what covers the making of the next chunk.
So it follows how long chunks take to make here and now: `LEAD_FACTOR` times the slowest of the last `LEAD_WINDOW`
chunks (waits for the model, shared with other streams, included), never less than `LEAD_MIN_SECONDS` (the way from
the engine to the screen: strip encoding, the event stream, the browser's decode). On a GPU that makes a chunk in a
tenth of its playback, a switch then waits behind about one chunk; on a busy CPU the lead grows instead of stalling.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

#: Lead never below this (seconds of video): the path from a finished chunk to the screen.
LEAD_MIN_SECONDS = 0.15
#: Lead as a multiple of the slowest recent making time: one for the next chunk, one for jitter.
LEAD_FACTOR = 2.0
#: Chunks whose making times set the lead.
LEAD_WINDOW = 8


class Pacer:
    """How long the producer should wait before making the next chunk.

    The viewer's clock starts when the first chunk is produced and runs at `speed` x real time (0: no pacing).
    """

    def __init__(self, fps: int, speed: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.fps, self.speed, self.clock = fps, speed, clock
        self.video_seconds = 0.0
        self._start: float | None = None
        self._making: deque[float] = deque(maxlen=LEAD_WINDOW)

    def produced(self, frames: int, making_seconds: float = 0.0) -> None:
        """A chunk of `frames` frames is made; it took `making_seconds` from its turn to its end."""
        if self._start is None:
            self._start = self.clock()
        self.video_seconds += frames / self.fps
        self._making.append(making_seconds)

    @property
    def lead(self) -> float:
        """Seconds of video to keep ahead of the viewer."""
        return max(LEAD_MIN_SECONDS, LEAD_FACTOR * max(self._making, default=0.0) * self.speed)

    def delay(self) -> float:
        if self.speed <= 0 or self._start is None:
            return 0.0
        return max(0.0, self._start + (self.video_seconds - self.lead) / self.speed - self.clock())
