"""Pacing: a viewer plays the preset's frame rate however fast frames are made, so the producer waits rather than
fill the player's buffer with video a garment switch would have to play out first."""

from __future__ import annotations

import time
from collections.abc import Callable

#: Seconds of video the producer may be ahead of the viewer: one chunk being made while about one more plays,
#: so a slow chunk does not freeze the player, yet a switch shows about a second after it is asked for.
LEAD_SECONDS = 1.0


class Pacer:
    """How long the producer should wait before making the next chunk.

    The viewer's clock starts when the first chunk is produced and runs at `speed` x real time (0: no pacing).
    """

    def __init__(self, fps: int, speed: float = 1.0, lead: float = LEAD_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fps, self.speed, self.lead, self.clock = fps, speed, lead, clock
        self.video_seconds = 0.0
        self._start: float | None = None

    def produced(self, frames: int) -> None:
        if self._start is None:
            self._start = self.clock()
        self.video_seconds += frames / self.fps

    def delay(self) -> float:
        if self.speed <= 0 or self._start is None:
            return 0.0
        return max(0.0, self._start + (self.video_seconds - self.lead) / self.speed - self.clock())
