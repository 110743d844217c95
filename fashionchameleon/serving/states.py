"""The states a stream's status reports in its `"state"` field."""

STREAMING = "streaming"  # chunks are coming
SWITCHING = "switching"  # a garment switch was asked for; it lands at the next chunk
STOPPING = "stopping"  # a stop was asked for; the stream ends at its next chunk boundary
STOPPED = "stopped"  # the last chunk: a stop came while it was made
DONE = "done"  # the last chunk of the length asked for
IDLE = "idle"  # the session runs no stream
