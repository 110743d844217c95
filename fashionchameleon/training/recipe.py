"""All stages from one file: `python -m fashionchameleon train all --config configs/mini.yaml`, or one stage of
it: `python -m fashionchameleon train teacher --config configs/mini.yaml`.

A recipe file holds `output_dir`, `export` (where the final student pipeline goes), `shared` (keys every stage
gets) and one section per stage (`teacher`, `forcing`, `dmd`) over that stage's defaults. The runner chains the
weights as the paper does: forcing starts from the teacher, DMD's generator from forcing and its real score and
critic from the teacher. Each stage resumes from its own checkpoints, so a killed run continues where it stopped.
An optional `codec` section (mini) trains the codec's learned part first; every stage then uses that codec. A
recipe may name a `base` recipe and hold only what differs from it (configs/mini-2x2.yaml).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserInputError
from .codec import CODEC_EXPORT, train_codec
from .config import STAGES, CodecConfig, TrainConfig, build_config, config_from_dict, load_config, merge_values
from .trainer import PIPELINE_EXPORT, TRANSFORMER_EXPORT, Trainer

CODEC = "codec"
BASE = "base"
RECIPE_KEYS = {"output_dir", "export", "teacher_export", "shared", CODEC, *STAGES}


def codec_config(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> CodecConfig | None:
    """The recipe's codec stage (None when it has none), in `<output_dir>/codec`, with the shared preset and seed."""
    if CODEC not in raw:
        return None
    shared = {key: value for key, value in (raw.get("shared") or {}).items() if key in ("preset", "seed")}
    architecture = ((raw.get("shared") or {}).get("model") or {}).get("architecture")
    if architecture:
        shared["architecture"] = architecture
    values = merge_values(merge_values(shared, raw[CODEC] or {}), overrides or {})
    return build_config(CodecConfig, {"output_dir": str(Path(raw["output_dir"]) / CODEC), **values})


def read_recipe(path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file's keys, over those of its `base` recipe (a path relative to the file) when it names one, so a
    variant states only what it changes."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"recipe file {path} does not exist")
    if path.resolve() in seen:
        raise UserInputError(f"recipe {path} is its own base")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserInputError(f"cannot parse {path}: {str(error).splitlines()[0]}") from None
    if isinstance(raw, dict) and BASE in raw:
        base = path.parent / str(raw.pop(BASE))
        base_raw = read_recipe(base, (*seen, path.resolve()))
        if not isinstance(base_raw, dict):
            raise UserInputError(f"{path}: its base {base} holds no recipe keys")
        raw = merge_values(base_raw, raw)
    return raw


def load_recipe(path: str | Path) -> tuple[dict[str, Any], list[TrainConfig]]:
    """(the recipe's top-level keys, one config per stage in training order)."""
    raw = read_recipe(path)
    if not isinstance(raw, dict) or set(raw) - RECIPE_KEYS or not set(STAGES) <= set(raw) or "output_dir" not in raw:
        raise UserInputError(f"{path} must hold output_dir, {', '.join(STAGES)} (and optionally base, export, "
                             f"teacher_export, shared); found: {', '.join(map(str, raw)) or 'nothing'}")
    out = Path(raw["output_dir"])
    trained = {stage: str(out / stage / TRANSFORMER_EXPORT) for stage in STAGES}
    chained = {"teacher": {}, "forcing": {"model": {"init": trained["teacher"]}},
               "dmd": {"model": {"init": trained["forcing"], "teacher": trained["teacher"]},
                       "export_pipeline": True}}
    codec = {"model": {"codec": str(out / CODEC / CODEC_EXPORT)}} if CODEC in raw else {}
    configs = []
    for stage in STAGES:
        values = merge_values(merge_values(raw.get("shared") or {}, raw[stage] or {}), chained[stage])
        values = merge_values(values, codec)
        configs.append(config_from_dict(stage, {**values, "output_dir": str(out / stage)}))
    return raw, configs


def stage_config(path: str | Path, stage: str) -> TrainConfig:
    """`stage`'s config from a stage file, or from a recipe (a file with a section per stage), chained as in a run of
    the whole recipe."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        raw = None  # load_config says what is wrong with the file
    if isinstance(raw, dict) and set(raw) & {*STAGES, BASE}:
        return dict(zip(STAGES, load_recipe(path)[1]))[stage]
    return load_config(path, stage)


def run_recipe(path: str | Path) -> Path:
    """Train every stage in order (a finished stage is not retrained), copy the exports; returns the student."""
    raw, configs = load_recipe(path)
    codec = codec_config(raw)
    if codec is not None and not (Path(codec.output_dir) / CODEC_EXPORT / "config.json").is_file():
        train_codec(codec)
    for config in configs:
        done = Path(config.output_dir) / TRANSFORMER_EXPORT / "config.json"
        if not done.is_file():
            Trainer(config).train()
    student = Path(configs[-1].output_dir) / PIPELINE_EXPORT
    if raw.get("export"):
        shutil.copytree(student, raw["export"], dirs_exist_ok=True)
        student = Path(raw["export"])
    if raw.get("teacher_export"):
        shutil.copytree(Path(configs[0].output_dir) / TRANSFORMER_EXPORT, raw["teacher_export"], dirs_exist_ok=True)
    return student
