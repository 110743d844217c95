"""Serving streams to many browser sessions: everything behind the Gradio page that is not UI.

Two planes (reference/gradio-streaming.md §7):

- The **main plane** (`StreamService.stream`, `switch`, `stop`, `close_session`) runs in the Gradio server process.
  It validates input, keeps one stream per session (keyed by Gradio's session hash), turns chunks into status
  dicts and deletes files once Gradio has taken them.
- The **GPU plane** (`StreamService.produce`) runs the engine. Under ZeroGPU, `spaces.GPU` runs it in a *forked*
  worker, so it shares nothing in memory with the main plane after the fork: it gets plain arguments, yields
  picklable `ChunkReady`s, and reads switch/stop requests from a `Mailbox` of files that both processes see.
  Off ZeroGPU the same code runs in-process, unchanged.

Pacing: a viewer plays the preset's frame rate however fast frames are made. Video made far ahead of the
playhead sits in the player's buffer, and a garment switch only shows once that buffer has played out, so the
producer waits while it is more than `LEAD_SECONDS` of video ahead of a viewer who started at the first chunk.

Cleanup: the main plane deletes each chunk file once Gradio has copied it. When a stream's consumer leaves early
(cancel, disconnect, unload) it removes the stream's mailbox, which the producer reads as stop, and the two
planes hand the chunk folder over with marker files so whichever finishes second deletes it; nobody waits.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from . import media
from .engine import Stream, StreamingEngine
from .errors import UserInputError
from .presets import Preset, load_preset

logger = logging.getLogger(__name__)

#: Seconds of video the producer may be ahead of the viewer: one chunk being made while about one more plays,
#: so a slow chunk does not freeze the player, yet a switch shows about a second after it is asked for.
LEAD_SECONDS = 1.0
#: How often a waiting producer looks at its mailbox (a stop or a switch waits at most this long to be seen).
POLL_SECONDS = 0.05
#: Chunks buffered between the engine thread and Gradio: the engine makes the next chunk while Gradio muxes one
#: (more would only let production run further ahead of the viewer).
QUEUE_CHUNKS = 1
#: ZeroGPU time requested on top of the chunks: worker fork, moving the weights, prefill.
GPU_STARTUP_SECONDS = 20.0
#: Generation may run slower than real time (a busy or shared GPU); pacing makes it at least real time.
GPU_DURATION_MARGIN = 1.3
#: ZeroGPU refuses calls that ask for more than the visitor's per-call cap; stay well inside it.
MAX_GPU_SECONDS = 120.0
#: Characters of English per text token, roughly: the preset's token window times this bounds the prompt (text past
#: the window would be cut silently).
CHARS_PER_TOKEN = 4
#: How long shutdown waits for an engine thread to finish its chunk.
SHUTDOWN_SECONDS = 10.0
#: torch.Generator seeds are unsigned 64-bit; the UI and API take the everyday 32-bit range.
MAX_SEED = 2**32 - 1

_MODE_NAMES = {"CMYK": "is CMYK", "L": "is greyscale", "1": "is black and white", "I;16": "is 16-bit greyscale"}

SWITCH, STOP = "switch", "stop"
PRODUCER, CONSUMER = "producer", "consumer"
STREAMING, SWITCHING, STOPPING, STOPPED, DONE, IDLE = "streaming", "switching", "stopping", "stopped", "done", "idle"


# -- the mailbox: control messages that cross a fork ---------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    kind: str  # SWITCH or STOP
    garment: str | None = None  # image path for SWITCH (an upload in Gradio's cache: same container, same files)


class Mailbox:
    """Control messages for running streams, one folder per stream: `<root>/<box>/<time_ns>-<pid>-<n>.json`.

    Files rather than memory because the reader may be a ZeroGPU worker forked before the box existed: a dict or
    an Event in the server process is invisible there, while a folder is the same in both and survives worker
    re-forks. Each message is written to a temporary name and renamed (atomic), so a reader never sees half a
    message; names sort by posting time. A removed box means its stream's consumer has gone.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._counter = itertools.count()

    def open(self, box: str) -> None:
        (self.root / box).mkdir()

    def exists(self, box: str) -> bool:
        return (self.root / box).is_dir()

    def post(self, box: str, message: Message) -> None:
        """Raises FileNotFoundError when the box is gone (the stream has ended)."""
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._counter):06d}.json"
        tmp = self.root / box / f".{name}.part"
        tmp.write_text(json.dumps(asdict(message)))
        os.replace(tmp, tmp.with_name(name))

    def drain(self, box: str) -> list[Message]:
        """All messages in posting order, each delivered once; none if the box is gone."""
        messages = []
        try:
            names = sorted(n for n in os.listdir(self.root / box) if n.endswith(".json") and not n.startswith("."))
        except FileNotFoundError:
            return messages
        for name in names:
            path = self.root / box / name
            try:
                messages.append(Message(**json.loads(path.read_text())))
                path.unlink()
            except FileNotFoundError:  # the box was removed meanwhile
                break
        return messages

    def remove(self, box: str) -> None:
        shutil.rmtree(self.root / box, ignore_errors=True)


