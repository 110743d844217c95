"""Checks on what a visitor sends, made in the main plane before any GPU time is spent.

Each refusal is a `UserInputError` whose message is one sentence the page shows as it is.
"""

from __future__ import annotations

import ctypes
import math
import numbers
import os
import reprlib
import threading
from typing import Any

from .. import media
from ..errors import UserInputError
from .locks import ForkSafe

#: Characters of English per text token, roughly: the preset's token window times this bounds the prompt (text past
#: the window would be cut silently).
CHARS_PER_TOKEN = 4
#: torch.Generator seeds are unsigned 64-bit; the UI and API take the everyday 32-bit range.
MAX_SEED = 2**32 - 1
#: Uploads decoded at once by the checks, across all sessions. A check holds one photo's decoded pixels, up to ~160 MB
#: at the pixel limit (RGBA; a 16-bit PNG ~80 MB, a JPEG a 64th), so a burst of uploads waits here rather than taking
#: the server's memory (eight 16-bit ones at once took 8 GB when they were converted in float64, unbounded).
MAX_DECODES = 2
#: A stream's key: a secret the caller makes (the page: 128 random bits as hex) and sends with Generate, stop and switch.
#: Not the session hash, which is in every stream URL; at least 64 bits of hex, so it cannot be guessed.
MIN_KEY_CHARS, MAX_KEY_CHARS = 16, 256
#: How long a check waits for a decode slot before refusing: a visitor hears the server is busy, rather than waiting
#: in a queue with no end.
DECODE_WAIT_SECONDS = 10.0

try:
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim  # glibc's
except (AttributeError, OSError):
    _MALLOC_TRIM = None

_MODE_NAMES = {"CMYK": "is CMYK", "L": "is greyscale", "1": "is black and white", "I;16": "is 16-bit greyscale"}


def max_prompt_chars(max_text_tokens: int) -> int:
    """The longest prompt a text window of `max_text_tokens` takes whole."""
    return max_text_tokens * CHARS_PER_TOKEN


def check_image(path: str | None, what: str) -> list[str]:
    """Validate an uploaded image (fashionchameleon.media decides); returns notes on conversions made."""
    if not path:
        raise UserInputError(f"Add a {what} first.")
    mode, transparent = media.probe_image(path, name=f"the {what}")
    if transparent:
        return [f"The {what} has transparency; transparent areas were filled with white."]
    if mode in ("RGB", "P"):
        return []
    return [f"The {what} {_MODE_NAMES.get(mode, f'is in mode {mode}')}; it was converted to RGB."]


class DecodeSlots(ForkSafe):
    """`check_image` with at most `slots` images decoded at once; a check that finds none free within `wait`
    seconds is refused."""

    def __init__(self, slots: int = MAX_DECODES, wait: float = DECODE_WAIT_SECONDS) -> None:
        self.slots, self.wait = slots, wait
        super().__init__()

    def _reset_locks(self) -> None:
        self._free = threading.BoundedSemaphore(self.slots)

    def check_image(self, path: str | None, what: str) -> list[str]:
        if not path:
            return check_image(path, what)  # the refusal needs no slot
        if not self._free.acquire(timeout=self.wait):
            raise UserInputError(f"The server is busy checking other photos; send the {what} again in a moment.")
        try:
            return check_image(path, what)
        finally:
            self._free.release()
            give_back_memory()


def give_back_memory() -> None:
    """Return the heap that decoded images freed to the system. glibc keeps freed blocks in its per-thread arenas: after
    eight near-limit checks the server stayed ~200 MB above its idle size, gc.collect() or not; malloc_trim gives it
    back (a fraction of a millisecond). Does nothing where the C library has no malloc_trim."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def check_request(prompt: Any, chunks: Any, seed: Any, *, max_chars: int, max_chunks: int) -> tuple[str, int, int]:
    """(prompt, chunks, seed) as the stream takes them, or a refusal naming the limit that was broken. The values come
    as the API caller sent them (JSON: any type)."""
    prompt = "" if prompt is None else prompt
    if not isinstance(prompt, str):
        raise UserInputError(f"The prompt must be text, got {reprlib.repr(prompt)}.")
    if len(prompt) > max_chars:
        raise UserInputError(f"The prompt is {len(prompt)} characters long; the limit is {max_chars}.")
    if not _whole_in(chunks, 1, max_chunks):
        raise UserInputError(f"Length must be a whole number of chunks from 1 to {max_chunks}, "
                             f"got {reprlib.repr(chunks)}.")
    if not _whole_in(seed, 0, MAX_SEED):
        raise UserInputError(f"Seed must be a whole number from 0 to {MAX_SEED}, got {reprlib.repr(seed)}.")
    return prompt, int(chunks), int(seed)


def check_key(key: Any) -> str:
    """The stream key as Generate takes it, or a refusal naming the allowed length."""
    if not isinstance(key, str) or not MIN_KEY_CHARS <= len(key) <= MAX_KEY_CHARS:
        raise UserInputError(f"The stream key must be a secret text of {MIN_KEY_CHARS} to {MAX_KEY_CHARS} characters "
                             f"that stop and switch send again, got {reprlib.repr(key)}.")
    return key


def _whole_in(value: Any, low: int, high: int) -> bool:
    """Whether `value` is a number (not a bool, a string or NaN) equal to a whole number from `low` to `high`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    return value == int(value) and low <= value <= high


def env_number(name: str, kind: type[int] | type[float], minimum: int) -> int | float | None:
    """An environment switch as a number from `minimum` up (None when unset), or one sentence naming it."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < minimum:
        kind_name = "a whole number" if kind is int else "a number"
        raise UserInputError(f"{name} must be {kind_name} from {minimum} up, got {text!r}.")
    return value
