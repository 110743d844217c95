"""Which stream each browser session runs, and the files each stream owns: its mailbox box and its chunk folder."""

from __future__ import annotations

import hmac
import logging
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .locks import ForkSafe
from .mailbox import Mailbox

logger = logging.getLogger(__name__)

#: The two parties of a chunk folder: the GPU plane writes it, the main plane reads it.
PRODUCER, CONSUMER = "producer", "consumer"


class ChunkFolders:
    """One folder per stream under `root`, for its mp4.

    The producer writes a stream's folder and the consumer reads it (the folder goes once Gradio has copied the mp4);
    they may be in different processes, so they hand the folder over with marker files rather than waiting.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, stream_id: str) -> Path:
        return self.root / stream_id

    def create(self, stream_id: str) -> None:
        self.path(stream_id).mkdir()

    def video(self, stream_id: str) -> Path:
        """Where the stream's mp4 goes. The name carries the stream id because Gradio's cache keeps the name of each
        file it copies (`<cache>/<content hash>/<name>`): `delete_copies` finds the stream's copies by it."""
        return self.path(stream_id) / f"{stream_id}-stream.mp4"

    @staticmethod
    def delete_copies(stream_id: str, cache: Path) -> None:
        """Delete the copies Gradio made in `cache` of the stream's files (and their folders, once empty)."""
        for copy in cache.glob(f"*/{stream_id}-*.mp4"):
            copy.unlink(missing_ok=True)
            try:
                copy.parent.rmdir()
            except OSError:  # another file of the same content, or a new copy meanwhile
                pass

    def delete(self, stream_id: str) -> None:
        shutil.rmtree(self.path(stream_id), ignore_errors=True)

    def release(self, stream_id: str, party: str) -> None:
        """`party` (PRODUCER or CONSUMER) is done with the folder; whoever is done second deletes it. Each marks
        itself done before looking for the other's mark, so at least one of them sees both."""
        folder = self.path(stream_id)
        try:
            (folder / f".{party}-done").touch()
        except FileNotFoundError:
            return
        other = CONSUMER if party == PRODUCER else PRODUCER
        if (folder / f".{other}-done").exists():
            self.delete(stream_id)


@dataclass
class SessionStream:
    """The stream a session runs, and the status of its last chunk."""

    stream_id: str
    key: str  # what stop and switch must send (the session hash is in every stream URL)
    status: dict = field(default_factory=dict)
    switches_asked: int = 0  # switch requests posted to it

    def opens_with(self, key: object) -> bool:
        """Whether `key` is this stream's key (compared in constant time)."""
        return isinstance(key, str) and hmac.compare_digest(_bytes(key), _bytes(self.key))


class SessionRegistry(ForkSafe):
    """The sessions that run a stream (main plane; `len` counts them), one stream per session.

    Stream ids are made here, server-side: session hashes come from clients and are no file names.
    """

    def __init__(self, mailbox: Mailbox, folders: ChunkFolders) -> None:
        self.mailbox = mailbox
        self.folders = folders
        self._sessions: dict[str, SessionStream] = {}
        self._served: dict[str, list[str]] = {}  # per session, every stream it opened (its mp4 may be in a cache)
        super().__init__()

    def _reset_locks(self) -> None:
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open(self, session: str, key: str) -> str:
        """A new stream for `session`, controlled with `key`, with its mailbox box and chunk folder; the session's
        previous stream is told to stop (its mailbox goes)."""
        stream_id = uuid.uuid4().hex
        self.mailbox.open(stream_id)
        self.folders.create(stream_id)
        with self._lock:
            previous = self._sessions.get(session)
            self._sessions[session] = SessionStream(stream_id, key)
            self._served.setdefault(session, []).append(stream_id)
        if previous is not None:
            logger.info("session %s started a new stream; stopping %s", session[:8], previous.stream_id[:8])
            self.mailbox.remove(previous.stream_id)
        return stream_id

    def get(self, session: str) -> SessionStream | None:
        with self._lock:
            return self._sessions.get(session)

    def count_switch(self, session: str, stream_id: str) -> None:
        """One more switch request for `stream_id`, counted before it is posted."""
        with self._lock:
            if self._runs(session, stream_id):
                self._sessions[session].switches_asked += 1

    def switches_asked(self, session: str, stream_id: str) -> int:
        with self._lock:
            return self._sessions[session].switches_asked if self._runs(session, stream_id) else 0

    def set_status(self, session: str, stream_id: str, status: dict) -> None:
        """Record the status of `stream_id`'s latest chunk, unless the session has moved on to another stream."""
        with self._lock:
            if self._runs(session, stream_id):
                self._sessions[session].status = status

    def finish(self, session: str, stream_id: str, producer_ended: bool) -> None:
        """The consumer of `stream_id` is done: forget it and delete its chunk folder, at once if the producer has
        ended too, else by handing the folder over to the producer."""
        with self._lock:
            if self._runs(session, stream_id):
                del self._sessions[session]
        if producer_ended:
            self.folders.delete(stream_id)
        else:
            self.folders.release(stream_id, CONSUMER)

    def forget(self, session: str) -> list[str]:
        """The session has closed: the streams it opened, forgotten."""
        with self._lock:
            return self._served.pop(session, [])

    def stop_all(self) -> None:
        """Tell every stream to stop (remove its mailbox box)."""
        with self._lock:
            stream_ids = [s.stream_id for s in self._sessions.values()]
        for stream_id in stream_ids:
            self.mailbox.remove(stream_id)

    def _runs(self, session: str, stream_id: str) -> bool:
        """Whether `session`'s current stream is `stream_id` (call with the lock held)."""
        current = self._sessions.get(session)
        return current is not None and current.stream_id == stream_id


def _bytes(key: str) -> bytes:
    """A key as bytes; JSON may carry lone surrogates, which plain UTF-8 refuses."""
    return key.encode("utf-8", "surrogatepass")
