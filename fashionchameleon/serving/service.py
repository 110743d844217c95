"""`StreamService`: the one object the app talks to, over checks, budget, sessions and the producer."""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..engine import StreamingEngine
from ..errors import UserInputError
from ..presets import Preset, load_preset
from . import budget, checks
from .mailbox import STOP, SWITCH, Mailbox, Message
from .producer import ChunkReady, Producer, StreamVideo
from .sessions import ChunkFolders, SessionRegistry, SessionStream
from .states import DONE, IDLE, STOPPED, STOPPING, STREAMING, SWITCHING

#: How long shutdown waits for an engine thread to finish its chunk.
SHUTDOWN_SECONDS = 10.0
#: Characters of the stream id the page's player gets, to tell one stream's chunks from the next one's.
STREAM_TAG_CHARS = 8


class StreamService:
    """One loaded model serving many sessions; one stream per session.

    `pacing` is the playback speed output is paced to (1.0: real time; 0: as fast as possible, e.g. for
    benchmarks). Streams may run concurrently; model calls are serialised (one GPU, one model). Temporary files
    live under `root` (a fresh temporary folder by default).
    """

    def __init__(self, preset: Preset, engine: StreamingEngine, *, root: str | os.PathLike | None = None,
                 pacing: float = 1.0) -> None:
        self.preset = preset
        self.engine = engine
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="fashionchameleon-"))
        self.mailbox = Mailbox(self.root / "inbox")
        self.chunk_root = self.root / "chunks"
        folders = ChunkFolders(self.chunk_root)
        self.sessions = SessionRegistry(self.mailbox, folders)
        self._decodes = checks.DecodeSlots()  # image checks of all sessions share these
        self._threads: set[threading.Thread] = set()  # engine and encoder threads in this process
        self._producer = Producer(engine, self.mailbox, folders, self._threads, fps=self.fps, pacing=pacing,
                                  strip_format=preset.serving.strip_format)

    @classmethod
    def load(cls, preset_name: str, checkpoint: str | None = None, device: str | None = None,
             **kwargs: Any) -> StreamService:
        """Load a preset's model; `kwargs` go to the constructor."""
        preset, pipe = load_preset(preset_name, checkpoint=checkpoint, device=device)
        return cls(preset, StreamingEngine(pipe), **kwargs)

    # -- sizes the UI and the GPU budget need -------------------------------------------------------------------
    @property
    def fps(self) -> int:
        return self.engine.config.fps

    @property
    def chunk_seconds(self) -> float:
        """Playback length of one (non-first) chunk."""
        return budget.chunk_seconds(self.engine)

    @property
    def max_chunks(self) -> int:
        return budget.max_chunks(self.chunk_seconds)

    @property
    def max_prompt_chars(self) -> int:
        return checks.max_prompt_chars(self.engine.config.max_text_tokens)

    def gpu_duration(self, stream_id: str, reference: str, garment: str, prompt: str, seed: int, chunks: int) -> float:
        """Seconds of GPU to ask ZeroGPU for `produce(...)`; takes the same arguments, as `spaces.GPU` passes them."""
        return budget.gpu_seconds(chunks, self.chunk_seconds)

    # -- input checks (main plane, before any GPU time is spent) ---------------------------------------------------
    def check_image(self, path: str | None, what: str) -> list[str]:
        """`checks.check_image`, at most `checks.MAX_DECODES` at once across all sessions."""
        return self._decodes.check_image(path, what)

    def check_request(self, prompt: Any, chunks: Any, seed: Any) -> tuple[str, int, int]:
        """(prompt, chunks, seed) within this model's limits, as `stream` takes them."""
        return checks.check_request(prompt, chunks, seed, max_chars=self.max_prompt_chars, max_chunks=self.max_chunks)

    @staticmethod
    def check_key(key: Any) -> str:
        """The stream key as `stream` takes it (`checks.check_key`)."""
        return checks.check_key(key)

    # -- main plane ------------------------------------------------------------------------------------------
    def stream(
        self,
        session: str,
        reference: str,
        garment: str,
        prompt: str,
        chunks: int,
        seed: int,
        producer: Callable[..., Iterator[ChunkReady | StreamVideo]] | None = None,
        *,
        key: str,
    ) -> Iterator[tuple[dict | None, str | None, dict]]:
        """Run one stream for `session` and yield (frames, None, status) per chunk (`frames`: see `_frames`), then
        (None, mp4 path, status) for the whole stream's video once it has ended, and (None, None, status) if it ended
        by a stop that nothing carried, so that the last status always says how the stream ended.

        `producer` is `produce` as the app wrapped it (`spaces.GPU`); call this inside the Gradio handler so the
        ZeroGPU scheduler sees the user's request. Inputs must have passed `check_image`/`check_request`/`check_key`;
        `switch` and `stop` must send `key` again. A new stream stops the session's previous one. The stream's files
        are deleted when the next value is asked for after the video (Gradio has copied it by then). Leaving early
        (disconnect, cancel) only removes the mailbox, which the producer reads as stop, and marks the folder: nothing
        here waits for the engine, since this cleanup runs on the server's event loop (under ZeroGPU, `spaces` itself
        waits for the worker's current chunk).
        """
        stream_id = self.sessions.open(session, key)
        items = (producer or self.produce)(stream_id, reference, garment, prompt, seed, chunks)
        producer_ended = False
        garment_version: int | None = None
        status: dict = {}
        try:
            for item in items:
                if isinstance(item, StreamVideo):
                    status = _ended(status)
                    yield None, item.path, status
                    continue
                if item.garment_version != garment_version:  # first chunk or new garment: its photos are freed by now
                    garment_version = item.garment_version
                    checks.give_back_memory()
                status = self._status(item, chunks, self.sessions.switches_asked(session, stream_id))
                self.sessions.set_status(session, stream_id, status)
                yield self._frames(item, stream_id), None, status
            producer_ended = True
            if status.get("state") not in (DONE, STOPPED):
                # Stopped before any chunk or video could carry it (a new stream replaced it while it started).
                yield None, None, _ended(status)
        except Exception:
            producer_ended = True  # the producer raised, so it has ended
            raise
        finally:
            self.mailbox.remove(stream_id)
            items.close()
            self.sessions.finish(session, stream_id, producer_ended)

    def switch(self, session: str, garment: str | None, *, key: Any) -> tuple[dict, list[str]]:
        """Ask the session's stream to switch to `garment` (an upload) at its next chunk; returns the status and the
        notes of `check_image`. A session that runs no stream with `key` is refused before the photo is decoded."""
        if self._stream_of(session, key) is None:
            raise UserInputError("No stream is running in this session; press Generate first.")
        notes = self.check_image(garment, "new garment photo")
        current = self._stream_of(session, key)  # again: the stream may have ended while the photo was checked
        if current is not None:
            self.sessions.count_switch(session, current.stream_id)  # before posting: a chunk can follow it at once
        if current is None or not self._post(current.stream_id, Message(SWITCH, garment=garment)):
            raise UserInputError("The stream has just ended; press Generate to start a new one.")
        return {**current.status, "state": SWITCHING}, notes

    def stop(self, session: str, *, key: Any) -> dict:
        """Ask the session's stream to end at its next chunk boundary; the status says IDLE if none runs with `key`."""
        return self._stop(self._stream_of(session, key))

    def _stream_of(self, session: str, key: Any) -> SessionStream | None:
        """The session's stream if `key` is its key: a wrong key learns only that no stream runs."""
        current = self.sessions.get(session)
        return current if current is not None and current.opens_with(key) else None

    def _stop(self, current: SessionStream | None) -> dict:
        if current is None or not self._post(current.stream_id, Message(STOP)):
            return {"state": IDLE}
        return {**current.status, "state": STOPPING}

    def _post(self, stream_id: str, message: Message) -> bool:
        """Post to the stream's mailbox; False if the stream has ended (its box is gone)."""
        try:
            self.mailbox.post(stream_id, message)
        except FileNotFoundError:
            return False
        return True

    def close_session(self, session: str, cache: str | os.PathLike | None = None) -> None:
        """The browser left (Gradio's unload): stop its stream, and delete the copies of its streams' mp4s that the web
        server kept in `cache` for the page to fetch (nobody will fetch them now). The stream's own handler deletes
        the service's files."""
        self._stop(self.sessions.get(session))
        for stream_id in self.sessions.forget(session):
            if cache is not None:
                self.sessions.folders.delete_copies(stream_id, Path(cache))

    def shutdown(self) -> None:
        """Stop every stream, let in-process engine threads finish their chunk (a thread killed inside torch at
        interpreter exit aborts the process), and delete all temporary files. For when the server goes away."""
        threads = self._threads.copy()
        self.sessions.stop_all()
        for thread in threads:
            thread.join(SHUTDOWN_SECONDS)
        shutil.rmtree(self.root, ignore_errors=True)

    def _status(self, ready: ChunkReady, chunks: int, switches_asked: int) -> dict:
        pending = ready.state == STREAMING and ready.switch_requests < switches_asked
        return {
            "state": SWITCHING if pending else ready.state,  # until a chunk with the new garment comes
            "chunk": ready.index,
            "chunks": chunks,
            "frames": ready.frames,
            "garment_version": ready.garment_version,
            "fps": round(ready.fps, 1),
            "playback_fps": self.fps,
            "removed_words": list(ready.removed_words),
            "model": self.preset.name,
            "streams": len(self.sessions),  # streams sharing the model right now (their chunks interleave)
        }

    def _frames(self, ready: ChunkReady, stream_id: str) -> dict:
        """What the page's player draws: the chunk's strip as a data URL (no file in Gradio's cache, no second
        request), with what it needs to cut and time the frames and to tell streams apart."""
        encoded = base64.b64encode(ready.strip).decode("ascii")
        return {
            "stream": stream_id[:STREAM_TAG_CHARS],
            "chunk": ready.index,
            "frames": ready.frames,
            "fps": self.fps,
            "garment_version": ready.garment_version,
            "image": f"data:image/{self.preset.serving.strip_format};base64,{encoded}",
        }

    # -- GPU plane ---------------------------------------------------------------------------------------------
    def produce(self, stream_id: str, reference: str, garment: str, prompt: str, seed: int,
                chunks: int) -> Iterator[ChunkReady | StreamVideo]:
        """The GPU plane (`Producer.produce`): what the app wraps in `spaces.GPU`. A generator function itself, so
        that `spaces` streams its yields from the worker."""
        yield from self._producer.produce(stream_id, reference, garment, prompt, seed, chunks)


def _ended(status: dict) -> dict:
    """`status` as the stream's last: a stream that ended before its last chunk was stopped."""
    return status if status.get("state") in (DONE, STOPPED) else {**status, "state": STOPPED}
