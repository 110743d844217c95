"""Training configs: one dataclass per stage, whose defaults are the paper's settings (docs/method.md §2-§5).

A YAML or JSON file overrides only what differs (nanoGPT's habit): `configs/teacher_5b.yaml` spells the paper's
5B run out in full, `configs/*_tiny.yaml` shrink it to a CPU run on the same code path. What a run shares with
inference (architecture, schedule, frame size, chunking, steps, text length) comes from the preset it names;
`stream:` overrides the preset's stream settings for a run that trains at another size. Where the authors' released
configs differ from the paper (docs/method.md §10), the default follows the paper and the comment names the other
value.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..errors import UserInputError
from ..rollout import StreamConfig

# The Wan2.x negative prompt; the unconditional branch of DMD's CFG uses it (docs/method.md §2.4), never "".
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)


@dataclass
class DataConfig:
    """Where the triplets are and how a sample becomes tensors (docs/method.md §2); frames, reference and garment
    are sized to the run's stream."""

    root: str = "data"  # dataset folder
    layout: str = "authors"  # "authors": meta_train.csv + X_src.png / X_cloth.png beside X.mp4; "folder": ours;
    #                          "miniworld": triplets drawn procedurally (issue 7), no files: `root` is unused
    clips: int = 100_000  # miniworld: clip seeds 0 .. clips-1 (held-out evaluation draws from EVAL_SEED_OFFSET on)
    meta_file: str = "meta_train.csv"  # authors' layout: the CSV inside `root`
    video_root: str | None = None  # base of relative `video` paths in the CSV (default: `root`)
    caption_key: str = "en_long"  # prompt JSON key holding [dynamic, static]
    mixed_captions: bool = False  # True: dynamic part only with `short_caption_prob`, else dynamic + static
    short_caption_prob: float = 0.7
    empty_prompt_prob: float = 0.0  # the teacher stage trains the unconditional branch with 0.1
    garment_drop_prob: float = 0.0  # show a blank garment canvas instead (trains garment guidance; `mini`: 0.1)
    num_frames: int = 81  # first N frames of each clip, no resampling; 4k + 1
    latent_cache: str | None = None  # folder of pre-encoded VAE/UMT5 outputs (built on first use)
    num_workers: int = 4


@dataclass
class ModelConfig:
    """Which weights each network starts from."""

    pipeline: str | None = None  # local diffusers folder (ours or a stock Wan2.2 one); None: the preset's own weights
    seed: int = 0  # weights seed of fresh random weights
    random_weights: bool = False  # start from fresh random weights of the preset's architecture
    init: str | None = None  # trained transformer weights (folder, .safetensors or model.pt); None: the pipeline's
    teacher: str | None = None  # DMD: stage-1 weights for the frozen real score and the critic's start
    codec: str | None = None  # a trained frame codec folder (the recipe's codec stage) that replaces the preset's vae
    # fresh weights of another shape: overrides of the preset's `transformer` and `codec` settings (presets.py
    # `with_architecture`), e.g. {codec: {factor: 2}, transformer: {patch_size: [1, 4, 4]}}; a recipe's `shared`
    # gives them to its codec stage too
    architecture: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = True


@dataclass
class OptimConfig:
    """AdamW and a step-wise learning rate: linear warm-up, then constant with multiplicative drops."""

    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    decay_steps: tuple[int, ...] = ()  # at each of these steps the lr is multiplied by `decay_factor`
    decay_factor: float = 0.5

    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return self.lr * warm * self.decay_factor ** sum(step >= s for s in self.decay_steps)


@dataclass
class RewardConfig:
    """GR-DMD's reward (docs/method.md §4.1): "aesthetic" (CLIP ViT-L/14 + LAION MLP from local files), "world" (the
    mini wardrobe world's exact per-frame quality; needs data.layout "miniworld"), "tiny" (a seeded stand-in of the
    aesthetic architecture, for tests) or "none" (uniform weights: plain DMD)."""

    kind: str = "aesthetic"
    clip: str | None = None  # local folder of openai/clip-vit-large-patch14 (model + preprocessor config)
    head: str | None = None  # sac+logos+ava1-l14-linearMSE as .safetensors or .pth
    temperature: float = 0.2  # chunk weights softmax(-score / temperature)


