"""Named model presets: every stream and schedule number lives here, and how each preset is loaded.

| preset          | weights                                                  | runs on        |
|-----------------|----------------------------------------------------------|----------------|
| `mini`          | trained on the mini wardrobe world (`assets/mini`)       | CPU, real time |
| `tiny`          | the real architecture at a tiny size, random and seeded  | CPU, seconds   |
| `wan22-ti2v-5b` | Wan2.2-TI2V-5B base + FashionChameleon transformer       | one GPU, bf16  |
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

from .errors import UserInputError
from .models.causal_wan import CausalWanTransformer3DModel
from .models.kv_cache import WindowPolicy
from .pipeline import FashionChameleonPipeline

logger = logging.getLogger(__name__)

BASE_MODEL_ENV = "FASHIONCHAMELEON_BASE"
CHECKPOINT_ENV = "FASHIONCHAMELEON_CHECKPOINT"


@dataclass(frozen=True)
class StreamConfig:
    """How a stream is generated (METHOD.md §3): sizes, chunking, the 4-step schedule and the cache window."""

    height: int  # pixels
    width: int
    chunk_frames: int = 3  # latent frames per chunk: 9 pixel frames for the first chunk, 12 after
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)  # warped by the scheduler's shift (5)
    sink_frames: int = 3
    history_frames: int = 18
    max_text_tokens: int = 512
    fps: int = 24
    # The teacher-style baseline of `bench` (whole clip at once, CFG): METHOD.md §9.
    teacher_steps: int = 50
    teacher_guidance: float = 3.0
    teacher_latent_frames: int = 21
    guidance_condition: str = "text"  # what the teacher's unconditional branch drops: "text" or "garment"

    @property
    def window(self) -> WindowPolicy:
        return WindowPolicy(sink_frames=self.sink_frames, history_frames=self.history_frames)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    stream: StreamConfig
    load: Callable[..., FashionChameleonPipeline]
    random_weights: bool = False  # output is noise by design


# -- tiny: the real architecture at a size a CPU runs in seconds -------------------------------------------
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
    text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
)
TINY_VAE = dict(
    base_dim=8, decoder_base_dim=16, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_spatial=16, scale_factor_temporal=4,
)
TINY_STREAM = StreamConfig(height=96, width=64)


def perturb_(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.05) -> None:
    """Nudge every parameter so norms and biases are not at their identity init (random weights must be generic)."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)


def build_tiny(seed: int = 0, **_: object) -> FashionChameleonPipeline:
    """The `tiny` preset, built in code: same classes and code paths as the 5B, random seeded weights."""
    from .models.text import tiny_text_stack

    generator = torch.Generator().manual_seed(seed)
    tokenizer, text_encoder = tiny_text_stack(seed=seed, d_model=TINY_TRANSFORMER["text_dim"])
    with torch.random.fork_rng(devices=[]):  # module init draws from the global RNG; leave the caller's alone
        torch.manual_seed(seed)
        transformer = CausalWanTransformer3DModel(**TINY_TRANSFORMER)
        z = TINY_VAE["z_dim"]
        vae = AutoencoderKLWan(
            **TINY_VAE,
            latents_mean=(torch.randn(z, generator=generator) * 0.1).tolist(),
            latents_std=(1.0 + torch.rand(z, generator=generator)).tolist(),
        )
    for module in (transformer, vae):
        perturb_(module, generator)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    pipe = FashionChameleonPipeline(tokenizer, text_encoder, transformer.eval(), vae.eval(), scheduler)
    return pipe


# -- mini: trained in the mini wardrobe world (issue 7), the default on a CPU ---------------------------------
MINI_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=48, out_channels=48,
    text_dim=32, freq_dim=64, ffn_dim=512, num_layers=6, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    prediction_type="sample",
)
MINI_CODEC = dict(factor=4)  # exact 4x4 space-to-depth: 64x48 frames -> 48 x 16 x 12 latents, 48 tokens a frame
MINI_STREAM = StreamConfig(
    height=64, width=48, history_frames=6,  # window = 3 sink + 6 history = the 9 frames a training clip has
    max_text_tokens=8, fps=12, teacher_steps=25, teacher_guidance=2.5, teacher_latent_frames=9,
    guidance_condition="garment",  # the world has no captions: guidance drops the garment instead of the text
)
MINI_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "mini"
MINI_TEACHER = MINI_WEIGHTS.parent / "mini-teacher"  # the stage-1 teacher's transformer (eval's teacher rows)
MINI_STATS_CLIPS = 64  # miniworld clips whose frames set the codec's channel normalisation


