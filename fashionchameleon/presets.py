"""Named model presets: the one home of each model's numbers (architecture, schedule, stream, teacher sampling,
serving) and of how its weights are made or loaded. Where a preset does not set a value, the dataclass default is
the paper's (`rollout.StreamConfig`, `teacher.TeacherSampling`). No code outside this file asks which preset it runs.

| preset          | weights                                                      | runs on        |
|-----------------|--------------------------------------------------------------|----------------|
| `mini`          | trained on the mini wardrobe world (`fashionchameleon/assets/mini`) | CPU, real time |
| `tiny`          | the real architecture at a tiny size, random and seeded      | CPU, seconds   |
| `wan22-ti2v-5b` | Wan2.2-TI2V-5B base + FashionChameleon transformer           | one GPU, bf16  |
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

from .errors import UserInputError
from .models.causal_wan import CausalWanTransformer3DModel
from .models.text import tiny_text_stack
from .pipeline import FashionChameleonPipeline
from .rollout import StreamConfig
from .teacher import TeacherSampling

logger = logging.getLogger(__name__)

BASE_MODEL_ENV = "FASHIONCHAMELEON_BASE"
CHECKPOINT_ENV = "FASHIONCHAMELEON_CHECKPOINT"
ASSETS = Path(__file__).resolve().parent / "assets"
WORLD_EXAMPLES = ASSETS / "world"


@dataclass(frozen=True)
class Serving:
    """What the app offers for a preset: streams generated at once, how chunks reach the page, notes on the page. (A
    stream runs until Stop, up to the length that `serving.budget` allows.)"""

    streams: int = 1  # one stream per model replica keeps a large model at full speed
    notice: str = ""  # shown under the title (what inputs the model knows)
    strip_format: str = "png"  # how chunks travel to the page's player (`media.STRIP_FORMATS`): exact for small frames
    prompt_note: str = ""  # shown under the prompt box: what a prompt does with this model


@dataclass(frozen=True)
class Preset:
    """Everything that differs between models. `build(preset, seed, device)` makes the architecture with fresh
    weights; trained weights come from `weights` (a shipped pipeline folder) or `load_trained(preset, checkpoint,
    base, text_encoder, device)`."""

    name: str
    description: str
    transformer: dict  # CausalWanTransformer3DModel config
    stream: StreamConfig
    build: Callable[..., FashionChameleonPipeline]
    codec: dict = field(default_factory=dict)  # AutoencoderPixelShuffle config, for a `build` that makes one
    timestep_shift: float = 5.0  # sigma' = s sigma / (1 + (s - 1) sigma), for the student and the teacher alike
    teacher: TeacherSampling = TeacherSampling()
    serving: Serving = Serving()
    examples: Path = WORLD_EXAMPLES  # reference.png and garment_*.png shown by the app and used by `bench`
    weights: Path | None = None
    load_trained: Callable[..., FashionChameleonPipeline] | None = None
    random_weights: bool = False  # no trained weights exist: the output is noise by design
    cuda_dtype: torch.dtype = torch.float32  # the model's dtype on a GPU (always fp32 on a CPU)

    def dtype(self, device: torch.device | str | None) -> torch.dtype:
        return self.cuda_dtype if torch.device(device or "cpu").type == "cuda" else torch.float32

    def scheduler(self, num_train_timesteps: int) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=self.timestep_shift)

    def example_inputs(self) -> tuple[Path, list[Path]]:
        """(reference photo, wardrobe garments) of `examples`."""
        return self.examples / "reference.png", sorted(self.examples.glob("garment_*.png"))


def perturb_(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> None:
    """Nudge every parameter so norms and biases are not at their identity init (random weights must be generic)."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)


def _assemble(preset: Preset, transformer, vae, seed: int, text_dim: int | None = None) -> FashionChameleonPipeline:
    """A pipeline around fresh `transformer` and `vae` with a tiny seeded text stack (prompts are encoded once)."""
    tokenizer, text_encoder = tiny_text_stack(seed=seed, d_model=text_dim or preset.transformer["text_dim"])
    return FashionChameleonPipeline(tokenizer, text_encoder.to(transformer.device), transformer.eval(), vae.eval(),
                                    preset.scheduler(transformer.config.num_train_timesteps))


# -- tiny: the real architecture at a size a CPU runs in seconds -------------------------------------------
TINY_VAE = dict(
    base_dim=8, decoder_base_dim=16, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_spatial=16, scale_factor_temporal=4,
)


