"""Official FashionChameleon / Self-Forcing checkpoints load into diffusers' WanTransformer3DModel exactly."""

import json
import re

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from fashionchameleon.errors import UserInputError
from fashionchameleon.models.convert import (convert_official_state_dict, load_official_checkpoint,
                                             load_transformer_weights)
from helpers import TINY_TRANSFORMER, to_official_state_dict

CONFIG = TINY_TRANSFORMER

# Every parameter name of a native Wan2.2 DiT (docs/method.md §6), for a 2-block model.
_BLOCK = (
    [f"self_attn.{m}.{p}" for m in "qkvo" for p in ("weight", "bias")]
    + ["self_attn.norm_q.weight", "self_attn.norm_k.weight", "norm3.weight", "norm3.bias"]
    + [f"cross_attn.{m}.{p}" for m in "qkvo" for p in ("weight", "bias")]
    + ["cross_attn.norm_q.weight", "cross_attn.norm_k.weight"]
    + ["ffn.0.weight", "ffn.0.bias", "ffn.2.weight", "ffn.2.bias", "modulation"]
)
OFFICIAL_KEYS = {
    "patch_embedding.weight", "patch_embedding.bias",
    *(f"{m}.{i}.{p}" for m, idx in (("text_embedding", (0, 2)), ("time_embedding", (0, 2)), ("time_projection", (1,)))
      for i in idx for p in ("weight", "bias")),
    *(f"blocks.{n}.{k}" for n in range(2) for k in _BLOCK),
    "head.head.weight", "head.head.bias", "head.modulation",
}


def _model(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**CONFIG)
    with torch.no_grad():  # default init leaves norms at 1 and tables at ~0: perturb so every name matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _model(0)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 48, 2, 4, 4, generator=g)
    text = torch.randn(1, 8, 32, generator=g)
    return latents, torch.tensor([500]), text


def _forward(model, inputs):
    with torch.no_grad():
        return model(*inputs, return_dict=False)[0]


def _fresh(state_dict) -> WanTransformer3DModel:
    fresh = WanTransformer3DModel(**CONFIG).eval()
    fresh.load_state_dict(state_dict, strict=True)
    return fresh


def test_official_names_match_wan22(model):
    official = to_official_state_dict(model.state_dict())
    assert all(k.startswith("model.") for k in official)
    assert {k[len("model."):] for k in official} == OFFICIAL_KEYS
    assert official["model.head.modulation"].shape == (1, 2, 32)
    assert official["model.blocks.0.modulation"].shape == (1, 6, 32)


def test_round_trip_of_names(model):
    sd = model.state_dict()
    native = {k[len("model."):]: v for k, v in to_official_state_dict(sd).items()}
    back = convert_official_state_dict(native)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)
    assert len(native) == len(sd)  # diffusers' converter pops from its argument; ours must leave the input intact


@pytest.mark.parametrize("layout", ["generator", "ema", "bare"])
def test_official_checkpoint_reproduces_forward(model, inputs, tmp_path, layout):
    sd = to_official_state_dict(model.state_dict())
    noisy = to_official_state_dict(_model(1).state_dict())
    payload = {
        "generator": {"generator": sd, "global_step": 5},
        "ema": {"generator": noisy, "critic": noisy, "generator_ema": sd},
        "bare": dict(sd, **{"model.freqs": torch.randn(4, 2)}),  # stray RoPE table is dropped
    }[layout]
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    loaded = load_official_checkpoint(path)
    err = (_forward(_fresh(loaded), inputs) - _forward(model, inputs)).abs().max().item()
    assert err == 0
    assert torch.equal(_forward(_fresh(load_transformer_weights(path)), inputs), _forward(model, inputs))


