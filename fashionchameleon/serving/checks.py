"""Checks on what a visitor sends, made in the main plane before any GPU time is spent.

Each refusal is a `UserInputError` whose message is one sentence the page shows as it is.
"""

from __future__ import annotations

from PIL import Image

from .. import media
from ..errors import UserInputError

#: Characters of English per text token, roughly: the preset's token window times this bounds the prompt (text past
#: the window would be cut silently).
CHARS_PER_TOKEN = 4
#: torch.Generator seeds are unsigned 64-bit; the UI and API take the everyday 32-bit range.
MAX_SEED = 2**32 - 1

_MODE_NAMES = {"CMYK": "is CMYK", "L": "is greyscale", "1": "is black and white", "I;16": "is 16-bit greyscale"}


def max_prompt_chars(max_text_tokens: int) -> int:
    """The longest prompt a text window of `max_text_tokens` takes whole."""
    return max_text_tokens * CHARS_PER_TOKEN


def check_image(path: str | None, what: str) -> list[str]:
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


def check_request(prompt: str | None, chunks: float | None, seed: float | None, *, max_chars: int,
                  max_chunks: int) -> tuple[str, int, int]:
    """(prompt, chunks, seed) as the stream takes them, or a refusal naming the limit that was broken."""
    prompt = prompt or ""
    if len(prompt) > max_chars:
        raise UserInputError(f"The prompt is {len(prompt)} characters long; the limit is {max_chars}.")
    if chunks is None or int(chunks) != chunks or not 1 <= chunks <= max_chunks:
        raise UserInputError(f"Length must be a whole number of chunks from 1 to {max_chunks}, got {chunks}.")
    if seed is None or int(seed) != seed or not 0 <= seed <= MAX_SEED:
        raise UserInputError(f"Seed must be a whole number from 0 to {MAX_SEED}, got {seed}.")
    return prompt, int(chunks), int(seed)
