"""Prompt side of the generator: UMT5 encoding, garment-word filtering and a tiny offline text stack.

The encoding must match what the Wan transformer saw in training, so it delegates to diffusers'
`WanPipeline._get_t5_prompt_embeds` instead of re-deriving it (padding to `max_length`, EOS appended, rows past the
true length zeroed).
"""

from __future__ import annotations

import re

import torch
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

__all__ = ["PromptEncoder", "filter_garment_words", "tiny_text_stack", "GARMENT_NOUNS", "GARMENT_QUALIFIERS"]


class PromptEncoder:
    """UMT5 prompt encoding exactly as Wan pipelines do it: padded to max_length, rows past the true length zeroed.

    It exposes the attributes `WanPipeline._get_t5_prompt_embeds` reads (`tokenizer`, `text_encoder`,
    `_execution_device`) so that diffusers' own function does the work; a drift between our encoding and the
    pipeline's would silently change every generated video.
    """

    def __init__(self, tokenizer, text_encoder, max_length: int = 512):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = int(max_length)

    @property
    def _execution_device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: str | list[str], device=None, dtype=None) -> torch.Tensor:
        """Return `[B, max_length, d_model]` embeddings on `device` (default: the encoder's) in `dtype`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        return WanPipeline._get_t5_prompt_embeds(
            self, prompt=prompts, max_sequence_length=self.max_length, device=device, dtype=dtype
        )


# ---------------------------------------------------------------------------------------------------------------
# Garment filtering. The paper keeps clothing out of the interactive text prompt: the garment comes from the
# reference image, and a conflicting text description would fight it. Everything is data: edit these lists.

GARMENT_NOUNS = (
    "t-shirt", "t shirt", "tee shirt", "tee", "shirt", "blouse", "tank top", "crop top", "tube top", "top",
    "dress", "gown", "skirt", "miniskirt", "jacket", "coat", "trench coat", "raincoat", "parka", "blazer",
    "cardigan", "sweater", "jumper", "pullover", "hoodie", "sweatshirt", "vest", "waistcoat", "suit", "tuxedo",
    "jeans", "trousers", "pants", "shorts", "leggings", "joggers", "sweatpants", "overalls", "jumpsuit", "romper",
    "uniform", "outfit", "clothes", "clothing", "garment", "attire", "polo", "tunic", "kimono", "sari", "robe",
    "camisole", "bodysuit", "bikini", "swimsuit", "lingerie", "scarf", "shawl",
)
GARMENT_QUALIFIERS = (
    # colours
    "red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "white", "black", "grey", "gray",
    "brown", "beige", "navy", "teal", "turquoise", "maroon", "burgundy", "olive", "khaki", "cream", "ivory",
    "gold", "golden", "silver", "light", "dark", "pale", "bright", "pastel", "neon", "multicolored", "colorful",
    "colourful",
    # patterns
    "striped", "plaid", "checked", "checkered", "floral", "polka-dot", "polka dot", "dotted", "spotted",
    "printed", "patterned", "graphic", "tartan", "camouflage", "leopard-print", "paisley", "plain",
    # materials
    "denim", "leather", "cotton", "silk", "silky", "satin", "wool", "woolen", "woollen", "knit", "knitted",
    "linen", "lace", "velvet", "suede", "fur", "faux-fur", "chiffon", "sequined", "corduroy", "tweed", "jersey",
    # cut / fit / style
    "long", "short", "long-sleeved", "short-sleeved", "sleeveless", "v-neck", "crew-neck", "turtleneck",
    "button-up", "button-down", "collared", "hooded", "cropped", "oversized", "loose", "tight", "fitted",
    "slim-fit", "skinny", "baggy", "high-waisted", "pleated", "ripped", "casual", "formal", "elegant",
    "stylish", "fashionable", "trendy", "summer", "winter", "evening", "cocktail", "maxi", "midi", "mini",
    "bomber", "puffer", "biker", "flannel", "cargo", "wide-leg",
)
GARMENT_LEAD_INS = ("wearing", "dressed in", "clad in", "dressed up in", "in", "with", "sporting")
GARMENT_DETERMINERS = ("a", "an", "the", "his", "her", "their", "its", "some", "matching", "pair of", "a pair of")


def _alternation(words) -> str:
    """Longest first so `t-shirt` wins over `shirt`; spaces/hyphens inside phrases match either."""
    ordered = sorted(set(words), key=len, reverse=True)
    return "|".join(re.escape(w).replace(r"\ ", r"[\s-]+").replace(r"\-", r"[\s-]?") for w in ordered)


_QUAL = rf"(?:{_alternation(GARMENT_QUALIFIERS)})"
_GARMENT = (
    rf"(?:(?:{_alternation(GARMENT_DETERMINERS)})\s+)?"
    rf"(?:{_QUAL}(?:\s*,\s*|\s+and\s+|[\s-]+))*"  # "red and white striped", "navy-blue"
    rf"(?:{_alternation(GARMENT_NOUNS)})(?:es|s)?(?![\s-]+of\b)"  # "on top of" is not a garment
)
_GARMENT_RE = re.compile(
    rf"(?:\b(?:{_alternation(GARMENT_LEAD_INS)})\s+)?\b{_GARMENT}"
    rf"(?:(?:\s*,\s*(?:and\s+)?|\s+and\s+|\s+with\s+){_GARMENT})*\b",
    re.IGNORECASE,
)


def _tidy(text: str) -> str:
    """Repair the punctuation a removal leaves behind ("walks , ." -> "walks.")."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r",(?:\s*,)+", ",", text)
    text = re.sub(r"[,;:]\s*([.!?])", r"\1", text)
    text = re.sub(r"^[\s,;:]+|[\s,;:]+$", "", text)
    return text.strip()