def build_tiny(preset: Preset, seed: int = 0, device: torch.device | str | None = None) -> FashionChameleonPipeline:
    """Same classes and code paths as the 5B, random seeded weights (the global RNG is left alone)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # module init draws from the global RNG
        torch.manual_seed(seed)
        transformer = CausalWanTransformer3DModel(**preset.transformer)
        z = TINY_VAE["z_dim"]
        vae = AutoencoderKLWan(**TINY_VAE, latents_mean=(torch.randn(z, generator=generator) * 0.1).tolist(),
                               latents_std=(1.0 + torch.rand(z, generator=generator)).tolist())
    for module in (transformer, vae):
        perturb_(module, generator)
    return _assemble(preset, transformer, vae, seed)


# -- mini: trained in the mini wardrobe world, the default on a CPU -------------------------------------------
MINI_STATS_CLIPS = 64  # miniworld clips whose frames set the codec's channel normalisation


def build_mini(preset: Preset, seed: int = 0, device: torch.device | str | None = None) -> FashionChameleonPipeline:
    """The untrained architecture that `configs/mini.yaml` trains, with the codec normalised on world frames."""
    from .media import image_to_tensor
    from .miniworld import make_triplet
    from .models.vae import AutoencoderPixelShuffle

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = CausalWanTransformer3DModel(**preset.transformer)
        codec = AutoencoderPixelShuffle(**preset.codec)
    height, width = preset.stream.height, preset.stream.width
    frames = [make_triplet(seed * MINI_STATS_CLIPS + i, 1, height, width).video[0] for i in range(MINI_STATS_CLIPS)]
    codec.fit_channel_stats(torch.stack([image_to_tensor(f) for f in frames], dim=1)[None])
    return _assemble(preset, transformer, codec, seed)


# -- wan22-ti2v-5b: the paper's model ---------------------------------------------------------------------
WAN22_BASE = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
WAN22_VAE = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_spatial=16, scale_factor_temporal=4,
)
RANDOM_TEXT_DIM = 32  # random full-size weights get a tiny text stack: prompts are encoded once per stream


def build_wan22(preset: Preset, seed: int = 0, device: torch.device | str | None = None) -> FashionChameleonPipeline:
    """The full-size transformer and VAE with random weights, made on `device` (for `bench`: speed does not
    depend on the values)."""
    with torch.device(device or "cpu"):
        transformer = CausalWanTransformer3DModel(**{**preset.transformer, "text_dim": RANDOM_TEXT_DIM})
        vae = AutoencoderKLWan(**WAN22_VAE)
    dtype = preset.dtype(device)
    return _assemble(preset, cast_except_fp32_modules(transformer, dtype), cast_except_fp32_modules(vae, dtype),
                     seed, text_dim=RANDOM_TEXT_DIM)


def load_wan22(preset: Preset, checkpoint: str | os.PathLike | None, base: str | os.PathLike | None,
               text_encoder: bool, device: torch.device | str | None = None) -> FashionChameleonPipeline:
    """Wan2.2-TI2V-5B from a diffusers base (hub id or folder) with FashionChameleon transformer weights:
    `checkpoint` is a diffusers transformer folder, a .safetensors file or the authors' `model.pt`."""
    from .models.convert import load_transformer_weights

    dtype = preset.dtype(device)
    base = base or os.environ.get(BASE_MODEL_ENV, WAN22_BASE)
    checkpoint = checkpoint or os.environ.get(CHECKPOINT_ENV)
    if checkpoint is None:
        raise UserInputError(
            f"preset {preset.name} needs FashionChameleon weights: pass --checkpoint or set {CHECKPOINT_ENV}"
        )
    if (Path(checkpoint) / "config.json").is_file():
        transformer = CausalWanTransformer3DModel.from_pretrained(checkpoint, dtype=dtype)
    else:
        # Loading the base transformer first keeps diffusers' dtype rules (RoPE, norms, time embedder in fp32);
        # load_state_dict then copies the FashionChameleon values into those tensors.
        transformer = CausalWanTransformer3DModel.from_pretrained(base, subfolder="transformer", dtype=dtype)
        transformer.load_state_dict(load_transformer_weights(checkpoint), strict=True)
    extra = {} if text_encoder else {"text_encoder": None}
    return FashionChameleonPipeline.from_pretrained(base, transformer=transformer, dtype=dtype, **extra)


