"""Read official FashionChameleon / Self-Forcing transformer checkpoints into diffusers `WanTransformer3DModel` names.

Official files (docs/method.md §6) are `torch.save`d dicts holding `generator_ema` and/or `generator` (or `model`),
each a state dict keyed `model.` + native Wan2.2 names. The name mapping itself is diffusers'
`convert_wan_transformer_to_diffusers` (checked exact on TI2V-5B-style keys, incl. the norm2/norm3 swap and
`head.modulation -> scale_shift_table`); this module only adds what it lacks: choosing the sub-dict, stripping
the wrapper prefixes, validating and user-facing errors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from diffusers.models.model_loading_utils import load_state_dict as _diffusers_load_state_dict

from fashionchameleon.errors import UserInputError

__all__ = [
    "load_official_checkpoint",
    "convert_official_state_dict",
    "load_transformer_weights",
]

# Sub-dicts of an official `model.pt`, best first: the EMA generator is the one the predictors use.
STATE_DICT_KEYS = ("generator_ema", "generator", "model", "state_dict")
# Wrapper prefixes added by `WanDiffusionWrapper`, DDP, torch.compile, FSDP, activation checkpointing, ComfyUI.
WRAPPER_PREFIXES = (
    "model.", "module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "diffusion_model.",
)
# Non-parameter entries that some exporters leave in (the RoPE table is recomputed by the model).
NON_PARAMETER_NAMES = ("freqs",)
# Top-level modules of the native Wan DiT; anything else means the file is not a Wan transformer.
_WAN_KEY_RE = re.compile(
    r"^(patch_embedding|text_embedding\.\d+|time_embedding\.\d+|time_projection\.\d+|head\.(head|modulation)"
    r"|blocks\.\d+\.[\w.]+|img_emb\.[\w.]+)(\.(weight|bias))?$"
)
# Diffusers names, used to accept files already in diffusers format.
_DIFFUSERS_MARKERS = ("condition_embedder.", "proj_out.", "scale_shift_table")

def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    # FSDP / checkpoint / compile wrappers can also sit inside the module tree; they are never part of a real name.
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        key = key.replace(wrapper, "")
    return key


def convert_official_state_dict(state_dict: dict) -> dict:
    """Native Wan names (wrapper prefix already stripped) -> diffusers `WanTransformer3DModel` names.

    Delegates to diffusers' single-file converter on a shallow copy (it pops keys from its argument).
    """
    return convert_wan_transformer_to_diffusers(dict(state_dict))


def _select_state_dict(obj, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise UserInputError(f"{path} holds a {type(obj).__name__}, not a dict of transformer weights.")
    for name in STATE_DICT_KEYS:
        if isinstance(obj.get(name), dict):
            return obj[name]
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    keys = ", ".join(sorted(map(str, obj))[:6])
    raise UserInputError(
        f"{path} is a dict without transformer weights (expected one of {', '.join(STATE_DICT_KEYS)} "
        f"or a plain state dict; found keys: {keys or 'none'})."
    )


def _native_to_diffusers(state_dict: dict, source) -> dict:
    """Strip prefixes, drop non-parameters, check every key is a Wan DiT key, convert."""
    cleaned = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise UserInputError(f"{source} holds a non-string key {key!r}; expected a dict of named tensors.")
        name = _strip_prefixes(key)
        if name.rsplit(".", 1)[-1] in NON_PARAMETER_NAMES:
            continue
        if not isinstance(value, torch.Tensor):
            raise UserInputError(f"{source} holds a non-tensor entry {key!r}; expected a dict of tensors.")
        cleaned[name] = value
    bad = [k for k in cleaned if not _WAN_KEY_RE.match(k)]
    if bad or "patch_embedding.weight" not in cleaned:
        example = bad[0] if bad else "no 'patch_embedding.weight'"
        raise UserInputError(
            f"{source} does not look like a Wan transformer checkpoint ({len(bad)} unrecognised keys, e.g. {example})."
        )
    return convert_official_state_dict(cleaned)


def load_official_checkpoint(path) -> dict[str, torch.Tensor]:
    """Load an official FashionChameleon / Self-Forcing `model.pt` and return diffusers-named tensors.

    Picks `generator_ema` > `generator` > `model` > a bare state dict, like the official streaming predictor.
    `weights_only=True` so a checkpoint cannot run code; `mmap=True` so that only the picked dict is read from
    disk (a GR-DMD `model.pt` also holds the critic and EMA copies: about 60 GB at 5B).
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"Checkpoint not found: {path} is not a file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt, truncated, text, or a pickle with arbitrary objects
        if "weights only load failed" in str(exc).lower():
            reason = "it pickles Python objects other than tensors and plain containers, which are not loaded"
        else:
            reason = "the file is corrupt, truncated or not a torch.save file"
        raise UserInputError(f"Cannot read {path} as a PyTorch checkpoint: {reason}.") from exc
    return _native_to_diffusers(_select_state_dict(obj, path), path)


def _load_safetensors(files: list[Path], source) -> dict:
    state_dict = {}
    for file in files:
        try:
            state_dict.update(_diffusers_load_state_dict(str(file)))
        except Exception as exc:
            raise UserInputError(f"Cannot read {file} as a safetensors file ({type(exc).__name__}).") from exc
    if not state_dict:
        raise UserInputError(f"{source} holds no tensors.")
    if any(k.startswith(_DIFFUSERS_MARKERS) for k in state_dict):
        return state_dict
    return _native_to_diffusers(state_dict, source)  # e.g. a native-named single-file release


def _folder_weight_files(folder: Path) -> list[Path]:
    if not any(folder.glob("diffusion_pytorch_model*.safetensors*")) and (folder / "transformer").is_dir():
        folder = folder / "transformer"  # a whole pipeline folder was given
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise UserInputError(f"{index} is not a valid safetensors index.") from exc
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserInputError(f"{folder} is missing shard {missing[0]} listed in its index.")
        return files
    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if len(files) > 1:  # variants (fp16, bf16) of one model, not shards: loading several would mix them
        plain = folder / "diffusion_pytorch_model.safetensors"
        if not plain.is_file():
            raise UserInputError(f"{folder} holds several weight variants ({', '.join(f.name for f in files)}).")
        files = [plain]
    if not files:
        raise UserInputError(f"{folder} has no diffusion_pytorch_model*.safetensors weights.")
    return files


def load_transformer_weights(path) -> dict:
    """Load transformer weights from any supported source and return diffusers-named tensors.

    Accepts a `.safetensors` file, a diffusers model (or pipeline) folder, or an official `.pt`/`.pth` file.
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"Transformer weights not found: {path} does not exist.")
    if path.is_dir():
        return _load_safetensors(_folder_weight_files(path), path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_safetensors([path], path)
    if suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return load_official_checkpoint(path)
    raise UserInputError(
        f"Unsupported transformer weights {path}: expected a .safetensors file, a diffusers folder, or a .pt/.pth file."
    )