def filter_garment_words(prompt: str) -> tuple[str, list[str]]:
    """Remove garment descriptions from a prompt; return (cleaned prompt, removed phrases in order).

    Colours, patterns and materials go only when they qualify a garment noun ("a red car" stays), and a lead-in
    such as "wearing" / "in" goes with its garment ("walks in the studio" stays). A prompt with no garment words
    is returned unchanged.
    """
    removed = [m.group(0).strip() for m in _GARMENT_RE.finditer(prompt)]
    if not removed:
        return prompt, []
    return _tidy(_GARMENT_RE.sub(" ", prompt)), removed


# ---------------------------------------------------------------------------------------------------------------
# Tiny offline text stack (tests and the `tiny` preset): no sentencepiece, no download.

_TINY_WORDS = """
a an the and or but of in on at to from with without by for into onto over under up down out off near behind
front back left right side around through across along toward towards away here there this that these those
is are was were be been being has have had do does did will would can could should may might must
i you he she it we they me him her us them my your his its our their who what which where when why how
man woman person people girl boy lady gentleman model child young old adult friend couple group
walk walks walking walked turn turns turning turned smile smiles smiling smiled look looks looking looked
stand stands standing sit sits sitting run runs running dance dances dancing wave waves waving raise raises
raising lift lifts lifting pose poses posing spin spins spinning move moves moving step steps stepping
nod nods nodding laugh laughs laughing talk talks talking hold holds holding point points pointing
glance glances gaze gazes tilt tilts lean leans leaning sway sways swaying jump jumps jumping slowly quickly
gently softly calmly happily naturally confidently casually gracefully camera shot close closeup medium wide
full body head hand hands arm arms leg legs face hair eyes shoulder shoulders hip hips foot feet
studio room street city park beach garden background backdrop light lighting sunlight sun shadow wall floor
window door stage runway indoor outdoor outside inside white black red blue green yellow pink purple orange
brown grey gray gold silver dark bright soft warm cool plain simple clean neutral beautiful elegant stylish
fashion shirt dress jacket coat skirt jeans pants trousers sweater hoodie suit top t-shirt wearing dressed
striped floral denim leather cotton silk video scene frame high quality detailed realistic natural smooth
motion still static steady slight small large big long short tall one two three first then again while
as so very just only also not no yes new good best nice day night morning evening
"""


def tiny_text_stack(seed: int = 0, d_model: int = 32) -> tuple[T5Tokenizer, UMT5EncoderModel]:
    """A seeded tiny tokenizer + random UMT5 encoder with the real interfaces (reference §4 recipe).

    The vocab holds a few hundred English words (so test prompts map to distinct real ids), single characters
    as a fallback for other words, and punctuation; `save_pretrained`/`from_pretrained` round-trip offline.
    """
    if d_model % 8:
        raise ValueError(f"d_model must be a multiple of 8, got {d_model}")
    words = list(dict.fromkeys(_TINY_WORDS.split()))
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    punct = list(",.!?;:'\"()-")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    vocab += [("\u2581" + w.capitalize(), -1.5) for w in words if w.capitalize() != w]
    vocab += [(c, -5.0) for c in chars + punct] + [("\u2581" + c, -4.0) for c in chars + punct]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    config = UMT5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=d_model // 8,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = UMT5EncoderModel(config)
    return tokenizer, encoder.eval()