@dataclass
class TrainConfig:
    """What every stage shares: the run, the data, the weights, the optimizer of the trained network."""

    stage: ClassVar[str] = ""
    preset: str = "wan22-ti2v-5b"  # the model: architecture, schedule and stream settings (presets.py)
    stream: dict[str, Any] = field(default_factory=dict)  # overrides of the preset's stream settings
    output_dir: str = "runs/train"
    seed: int = 0  # process k uses seed + k for noise and data; the shared exit step uses seed on every process
    max_steps: int = 1000
    max_seconds: float = 0.0  # also stop once this run has trained this long (0: no limit), saving and exporting
    batch_size: int = 1  # per process
    grad_accum: int = 1
    mixed_precision: str = "auto"  # "auto": bf16 on GPU, fp32 on CPU; or "no", "bf16", "fp16"
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint in output_dir
    export_pipeline: bool = False  # also save a whole pipeline folder (what `--checkpoint` of any preset loads)
    ema_decay: float = 0.0  # EMA of the trained network; 0 = none
    ema_start_step: int = 0
    loss_weighting: str = "wan"  # flow-matching loss weight over t: "wan" bell curve (docs/method.md §5) or "none"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, **dataclasses.asdict(self)}

    def stream_config(self) -> StreamConfig:
        """The preset's stream settings with this run's `stream` overrides (an unknown key is an error)."""
        from ..presets import get_preset

        return _build(StreamConfig, self.stream, "stream.", default=get_preset(self.preset).stream)


@dataclass
class TeacherConfig(TrainConfig):
    """Stage 1, in-context teacher: bidirectional full fine-tune with flow matching (docs/method.md §5)."""

    stage: ClassVar[str] = "teacher"
    max_steps: int = 2300  # authors' config: 5000
    data: DataConfig = field(default_factory=lambda: DataConfig(mixed_captions=True, empty_prompt_prob=0.1))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-5, betas=(0.9, 0.999), grad_clip=1.0, warmup_steps=200, decay_steps=(1100,)))  # authors: warm-up 100


@dataclass
class ForcingConfig(TrainConfig):
    """Stage 2, in-context teacher forcing: clean + noisy halves under the §3.2 mask, t per chunk of the stream."""

    stage: ClassVar[str] = "forcing"
    max_steps: int = 4000  # authors' config: 7000
    attention: str = "mask"  # "mask": exact boolean mask (any device, O(L^2) memory); "flex": compiled FlexAttention
    # over a BlockMask (GPU: torch has no flex backward on CPU)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, betas=(0.0, 0.999), grad_clip=10.0))


@dataclass
class DMDConfig(TrainConfig):
    """Stage 3, gradient-reweighted DMD (docs/method.md §4): `optim` is the generator's, `critic_optim` the fake
    score's. The rollout uses the stream's chunks and steps; the real score's guidance drops what the preset's
    teacher was trained to drop (text or garment)."""

    stage: ClassVar[str] = "dmd"
    max_steps: int = 400  # authors' config: 3000 (the paper's 400 may count generator updates; docs/method.md §11)
    generator_every: int = 5  # the generator updates when step % generator_every == 0; the critic every step
    guidance_scale: float = 3.0  # real score = cond + scale * (cond - uncond)
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    timestep_range: tuple[float, float] = (0.02, 0.98)  # DMD/critic t, as a fraction of the training steps
    context_noise: float = 0.0  # sigma of the noise in the rollout's commit pass (authors' training: ~0.005)
    rollout_chunks: int = 0  # 0: a rollout as long as a training clip, which never evicts (the paper). More: the
    #   rollout streams in the preset's window, evicting as a long stream does, and DMD and the critic score its last
    #   clip's worth of chunks (Self-Forcing++'s extended rollouts, against drift; the earlier chunks carry no gradient)
    ema_decay: float = 0.99
    ema_start_step: int = 200
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-6, betas=(0.0, 0.999), grad_clip=10.0))
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-7, betas=(0.0, 0.999),
                                                                          grad_clip=10.0))


