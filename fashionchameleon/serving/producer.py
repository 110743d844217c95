"""The GPU plane: per stream, an engine thread that generates paced chunks and an encoder thread that turns each into
an image strip for the page's player and appends it to the stream's H.264 mp4, so the GPU does not wait for either."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .. import media
from ..engine import Chunk, Stream, StreamingEngine
from ..errors import UserInputError
from .locks import ForkSafe
from .mailbox import STOP, SWITCH, Mailbox
from .pacing import Pacer
from .sessions import PRODUCER, ChunkFolders
from .states import DONE, STOPPED, STREAMING

logger = logging.getLogger(__name__)

#: Chunks buffered between the producer and Gradio: the engine makes the next chunk while Gradio muxes one (more would
#: only let production run further ahead of the viewer). At most QUEUE_CHUNKS + 1 chunks are made (or being made) and
#: not yet taken, wherever they are: generating, encoding or queued.
QUEUE_CHUNKS = 1
#: How often a waiting producer looks at its mailbox (a stop or a switch waits at most this long to be seen).
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class ChunkReady:
    """One chunk ready to show (picklable: it crosses the ZeroGPU worker's pipe)."""

    strip: bytes  # its frames stacked top to bottom as one image file (`media.encode_strip`)
    index: int
    frames: int
    garment_version: int
    switch_requests: int  # switch requests it follows (`Chunk.switch_requests`): fewer than asked = one is pending
    fps: float  # frames per second of busy time: generating or encoding, overlaps counted once, waits not counted
    state: str  # DONE on the last chunk, STOPPED if a stop came while it was made, else STREAMING
    removed_words: tuple[str, ...] = ()


@dataclass(frozen=True)
class StreamVideo:
    """The whole stream as one H.264 mp4, finished after its last chunk; the main plane deletes it once Gradio has
    copied it."""

    path: str


@dataclass(frozen=True)
class _Made:
    """A generated chunk on its way from the engine thread to the encoder thread."""

    chunk: Chunk
    state: str
    started: float  # time.monotonic() when its turn began (waiting for the model lock included)
    removed_words: tuple[str, ...]


_END = object()  # end of a thread's output


class Producer(ForkSafe):
    """Makes streams' chunks, an engine and an encoder thread per stream; model calls are serialised by a lock (one
    GPU, one model), so concurrent streams interleave chunk by chunk. Encoders are per stream, not shared: one
    stream's encoding never delays another's chunks, and a stream's threads end together.

    `pacing` is the playback speed output is paced to (see `Pacer`); `strip_format` is the image format of the strips
    (`media.STRIP_FORMATS`). Each thread is in `threads` while it runs, so that the owner can wait for it at shutdown.
    """

    def __init__(self, engine: StreamingEngine, mailbox: Mailbox, folders: ChunkFolders,
                 threads: set[threading.Thread], *, fps: int, pacing: float, strip_format: str) -> None:
        self.engine = engine
        self.mailbox = mailbox
        self.folders = folders
        self.threads = threads  # set.add/discard are atomic
        self.fps = fps
        self.pacing = pacing
        self.strip_format = strip_format
        super().__init__()

    def _reset_locks(self) -> None:
        self._model_lock = threading.Lock()

    def produce(self, stream_id: str, reference: str, garment: str, prompt: str, seed: int,
                chunks: int) -> Iterator[ChunkReady | StreamVideo]:
        """Make the stream's chunks, reading switch/stop from the mailbox at chunk boundaries, then its whole video.

        Runs in-process or in a forked ZeroGPU worker, so it takes only plain values and yields only `ChunkReady`s
        and, last, a `StreamVideo` (when any frame was made).
        The whole stream (KV cache included) lives inside this one call. The engine thread generates chunks and
        hands them to the encoder thread, which puts the strips into a small queue, so generation overlaps encoding
        and Gradio's muxing; closing this generator tells both threads to finish at their next boundary without
        waiting for them.
        """
        made: queue.SimpleQueue = queue.SimpleQueue()  # engine -> encoder; bounded by `slots`
        out: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)  # encoder -> here
        slots = threading.BoundedSemaphore(QUEUE_CHUNKS + 1)  # taken per chunk made, given back when it is taken here
        closed = threading.Event()
        name = stream_id[:8]
        threads = [
            threading.Thread(target=self._run, name=f"stream-{name}", daemon=True,
                             args=(stream_id, reference, garment, prompt, seed, chunks, made, slots, closed)),
            threading.Thread(target=self._encode, name=f"encode-{name}", daemon=True,
                             args=(stream_id, made, out, closed)),
        ]
        for thread in threads:
            self.threads.add(thread)
            thread.start()
        try:
            while (item := out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, ChunkReady):
                    slots.release()
                yield item
        finally:
            closed.set()

    def _run(self, stream_id: str, reference: str, garment: str, prompt: str, seed: int, chunks: int,
             made: queue.SimpleQueue, slots: threading.BoundedSemaphore, closed: threading.Event) -> None:
        """The engine thread: the stream's chunks into `made`, then its error if one came, then _END."""
        try:
            with self._model_lock:
                stream = self.engine.start(reference, garment, prompt, seed=seed, chunks=chunks)
            self._play(stream_id, stream, chunks, made, slots, closed)
        except UserInputError as error:
            made.put(error)
        except Exception as error:
            logger.exception("stream %s failed", stream_id[:8])
            made.put(error)
        finally:
            made.put(_END)
            self.threads.discard(threading.current_thread())

    def _play(self, stream_id: str, stream: Stream, chunks: int, made: queue.SimpleQueue,
              slots: threading.BoundedSemaphore, closed: threading.Event) -> None:
        """The per-chunk loop around the engine's: pace, deliver messages, generate, hand to the encoder."""
        pacer = Pacer(self.fps, self.pacing)
        while self._await_turn(stream_id, stream, pacer, slots, closed):
            started = time.monotonic()
            with self._model_lock:
                chunk = next(stream, None)
            if chunk is None:
                return
            self._deliver(stream_id, stream)  # a stop that came during this chunk makes it the last
            if chunk.index + 1 == chunks:
                state = DONE
            else:
                state = STOPPED if stream.stopped else STREAMING
            pacer.produced(chunk.num_frames, time.monotonic() - started)
            made.put(_Made(chunk, state, started, tuple(stream.removed_words)))
            if state != STREAMING:
                return

    def _encode(self, stream_id: str, made: queue.SimpleQueue, out: queue.Queue, closed: threading.Event) -> None:
        """The encoder thread: each chunk from `made` becomes a strip, handed over in order with the errors that come
        through `made`, and then goes into the stream's mp4, handed over once the stream has ended. It is the folder's
        last writer, so it releases the folder."""
        def consumer_gone() -> bool:
            return closed.is_set() or not self.mailbox.exists(stream_id)

        busy_seconds, busy_until, frames_made = 0.0, 0.0, 0
        video = media.VideoWriter(self.folders.video(stream_id), self.fps)
        try:
            while (item := made.get()) is not _END:
                frames = None
                if isinstance(item, _Made):
                    if consumer_gone():  # nobody will play it
                        return
                    chunk, frames = item.chunk, item.chunk.frames
                    strip = media.encode_strip(frames, self.strip_format)
                    # Busy time: the union of each chunk's span from its turn to its strip (the spans overlap).
                    finished = time.monotonic()
                    busy_seconds += finished - max(item.started, busy_until)
                    busy_until = finished
                    frames_made += chunk.num_frames
                    item = ChunkReady(strip, chunk.index, chunk.num_frames, chunk.garment_version,
                                      chunk.switch_requests, frames_made / busy_seconds, item.state,
                                      item.removed_words)
                # A strip is for a viewer; an error is for whoever still reads, as the engine thread used to offer it.
                if not _offer(out, item, consumer_gone if isinstance(item, ChunkReady) else closed.is_set):
                    return
                if frames is not None:  # after the hand-over: the viewer does not wait for the mp4
                    video.write(frames)
            video.close()
            if video.frames_written:
                _offer(out, StreamVideo(str(video.path)), consumer_gone)
        except Exception as error:
            logger.exception("stream %s: encoding failed", stream_id[:8])
            _offer(out, error, closed.is_set)
        finally:
            video.close()
            self.folders.release(stream_id, PRODUCER)
            _offer(out, _END, closed.is_set)
            self.threads.discard(threading.current_thread())

    def _await_turn(self, stream_id: str, stream: Stream, pacer: Pacer, slots: threading.BoundedSemaphore,
                    closed: threading.Event) -> bool:
        """Wait until the pacer lets the next chunk start and a slot is free (production stays bounded ahead of the
        consumer), delivering messages meanwhile (a switch that comes while waiting lands on that next chunk). False
        when the stream was stopped or its consumer left."""
        while True:
            self._deliver(stream_id, stream)
            if stream.stopped or closed.is_set():
                return False
            delay = pacer.delay()
            if delay > 0:
                closed.wait(min(delay, POLL_SECONDS))
            elif slots.acquire(timeout=POLL_SECONDS):
                return True

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