# -- pacing ------------------------------------------------------------------------------------------------------
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


# -- what the GPU plane hands to the main plane ----------------------------------------------------------------------
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


@dataclass
class _Session:
    stream_id: str
    status: dict = field(default_factory=dict)


_END = object()  # end of the engine thread's output
_SERVICES: weakref.WeakSet[StreamService] = weakref.WeakSet()


def _reset_locks_after_fork() -> None:
    for service in _SERVICES:
        service._reset_locks()


os.register_at_fork(after_in_child=_reset_locks_after_fork)


class StreamService:
    """One loaded model serving many sessions; one stream per session.

    `pacing` is the playback speed output is paced to (1.0: real time; 0: as fast as possible, e.g. for
    benchmarks). Streams may run concurrently; model calls are serialised by a lock (one GPU, one model).
    """

    def __init__(self, preset: Preset, engine: StreamingEngine, *, root: str | os.PathLike | None = None,
                 pacing: float = 1.0) -> None:
        self.preset = preset
        self.engine = engine
        self.pacing = pacing
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="fashionchameleon-"))
        self.mailbox = Mailbox(self.root / "inbox")
        self.chunk_root = self.root / "chunks"
        self.chunk_root.mkdir(parents=True, exist_ok=True)
        self._sessions: dict[str, _Session] = {}
        self._threads: set[threading.Thread] = set()  # engine threads in this process (set.add/discard are atomic)
        self._reset_locks()
        _SERVICES.add(self)

    def _reset_locks(self) -> None:
        """Fresh locks, also in a forked ZeroGPU worker: a fork copies each lock in whatever state some other
        thread of the server held it, and a copy taken mid-request would stay locked in the worker for good."""
        self._lock = threading.Lock()  # sessions (main plane)
        self._model_lock = threading.Lock()  # one model call at a time (GPU plane)

    @classmethod
    def load(cls, preset_name: str, checkpoint: str | None = None, device: str | None = None,
             **kwargs) -> "StreamService":
        preset, pipe = load_preset(preset_name, checkpoint=checkpoint, device=device)
        return cls(preset, StreamingEngine(pipe, preset.stream), **kwargs)

    # -- sizes the UI and the GPU budget need -------------------------------------------------------------------
    @property
    def fps(self) -> int:
        return self.preset.stream.fps

    @property
    def chunk_seconds(self) -> float:
        """Playback length of one (non-first) chunk."""
        return self.engine.codec.pixel_frames(self.preset.stream.chunk_frames, first=False) / self.fps

    @property
    def max_chunks(self) -> int:
        return int((MAX_GPU_SECONDS - GPU_STARTUP_SECONDS) / (self.chunk_seconds * GPU_DURATION_MARGIN))

    @property
    def max_prompt_chars(self) -> int:
        return self.preset.stream.max_text_tokens * CHARS_PER_TOKEN

    def gpu_duration(self, stream_id: str, reference: str, garment: str, prompt: str, seed: int, chunks: int) -> float:
        """Seconds of GPU to ask ZeroGPU for `produce(...)` (same arguments): paced output lasts at least its
        playback time, so chunks x chunk length, with a margin, plus start-up."""
        return GPU_STARTUP_SECONDS + chunks * self.chunk_seconds * GPU_DURATION_MARGIN

    # -- input checks (main plane, before any GPU time is spent) ---------------------------------------------------
    def check_image(self, path: str | None, what: str) -> list[str]:
        """Validate an uploaded image (fashionchameleon.media decides); returns notes on conversions made."""
        if not path:
            raise UserInputError(f"Add a {what} first.")
        media.load_image(path, name=f"the {what}").close()
        with Image.open(path) as original:  # header only: load_image has decoded it safely
            mode, transparent = original.mode, original.has_transparency_data
        if transparent:
            return [f"The {what} has transparency; transparent areas were filled with white."]
        if mode in ("RGB", "P"):
            return []
        return [f"The {what} {_MODE_NAMES.get(mode, f'is in mode {mode}')}; it was converted to RGB."]

    def check_request(self, prompt: str | None, chunks: float | None, seed: float | None) -> tuple[str, int, int]:
        prompt = prompt or ""
        if len(prompt) > self.max_prompt_chars:
            raise UserInputError(f"The prompt is {len(prompt)} characters long; the limit is {self.max_prompt_chars}.")
        if chunks is None or int(chunks) != chunks or not 1 <= chunks <= self.max_chunks:
            raise UserInputError(f"Length must be a whole number of chunks from 1 to {self.max_chunks}, got {chunks}.")
        if seed is None or int(seed) != seed or not 0 <= seed <= MAX_SEED:
            raise UserInputError(f"Seed must be a whole number from 0 to {MAX_SEED}, got {seed}.")
        return prompt, int(chunks), int(seed)

    # -- main plane ------------------------------------------------------------------------------------------
    def stream(
        self,
        session: str,
        reference: str,
        garment: str,
        prompt: str,
        chunks: int,
        seed: int,
        producer: Callable[..., Iterator[ChunkReady]] | None = None,
    ) -> Iterator[tuple[str, dict]]:
        """Run one stream for `session` and yield (segment path, status) per chunk.

        `producer` is `produce` as the app wrapped it (`spaces.GPU`); call this inside the Gradio handler so the
        ZeroGPU scheduler sees the user's request. Inputs must have passed `check_image`/`check_request`. A new
        stream stops the session's previous one. Each segment file is deleted when the next is asked for (Gradio
        has copied it by then). Leaving early (disconnect, cancel) only removes the mailbox, which the producer
        reads as stop, and marks the folder: nothing here waits for the engine, since this cleanup runs on the
        server's event loop (under ZeroGPU, `spaces` itself waits for the worker's current chunk).
        """
        stream_id = self._open(session)
        items = (producer or self.produce)(stream_id, reference, garment, prompt, seed, chunks)
        finished = False
        previous: str | None = None
        try:
            for ready in items:
                if previous is not None:
                    Path(previous).unlink(missing_ok=True)
                status = self._status(ready, chunks)
                with self._lock:
                    if session in self._sessions and self._sessions[session].stream_id == stream_id:
                        self._sessions[session].status = status
                yield ready.path, status
                previous = ready.path
            finished = True
        except Exception:
            finished = True  # the producer raised, so it has ended
            raise
        finally:
            self.mailbox.remove(stream_id)
            items.close()
            self._finish(session, stream_id, finished)

    def switch(self, session: str, garment: str) -> dict:
        """Ask the session's stream to switch to `garment` at its next chunk; returns the status."""
        with self._lock:
            current = self._sessions.get(session)
        if current is None:
            raise UserInputError("No stream is running in this session; press Generate first.")
        try:
            self.mailbox.post(current.stream_id, Message(SWITCH, garment=garment))
        except FileNotFoundError:
            raise UserInputError("The stream has just ended; press Generate to start a new one.") from None
        return {**current.status, "state": SWITCHING}

    def stop(self, session: str) -> dict:
        """Ask the session's stream to end at its next chunk boundary; the status says IDLE if none runs."""
        with self._lock:
            current = self._sessions.get(session)
        if current is None:
            return {"state": IDLE}
        try:
            self.mailbox.post(current.stream_id, Message(STOP))
        except FileNotFoundError:
            return {"state": IDLE}
        return {**current.status, "state": STOPPING}

    def close_session(self, session: str) -> None:
        """The browser left (Gradio's unload): stop its stream. The stream's own handler deletes its files."""
        self.stop(session)

    def active_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def shutdown(self) -> None:
        """Stop every stream, let in-process engine threads finish their chunk (a thread killed inside torch at
        interpreter exit aborts the process), and delete all temporary files. For when the server goes away."""
        with self._lock:
            streams = [s.stream_id for s in self._sessions.values()]
        threads = self._threads.copy()
        for stream_id in streams:
            self.mailbox.remove(stream_id)
        for thread in threads:
            thread.join(SHUTDOWN_SECONDS)
        shutil.rmtree(self.root, ignore_errors=True)

    def _open(self, session: str) -> str:
        stream_id = uuid.uuid4().hex  # server-made: session hashes come from clients and are no file names
        self.mailbox.open(stream_id)
        (self.chunk_root / stream_id).mkdir()
        with self._lock:
            previous = self._sessions.get(session)
            self._sessions[session] = _Session(stream_id)
        if previous is not None:
            logger.info("session %s started a new stream; stopping %s", session[:8], previous.stream_id[:8])
            self.mailbox.remove(previous.stream_id)
        return stream_id

    def _finish(self, session: str, stream_id: str, finished: bool) -> None:
        with self._lock:
            if session in self._sessions and self._sessions[session].stream_id == stream_id:
                del self._sessions[session]
        if finished:
            shutil.rmtree(self.chunk_root / stream_id, ignore_errors=True)
        else:
            self._release(stream_id, CONSUMER)

    def _release(self, stream_id: str, party: str) -> None:
        """The producer writes a stream's chunk folder and the consumer reads it; whoever is done second deletes
        it. Each marks itself done before looking for the other's mark, so at least one of them sees both."""
        folder = self.chunk_root / stream_id
        try:
            (folder / f".{party}-done").touch()
        except FileNotFoundError:
            return
        other = CONSUMER if party == PRODUCER else PRODUCER
        if (folder / f".{other}-done").exists():
            shutil.rmtree(folder, ignore_errors=True)

    def _status(self, ready: ChunkReady, chunks: int) -> dict:
        return {
            "state": ready.state,
            "chunk": ready.index,
            "chunks": chunks,
            "frames": ready.frames,
            "garment_version": ready.garment_version,
            "fps": round(ready.fps, 1),
            "playback_fps": self.fps,
            "removed_words": list(ready.removed_words),
            "model": self.preset.name,
        }

    # -- GPU plane ---------------------------------------------------------------------------------------------
    def produce(self, stream_id: str, reference: str, garment: str, prompt: str, seed: int,
                chunks: int) -> Iterator[ChunkReady]:
        """The GPU plane: make the stream's chunks, reading switch/stop from the mailbox at chunk boundaries.

        Runs in-process or in a forked ZeroGPU worker (`spaces.GPU`), so it takes only plain values and yields
        only `ChunkReady`s. The whole stream (KV cache included) lives inside this one call. An engine thread
        makes chunks into a small queue so generation overlaps Gradio's muxing; closing this generator tells the
        thread to finish at its next boundary without waiting for it.
        """
        out: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
        closed = threading.Event()
        thread = threading.Thread(target=self._run, name=f"stream-{stream_id[:8]}", daemon=True,
                                  args=(stream_id, reference, garment, prompt, seed, chunks, out, closed))
        self._threads.add(thread)
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
            self._release(stream_id, PRODUCER)
            _offer(out, _END, closed.is_set)
            self._threads.discard(threading.current_thread())

    def _play(self, stream_id: str, stream: Stream, chunks: int, out: queue.Queue, closed: threading.Event) -> None:
        """The per-chunk loop around the engine's: pace, deliver messages, generate, encode, hand over."""
        folder = self.chunk_root / stream_id
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
