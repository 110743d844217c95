"""Control messages for running streams (switch, stop), as files, so that they cross ZeroGPU's fork."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SWITCH, STOP = "switch", "stop"


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