@dataclass
class CodecConfig:
    """The `mini` codec's learned part (training/codec.py), trained on world frames before the three stages; its
    architecture is the preset's `codec` with `architecture` overrides. Steps take about 0.1 s on 2 CPU cores."""

    preset: str = "mini"
    architecture: dict[str, Any] = field(default_factory=dict)  # as `ModelConfig.architecture`
    output_dir: str = "runs/codec"
    seed: int = 0
    max_steps: int = 8_000
    max_seconds: float = 0.0  # also stop once it has trained this long (0: no limit)
    batch_size: int = 32  # frames
    clips: int = 3_000  # world clips whose frames (video, reference, flat-lay garment) make the training pool
    clip_frames: int = 9  # video frames rendered per clip
    stats_clips: int = 64  # the first clips of the pool, whose latents set the channel normalisation
    log_every: int = 250
    eval_clips: int = 16  # held-out clips (from EVAL_SEED_OFFSET) whose reconstruction error is logged
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=100,
                                                                   decay_steps=(4_000, 6_000, 7_500)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


STAGES: dict[str, type[TrainConfig]] = {c.stage: c for c in (TeacherConfig, ForcingConfig, DMDConfig)}


def load_config(path: str | Path, stage: str) -> TrainConfig:
    """Read a YAML/JSON file over the stage's defaults. A `stage:` key in the file must match `stage`."""
    if stage not in STAGES:
        raise UserInputError(f"unknown training stage {stage!r}; choose one of: {', '.join(STAGES)}")
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"config file {path} does not exist")
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (ValueError, yaml.YAMLError) as error:
        raise UserInputError(f"cannot parse {path}: {str(error).splitlines()[0]}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserInputError(f"{path} must hold a mapping of config keys, got {type(raw).__name__}")
    file_stage = raw.pop("stage", stage)
    if file_stage != stage:
        raise UserInputError(f"{path} is a {file_stage!r} config, not {stage!r}")
    return config_from_dict(stage, raw)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs as nested values: dotted keys, YAML values (`reward.kind=world`, `max_steps=50`)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key or "" in key.split("."):
            raise UserInputError(f"--set takes KEY=VALUE with a dotted KEY (e.g. reward.kind=world), got {pair!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise UserInputError(f"--set {key}: cannot read {text!r} as a value") from None
        *parents, leaf = key.split(".")
        node = values
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise UserInputError(f"--set {key}: {name} is given a value and keys at once")
        node[leaf] = value
    return values


def with_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """`config` with `overrides` (nested values, as `parse_overrides` makes) applied and checked like a file's."""
    return config_from_dict(config.stage, merge_values(dataclasses.asdict(config), overrides)) if overrides else config


def merge_values(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` over `base`, nested mappings merged key by key (a recipe's sections, --set overrides)."""
    merged = dict(base)
    for key, value in over.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge_values(merged[key], value) if nested else value
    return merged


def config_from_dict(stage: str, values: dict[str, Any]) -> TrainConfig:
    """The stage's config with `values` (nested dicts) applied; unknown keys, bad types and an unknown preset or
    stream setting are errors."""
    from ..presets import get_preset, with_architecture

    config = _build(STAGES[stage], values, "")
    config.stream_config()
    with_architecture(get_preset(config.preset), config.model.architecture)
    return config


def build_config(cls: type, values: dict[str, Any]):
    """A config dataclass (one without stages: the codec's) from nested `values`, checked like a stage's."""
    return _build(cls, values, "")


def _build(cls: type, values: dict[str, Any], prefix: str, default: Any = None):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserInputError(f"unknown config key {prefix}{unknown[0]}; known: {', '.join(sorted(fields))}")
    default = cls() if default is None else default
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserInputError(f"config key {prefix}{name} must be a mapping, got {value!r}")
            merged = {**dataclasses.asdict(getattr(default, name)), **value}
            kwargs[name] = _build(hint, merged, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(hint, value, f"{prefix}{name}")
    return dataclasses.replace(default, **kwargs)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    """YAML gives lists for tuples and strings for some floats (`1e-5`); anything else must already fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin is tuple:
            item = args[0]
            return tuple(_coerce(item, v, name) for v in value)
        if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if hint is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if hint in (str, bool) and isinstance(value, hint):
            return value
        if origin is dict and isinstance(value, dict):
            return dict(value)
    except (TypeError, ValueError):
        pass
    raise UserInputError(f"config key {name} must be {getattr(hint, '__name__', hint)}, got {value!r}")