def cast_except_fp32_modules(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)` that, like diffusers' `from_pretrained(dtype=...)`, keeps in fp32 every parameter
    whose dotted name contains a `_keep_in_fp32_modules` entry: modules (`time_embedder`, the norms) and bare
    parameters alike (`scale_shift_table`), so a random-weight model is dtype-identical to a loaded one."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if param.is_floating_point() and not keep & set(name.split(".")):
            param.data = param.data.to(dtype)
    return model


PRESETS: dict[str, Preset] = {
    "mini": Preset(
        "mini", "trained on the mini wardrobe world (48 wide x 64 tall, 12 fps; real garment switching on a CPU)",
        transformer=dict(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=8, out_channels=8,
            text_dim=32, freq_dim=64, ffn_dim=512, num_layers=6, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", prediction_type="sample",
        ),
        stream=StreamConfig(height=64, width=48, history_frames=6,  # 3 sink + 6 history = a training clip's 9
                            max_text_tokens=8, fps=12),
        build=build_mini,
        # 4x4 space-to-depth (48 x 64 frames -> 48 channels x 16 x 12), then a learned 48 -> 8 channel encoder and
        # decoder of 2 tiny-autoencoder blocks 96 wide (trained by the recipe's codec stage, configs/mini.yaml)
        codec=dict(factor=4, latent_channels=8, width=96, num_blocks=2),
        # The world has no captions: guidance drops the garment instead of the text.
        teacher=TeacherSampling(steps=25, guidance=2.5, latent_frames=9, guidance_condition="garment",
                                weights=ASSETS / "mini-teacher"),
        serving=Serving(streams=2, prompt_note=(
            "The mini world has no captions, so this model was trained with empty prompts: leave it empty (text only "
            "perturbs the video)."), notice=(
            "This model was trained only on the **mini wardrobe world** (small procedural people and flat-lay "
            "tees): start from the examples below; photos of real people come out as that world.")),
        weights=ASSETS / "mini",
    ),
    "tiny": Preset(
        "tiny", "tiny random-weight Wan2.2 (real architecture; output is noise by design)",
        transformer=dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        ),
        stream=StreamConfig(height=96, width=64),
        build=build_tiny,
        serving=Serving(streams=2),
        random_weights=True,
    ),
    "wan22-ti2v-5b": Preset(
        "wan22-ti2v-5b", "FashionChameleon on Wan2.2-TI2V-5B (1280x704, bf16)",
        transformer=dict(
            patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
            text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        ),
        stream=StreamConfig(height=1280, width=704),
        build=build_wan22,
        serving=Serving(strip_format="jpeg", notice="The examples are drawn by the mini wardrobe world: for this model, "
                                                    "upload a photo of a person and a garment shot on white."),
        load_trained=load_wan22,
        cuda_dtype=torch.bfloat16,
    ),
}
DEFAULT_PRESET = "mini"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserInputError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


ARCHITECTURE_PARTS = ("transformer", "codec")


def with_architecture(preset: Preset, overrides: dict | None) -> Preset:
    """`preset` with some of its `transformer` and `codec` settings replaced (a training run trying another
    architecture, e.g. a finer codec): only settings the preset already has, so a misspelt key is an error."""
    overrides = overrides or {}
    for part, values in overrides.items():
        if part not in ARCHITECTURE_PARTS or not isinstance(values, dict):
            raise UserInputError(f"architecture overrides {', '.join(ARCHITECTURE_PARTS)} (each a mapping of "
                                 f"settings), got {part!r}")
        unknown = sorted(set(values) - set(getattr(preset, part)))
        if unknown:
            raise UserInputError(f"architecture.{part}.{unknown[0]} is not a setting of preset {preset.name}'s "
                                 f"{part}; known: {', '.join(getattr(preset, part)) or 'none'}")
    return replace(preset, **{part: {**getattr(preset, part), **values} for part, values in overrides.items()})


def load_preset(
    name: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    random_weights: bool = False,
    seed: int = 0,
    base: str | os.PathLike | None = None,
    text_encoder: bool = True,
    architecture: dict | None = None,
) -> tuple[Preset, FashionChameleonPipeline]:
    """A preset's pipeline on `device` (CUDA when available) with the preset's schedule.

    Weights: a `checkpoint` pipeline folder (`save_pretrained`, what training exports) for any preset, streaming with
    the settings it was saved with (a run may train at another size); else fresh ones with `random_weights` (or when
    the preset has no trained weights); else the preset's own, streaming with the preset's settings.
    `text_encoder=False` leaves UMT5 out where it would be loaded from disk (training with a latent cache);
    `architecture` changes fresh weights' shapes (`with_architecture`; saved weights carry their own)."""
    preset = get_preset(name)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = preset.dtype(device)
    if checkpoint is not None and (Path(checkpoint) / "model_index.json").is_file():
        pipe = load_saved_pipeline(checkpoint, text_encoder, dtype)
    elif random_weights or (preset.random_weights and checkpoint is None):
        pipe = preset.build(with_architecture(preset, architecture), seed, device)
    elif preset.load_trained is not None:
        pipe = preset.load_trained(preset, checkpoint, base, text_encoder, device)
    else:
        pipe = load_saved_pipeline(checkpoint or preset.weights, text_encoder, dtype)
    if checkpoint is None or pipe.config.stream is None:
        pipe.register_to_config(stream=preset.stream.to_dict())
    # The base's own scheduler may be the teacher's UniPC; the student samples on the warped flow-matching table.
    pipe.register_modules(scheduler=preset.scheduler(pipe.transformer.config.num_train_timesteps))
    return preset, pipe.to(device)


def load_saved_pipeline(path: str | os.PathLike, text_encoder: bool = True,
                        dtype: torch.dtype = torch.float32) -> FashionChameleonPipeline:
    if not Path(path).is_dir() or not (Path(path) / "model_index.json").is_file():
        raise UserInputError(f"{path} is not a saved pipeline folder (no model_index.json)")
    extra = {} if text_encoder else {"text_encoder": None}
    return FashionChameleonPipeline.from_pretrained(path, dtype=dtype, **extra)