def build_mini(checkpoint: str | os.PathLike | None = None, random_weights: bool = False, seed: int = 0,
               **_: object) -> FashionChameleonPipeline:
    """The `mini` preset: the shipped weights in `assets/mini` (or a `checkpoint` pipeline folder), or with
    `random_weights` the untrained architecture that `configs/mini.yaml` trains (codec normalised on the world)."""
    if not random_weights:
        return load_saved_pipeline(checkpoint or MINI_WEIGHTS)
    from .media import image_to_tensor
    from .miniworld import make_triplet
    from .models.text import tiny_text_stack
    from .models.vae import AutoencoderPixelShuffle

    tokenizer, text_encoder = tiny_text_stack(seed=seed, d_model=MINI_TRANSFORMER["text_dim"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = CausalWanTransformer3DModel(**MINI_TRANSFORMER)
    codec = AutoencoderPixelShuffle(**MINI_CODEC)
    frames = [make_triplet(seed * MINI_STATS_CLIPS + i, 1, MINI_STREAM.height, MINI_STREAM.width).video[0]
              for i in range(MINI_STATS_CLIPS)]
    codec.fit_channel_stats(torch.stack([image_to_tensor(f) for f in frames], dim=1)[None])
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    return FashionChameleonPipeline(tokenizer, text_encoder, transformer.eval(), codec.eval(), scheduler)


# -- wan22-ti2v-5b: the paper's model ---------------------------------------------------------------------
WAN22_BASE = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
WAN22_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
    text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
WAN22_VAE = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
    scale_factor_spatial=16, scale_factor_temporal=4,
)
WAN22_STREAM = StreamConfig(height=1280, width=704)


def build_wan22(
    checkpoint: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    random_weights: bool = False,
    **_: object,
) -> FashionChameleonPipeline:
    """Wan2.2-TI2V-5B from a diffusers base (hub id or folder) with FashionChameleon transformer weights.

    `checkpoint` is a diffusers transformer folder, a .safetensors file or the authors' `model.pt`.
    `random_weights` builds the full-size model with random values and reads nothing (for `bench`: speed
    does not depend on the values).
    """
    from .models.convert import load_transformer_weights

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if random_weights:
        return _random_full_size(dtype)
    base = base or os.environ.get(BASE_MODEL_ENV, WAN22_BASE)
    checkpoint = checkpoint or os.environ.get(CHECKPOINT_ENV)
    if checkpoint is None:
        raise UserInputError(
            f"preset wan22-ti2v-5b needs FashionChameleon weights: pass --checkpoint or set {CHECKPOINT_ENV}"
        )
    if (Path(checkpoint) / "config.json").is_file():
        transformer = CausalWanTransformer3DModel.from_pretrained(checkpoint, torch_dtype=dtype)
    else:
        # Loading the base transformer first keeps diffusers' dtype rules (RoPE, norms, time embedder in fp32);
        # load_state_dict then copies the FashionChameleon values into those tensors.
        transformer = CausalWanTransformer3DModel.from_pretrained(base, subfolder="transformer", torch_dtype=dtype)
        transformer.load_state_dict(load_transformer_weights(checkpoint), strict=True)
    # The base's own scheduler is the teacher's UniPC; the student samples on the warped flow-matching table.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    return FashionChameleonPipeline.from_pretrained(base, transformer=transformer, scheduler=scheduler, torch_dtype=dtype)


def cast_except_fp32_modules(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)` that, like diffusers' `from_pretrained(torch_dtype=...)`, leaves the modules the model
    keeps in fp32 alone (a plain `.to` would round the RoPE tables to bf16)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if keep & set(name.split(".")):
            continue
        for key, param in module.named_parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
    return model


def _random_full_size(dtype: torch.dtype) -> FashionChameleonPipeline:
    """Full-size transformer and VAE with random weights; the text stack is tiny (prompts are encoded once)."""
    from .models.text import tiny_text_stack

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        transformer = CausalWanTransformer3DModel(**{**WAN22_TRANSFORMER, "text_dim": 32})
        vae = AutoencoderKLWan(**WAN22_VAE)
    tokenizer, text_encoder = tiny_text_stack(d_model=32)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    return FashionChameleonPipeline(
        tokenizer,
        text_encoder.to(device),
        cast_except_fp32_modules(transformer, dtype).eval(),
        cast_except_fp32_modules(vae, dtype).eval(),
        scheduler,
    )


PRESETS: dict[str, Preset] = {
    "mini": Preset("mini", "trained on the mini wardrobe world (64x48, 12 fps; real garment switching on a CPU)",
                   MINI_STREAM, build_mini),
    "tiny": Preset("tiny", "tiny random-weight Wan2.2 (real architecture; output is noise by design)",
                   TINY_STREAM, build_tiny, random_weights=True),
    "wan22-ti2v-5b": Preset("wan22-ti2v-5b", "FashionChameleon on Wan2.2-TI2V-5B (1280x704, bf16)",
                            WAN22_STREAM, build_wan22),
}
DEFAULT_PRESET = "mini"


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserInputError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def load_preset(
    name: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    **kwargs: object,
) -> tuple[Preset, FashionChameleonPipeline]:
    """Load a preset's pipeline onto `device` (CUDA when available). A `checkpoint` folder saved with
    `save_pretrained` replaces the preset's built-in weights for `tiny`."""
    preset = get_preset(name)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name == "tiny" and checkpoint is not None:  # `mini` reads its `checkpoint` folder itself
        pipe = load_saved_pipeline(checkpoint)
    else:
        pipe = preset.load(checkpoint=checkpoint, **kwargs)
    return preset, pipe.to(device)


def load_saved_pipeline(path: str | os.PathLike) -> FashionChameleonPipeline:
    if not Path(path).is_dir() or not (Path(path) / "model_index.json").is_file():
        raise UserInputError(f"{path} is not a saved pipeline folder (no model_index.json)")
    return FashionChameleonPipeline.from_pretrained(path)

