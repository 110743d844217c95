"""The GPU plane: an engine thread per stream, paced, encoding each chunk to an H.264 mp4 segment."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .. import media
from ..engine import Stream, StreamingEngine
from ..errors import UserInputError
from .locks import ForkSafe
from .mailbox import STOP, SWITCH, Mailbox
from .pacing import Pacer
from .sessions import PRODUCER, ChunkFolders
from .states import DONE, STOPPED, STREAMING

logger = logging.getLogger(__name__)

#: Chunks buffered between the engine thread and Gradio: the engine makes the next chunk while Gradio muxes one
#: (more would only let production run further ahead of the viewer).
QUEUE_CHUNKS = 1
#: How often a waiting producer looks at its mailbox (a stop or a switch waits at most this long to be seen).
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class ChunkReady:
    """One encoded chunk (picklable: it crosses the ZeroGPU worker's pipe)."""

    path: str  # H.264 mp4 segment; the main plane deletes it once Gradio has copied it
    index: int
    frames: int
    garment_version: int
    fps: float  # frames generated per second of generation + encoding time (not counting pacing waits)
    state: str  # DONE on the last chunk, STOPPED if a stop came while it was made, else STREAMING
    removed_words: tuple[str, ...] = ()


_END = object()  # end of the engine thread's output


class Producer(ForkSafe):
    """Makes streams' chunks, one engine thread per stream; model calls are serialised by a lock (one GPU, one
    model), so concurrent streams interleave chunk by chunk.

    `pacing` is the playback speed output is paced to (see `Pacer`). Each engine thread is in `threads` while it
    runs, so that the owner can wait for it at shutdown.
    """

    def __init__(self, engine: StreamingEngine, mailbox: Mailbox, folders: ChunkFolders,
                 threads: set[threading.Thread], *, fps: int, pacing: float) -> None:
        self.engine = engine
        self.mailbox = mailbox
        self.folders = folders
        self.threads = threads  # set.add/discard are atomic
        self.fps = fps
        self.pacing = pacing
        super().__init__()

    def _reset_locks(self) -> None:
        self._model_lock = threading.Lock()

    def produce(self, stream_id: str, reference: str, garment: str, prompt: str, seed: int,
                chunks: int) -> Iterator[ChunkReady]:
        """Make the stream's chunks, reading switch/stop from the mailbox at chunk boundaries.

        Runs in-process or in a forked ZeroGPU worker, so it takes only plain values and yields only `ChunkReady`s.
        The whole stream (KV cache included) lives inside this one call. An engine thread makes chunks into a small
        queue so generation overlaps Gradio's muxing; closing this generator tells the thread to finish at its next
        boundary without waiting for it.
        """
        out: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        closed = threading.Event()
        thread = threading.Thread(target=self._run, name=f"stream-{stream_id[:8]}", daemon=True,
                                  args=(stream_id, reference, garment, prompt, seed, chunks, out, closed))
        self.threads.add(thread)
        thread.start()
        try:
            while (item := out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            closed.set()

    def _run(self, stream_id: str, reference: str, garment: str, prompt: str, seed: int, chunks: int,
             out: queue.Queue, closed: threading.Event) -> None:
        try:
            with self._model_lock:
                stream = self.engine.start(reference, garment, prompt, seed=seed, chunks=chunks)
            self._play(stream_id, stream, chunks, out, closed)
        except UserInputError as error:
            _offer(out, error, closed.is_set)
        except Exception as error:
            logger.exception("stream %s failed", stream_id[:8])
            _offer(out, error, closed.is_set)
        finally:
            self.folders.release(stream_id, PRODUCER)
            _offer(out, _END, closed.is_set)
            self.threads.discard(threading.current_thread())

    def _play(self, stream_id: str, stream: Stream, chunks: int, out: queue.Queue, closed: threading.Event) -> None:
        """The per-chunk loop around the engine's: pace, deliver messages, generate, encode, hand over."""
        folder = self.folders.path(stream_id)
        pacer = Pacer(self.fps, self.pacing)

        def consumer_gone() -> bool:
            return closed.is_set() or not self.mailbox.exists(stream_id)

        busy_seconds, frames_made = 0.0, 0
        while self._await_turn(stream_id, stream, pacer, closed):
            started = time.monotonic()
            with self._model_lock:
                chunk = next(stream, None)
            if chunk is None:
                return
            path = media.encode_segment(chunk.frames, folder / f"{chunk.index:05d}.mp4", self.fps)
            busy_seconds += time.monotonic() - started
            frames_made += len(chunk.frames)
            self._deliver(stream_id, stream)  # a stop that came during this chunk makes it the last
            if chunk.index + 1 == chunks:
                state = DONE
            else:
                state = STOPPED if stream.stopped else STREAMING
            pacer.produced(len(chunk.frames))
            ready = ChunkReady(str(path), chunk.index, len(chunk.frames), chunk.garment_version,
                               frames_made / busy_seconds, state, tuple(stream.removed_words))
            if not _offer(out, ready, consumer_gone) or state != STREAMING:
                return

    def _await_turn(self, stream_id: str, stream: Stream, pacer: Pacer, closed: threading.Event) -> bool:
        """Wait until the pacer lets the next chunk start, delivering messages meanwhile (a switch that comes
        while waiting lands on that next chunk). False when the stream was stopped or its consumer left."""
        while True:
            self._deliver(stream_id, stream)
            if stream.stopped or closed.is_set():
                return False
            delay = pacer.delay()
            if delay <= 0:
                return True
            closed.wait(min(delay, POLL_SECONDS))

    def _deliver(self, stream_id: str, stream: Stream) -> None:
        if not self.mailbox.exists(stream_id):
            stream.stop()
            return
        for message in self.mailbox.drain(stream_id):
            if message.kind == STOP:
                stream.stop()
            elif message.kind == SWITCH:
                try:
                    stream.request_switch(message.garment)
                except UserInputError as error:  # checked by the main plane; only a vanished file gets here
                    logger.warning("stream %s: switch ignored: %s", stream_id[:8], error)


def _offer(out: queue.Queue, item: object, give_up: Callable[[], bool]) -> bool:
    """Put `item` unless `give_up()` says the consumer has left (a full queue would block the thread for good)."""
    while not give_up():
        try:
            out.put(item, timeout=POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False