def test_negative_controls(model, inputs, tmp_path):
    sd = to_official_state_dict(model.state_dict())
    # picking `generator` instead of `generator_ema` must be visible in the output
    noisy = to_official_state_dict(_model(1).state_dict())
    assert not torch.equal(_forward(_fresh(convert_official_state_dict(
        {k[6:]: v for k, v in noisy.items()})), inputs), _forward(model, inputs))
    # a renamed key and a missing key both fail strict loading
    renamed = dict(sd)
    renamed["model.blocks.0.self_attn.query.weight"] = renamed.pop("model.blocks.0.self_attn.q.weight")
    missing = dict(sd)
    del missing["model.blocks.1.norm3.weight"]
    for i, bad in enumerate((renamed, missing)):
        torch.save({"generator": bad}, tmp_path / f"bad{i}.pt")
        with pytest.raises(RuntimeError, match="blocks"):
            _fresh(load_official_checkpoint(tmp_path / f"bad{i}.pt"))


def test_wrapper_prefixes_are_stripped(model, inputs, tmp_path):
    wrapped = {
        k.replace("model.", "module._orig_mod.model.", 1).replace("blocks.0.", "blocks.0._fsdp_wrapped_module."): v
        for k, v in to_official_state_dict(model.state_dict()).items()
    }
    torch.save({"model": wrapped}, tmp_path / "model.pt")
    assert torch.equal(_forward(_fresh(load_official_checkpoint(tmp_path / "model.pt")), inputs),
                       _forward(model, inputs))


def test_safetensors_and_diffusers_folder(model, inputs, tmp_path):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    expected = _forward(model, inputs)
    save_file(sd, tmp_path / "weights.safetensors")  # diffusers names
    assert torch.equal(_forward(_fresh(load_transformer_weights(tmp_path / "weights.safetensors")), inputs), expected)
    save_file({k[6:]: v for k, v in to_official_state_dict(sd).items()}, tmp_path / "native.safetensors")
    assert torch.equal(_forward(_fresh(load_transformer_weights(tmp_path / "native.safetensors")), inputs), expected)
    model.save_pretrained(tmp_path / "pipe" / "transformer")  # a pipeline folder with a transformer/ subfolder
    assert torch.equal(_forward(_fresh(load_transformer_weights(tmp_path / "pipe")), inputs), expected)
    sharded = tmp_path / "sharded"  # hand-made two-shard folder with an index
    sharded.mkdir()
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, sharded / name)
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    assert torch.equal(_forward(_fresh(load_transformer_weights(sharded)), inputs), expected)


class _Opaque:
    """An arbitrary pickled object: `weights_only=True` refuses it."""


def _error(fn, path) -> str:
    with pytest.raises(UserInputError) as info:
        fn(path)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_errors(tmp_path):
    assert "not found" in _error(load_official_checkpoint, tmp_path / "nope" / "model.pt")
    assert "not found" in _error(load_transformer_weights, tmp_path / "nope.pt")
    (tmp_path / "model.pt").write_text("this is not a checkpoint\n")
    message = _error(load_official_checkpoint, tmp_path / "model.pt")
    assert re.search(r"Cannot read .*model\.pt as a PyTorch checkpoint: the file is corrupt", message)
    torch.save({"generator": _Opaque()}, tmp_path / "obj.pt")
    assert "other than tensors" in _error(load_official_checkpoint, tmp_path / "obj.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "not a dict" in _error(load_official_checkpoint, tmp_path / "list.pt")
    torch.save({"optimizer": {"lr": 0.1}, "step": 3}, tmp_path / "opt.pt")
    assert "generator_ema" in _error(load_official_checkpoint, tmp_path / "opt.pt")
    torch.save({"generator": {"model.encoder.layer.0.weight": torch.zeros(2)}}, tmp_path / "bert.pt")
    assert "does not look like a Wan transformer" in _error(load_official_checkpoint, tmp_path / "bert.pt")
    torch.save({"generator": {"model.patch_embedding.weight": "oops"}}, tmp_path / "str.pt")
    assert "non-tensor" in _error(load_official_checkpoint, tmp_path / "str.pt")
    (tmp_path / "weights.onnx").write_bytes(b"\0")
    assert "Unsupported" in _error(load_transformer_weights, tmp_path / "weights.onnx")
    (tmp_path / "empty").mkdir()
    assert "no diffusion_pytorch_model" in _error(load_transformer_weights, tmp_path / "empty")
    (tmp_path / "broken.safetensors").write_text("garbage")
    assert "safetensors" in _error(load_transformer_weights, tmp_path / "broken.safetensors")
