"""Prompt encoding (Wan layout: 512 rows, zero past the true length) and garment-word filtering."""

import pytest
import torch
from transformers import T5Tokenizer, UMT5EncoderModel

from fashionchameleon.models.text import PromptEncoder, filter_garment_words, tiny_text_stack


@pytest.fixture(scope="module")
def stack():
    return tiny_text_stack(seed=0, d_model=32)


def _true_lengths(tokenizer, prompts):
    return [len(tokenizer(p).input_ids) for p in prompts]  # words + EOS


def test_shapes_and_zero_padding(stack):
    tokenizer, encoder = stack
    prompts = ["a woman walks toward the camera", "a man turns around slowly and smiles in the studio"]
    embeds = PromptEncoder(tokenizer, encoder).encode(prompts)
    assert embeds.shape == (2, 512, 32)
    assert embeds.dtype == torch.float32
    for row, n in zip(embeds, _true_lengths(tokenizer, prompts)):
        assert 2 < n < 512
        assert torch.all(row[n:] == 0)
        assert torch.all(row[:n].abs().sum(-1) > 0)


def test_prompt_words_are_real_tokens(stack):
    tokenizer, _ = stack
    ids = tokenizer("A woman walks in the studio").input_ids
    assert tokenizer.unk_token_id not in ids
    assert ids[-1] == tokenizer.eos_token_id


def test_single_string_max_length_dtype(stack):
    tokenizer, encoder = stack
    embeds = PromptEncoder(tokenizer, encoder, max_length=16).encode("smiles", dtype=torch.bfloat16, device="cpu")
    assert embeds.shape == (1, 16, 32) and embeds.dtype == torch.bfloat16
    assert torch.all(embeds[0, 2:] == 0)  # "smiles" + EOS


def test_empty_prompt_is_eos_only(stack):
    tokenizer, encoder = stack
    embeds = PromptEncoder(tokenizer, encoder).encode([""])
    assert torch.all(embeds[0, 1:] == 0) and embeds[0, 0].abs().sum() > 0


def test_different_prompts_differ_and_encoding_is_deterministic(stack):
    tokenizer, encoder = stack
    enc = PromptEncoder(tokenizer, encoder)
    a, b = enc.encode(["a woman walks"]), enc.encode(["a woman turns"])
    assert not torch.equal(a, b)
    assert torch.equal(a, enc.encode("a woman walks"))
    # batch rows are independent of each other (attention mask is used)
    assert torch.equal(enc.encode(["a woman walks", "a man runs in the park at night"])[:1], a)


def test_seeded(stack):
    _, encoder = stack
    _, again = tiny_text_stack(seed=0)
    _, other = tiny_text_stack(seed=1)
    sd, sd_again, sd_other = encoder.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_again[k]) for k in sd)
    assert any(not torch.equal(sd[k], sd_other[k]) for k in sd)


def test_save_load_round_trip(stack, tmp_path):
    tokenizer, encoder = stack
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    encoder.save_pretrained(tmp_path / "text_encoder")
    tok2 = T5Tokenizer.from_pretrained(tmp_path / "tokenizer")
    enc2 = UMT5EncoderModel.from_pretrained(tmp_path / "text_encoder")
    prompts = ["a woman walks toward the camera", "she waves"]
    assert torch.equal(PromptEncoder(tokenizer, encoder).encode(prompts), PromptEncoder(tok2, enc2).encode(prompts))


@pytest.mark.parametrize(
    "prompt, cleaned, removed",
    [
        (
            "A woman wearing a red striped shirt walks toward the camera.",
            "A woman walks toward the camera.",
            ["wearing a red striped shirt"],
        ),
        ("A man in a blue dress turns around, smiling.", "A man turns around, smiling.", ["in a blue dress"]),
        (
            "A young woman in a white t-shirt and blue jeans walks in the studio",
            "A young woman walks in the studio",
            ["in a white t-shirt and blue jeans"],
        ),
        (
            "She smiles, wearing a navy-blue leather jacket. She waves.",
            "She smiles. She waves.",
            ["wearing a navy-blue leather jacket"],
        ),
        ("Jacket on, a man nods; he wears Jeans.", "on, a man nods; he wears.", ["Jacket", "Jeans"]),
        ("A MAN IN A BLACK SUIT turns", "A MAN turns", ["IN A BLACK SUIT"]),
    ],
)
def test_filter_garment_words(prompt, cleaned, removed):
    assert filter_garment_words(prompt) == (cleaned, removed)


@pytest.mark.parametrize(
    "prompt",
    [
        "A model turns slowly in the studio and smiles.",
        "A red car drives on top of the hill.",  # colour without a garment, "top of"
        "  a woman walks ,  then waves  ",  # untouched, even untidy whitespace
    ],
)
def test_filter_keeps_prompts_without_garments(prompt):
    assert filter_garment_words(prompt) == (prompt, [])
