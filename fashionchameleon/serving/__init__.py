"""Serving streams to many browser sessions: everything behind the Gradio page that is not UI.

Two planes:

- The **main plane** (`StreamService.stream`, `switch`, `stop`, `close_session`) runs in the Gradio server process.
  It validates input, keeps one stream per session (keyed by Gradio's session hash; stop and switch also need the
  stream's key, since the session hash is in every stream URL), turns chunks into what the page's player draws and
  status dicts, deletes the stream's mp4 once Gradio has taken it, and Gradio's copy once the session closes.
- The **GPU plane** (`StreamService.produce`) runs the engine. On a ZeroGPU Space the app wraps it in `spaces.GPU`,
  which runs each call in a worker process *forked* from the server and holding a GPU for as long as the call asked
  for (`budget`). After the fork the worker shares nothing in memory with the main plane: it gets plain arguments,
  yields picklable `ChunkReady`s (and a last `StreamVideo`), and reads switch/stop requests from a `Mailbox` of files
  that both processes see. Locks are made afresh in the worker (`locks`). Off ZeroGPU the same code runs in-process,
  unchanged.

Pacing: a viewer plays the preset's frame rate however fast frames are made. Video made far ahead of the
playhead sits in the player's buffer, and a garment switch only shows once that buffer has played out, so the
producer waits while it is more than a lead of video ahead of a viewer who started at the first chunk; the lead
follows how long chunks take to make (`pacing`).

Cleanup: the main plane deletes the stream's folder once Gradio has copied its mp4. When a stream's consumer leaves
early (cancel, disconnect, unload) it removes the stream's mailbox, which the producer reads as stop, and the two
planes hand the folder over with marker files so whichever finishes second deletes it; nobody waits.

Modules: `service` (`StreamService`, what the app calls), `checks` (uploads and request values, and the messages
that refuse them), `budget` (ZeroGPU time), `sessions` (which stream a session runs; chunk-folder hand-over),
`producer` (the GPU plane), `mailbox`, `pacing`, `states` (the status's `"state"` values), `locks`.
"""

from .mailbox import STOP, SWITCH, Mailbox, Message
from .pacing import Pacer
from .producer import QUEUE_CHUNKS, ChunkReady, StreamVideo
from .service import StreamService
from .states import DONE, IDLE, STARTING, STOPPED, STOPPING, STREAMING, SWITCHING

__all__ = [
    "DONE", "IDLE", "QUEUE_CHUNKS", "STARTING", "STOP", "STOPPED", "STOPPING", "STREAMING", "SWITCH", "SWITCHING",
    "ChunkReady", "Mailbox", "Message", "Pacer", "StreamService", "StreamVideo",
]
