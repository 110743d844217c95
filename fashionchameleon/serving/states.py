"""The states a stream's status reports in its `"state"` field."""

STARTING = "starting"  # the stream is being set up; no chunk yet
STREAMING = "streaming"  # chunks are coming
SWITCHING = "switching"  # a garment switch was asked for; it lands at the next chunk
STOPPING = "stopping"  # a stop was asked for; the stream ends at its next chunk boundary
STOPPED = "stopped"  # the stream ended by a stop: on the chunk made when it came, or on a status after the last one
DONE = "done"  # the last chunk of the length asked for
IDLE = "idle"  # the session runs no stream
