"""The in-context teacher's sampler: the whole clip at once, bidirectional, many steps with guidance.

Used where a teacher is compared with its streaming student: `bench` (the non-streaming baseline) and `eval` (the
teacher rows). The transformer is passed in, so any teacher weights run on a student pipeline's codec and text
encoder; the text's cross-attention K/V come from the teacher's own projections.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from . import media
from .models.causal_wan import CausalWanTransformer3DModel, in_context_velocity
from .models.text import filter_garment_words
from .pipeline import FashionChameleonPipeline
from .rollout import StreamConfig

GUIDANCE_CONDITIONS = ("text", "garment")


@dataclass(frozen=True)
class TeacherSampling:
    """How a preset's teacher samples (docs/method.md §9): Euler flow-matching steps with classifier-free guidance
    whose unconditional branch drops the text or, for a model trained with blank garments, the garment."""

    steps: int = 50
    guidance: float = 3.0
    latent_frames: int = 21  # the clip length the teacher was trained on
    guidance_condition: str = "text"
    weights: Path | None = None  # the teacher's transformer folder, where one ships with the preset

    def __post_init__(self) -> None:
        if self.guidance_condition not in GUIDANCE_CONDITIONS:
            raise ValueError(f"guidance_condition must be one of {GUIDANCE_CONDITIONS}, "
                             f"got {self.guidance_condition!r}")


@torch.no_grad()
def sample_bidirectional(
    pipe: FashionChameleonPipeline,
    transformer: CausalWanTransformer3DModel,
    sampling: TeacherSampling,
    reference: Image.Image | str,
    garment: Image.Image | str,
    prompt: str = "",
    *,
    stream: StreamConfig | None = None,
    steps: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """[reference, garment, video] at t = 0 / t with full attention, `steps` (default `sampling.steps`) Euler steps
    with guidance; `pipe` encodes and decodes, `transformer` predicts. Returns uint8 frames [F, H, W, 3]."""
    stream = stream or pipe.stream
    steps = steps or sampling.steps
    prompt, _ = filter_garment_words(prompt)
    cond_kv = pipe.encode_text_kv(prompt, stream.max_text_tokens, transformer)
    reference_latent = pipe.encode_reference(media.load_image(reference), stream)
    condition = torch.cat([reference_latent, pipe.encode_garment(media.load_image(garment), stream)], dim=2)
    uncond_kv, uncond_condition = cond_kv, condition  # the unconditional branch drops the text or the garment
    if sampling.guidance_condition == "garment":
        blank = pipe.encode_garment(media.blank_garment(stream.width, stream.height), stream)
        uncond_condition = torch.cat([reference_latent, blank], dim=2)
    else:
        uncond_kv = pipe.encode_text_kv("", stream.max_text_tokens, transformer)
    device = transformer.device
    generator = torch.Generator(device=device).manual_seed(seed)
    _, channels, _, height, width = reference_latent.shape
    x = torch.randn((1, channels, sampling.latent_frames, height, width), generator=generator, device=device,
                    dtype=torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    for t in scheduler.timesteps:
        t = t.expand(1)
        velocity = in_context_velocity(transformer, condition, x, t, cond_kv).float()
        if sampling.guidance != 1.0:
            uncond = in_context_velocity(transformer, uncond_condition, x, t, uncond_kv).float()
            velocity = uncond + sampling.guidance * (velocity - uncond)
        x = scheduler.step(velocity, t[0], x).prev_sample
    return media.tensor_to_frames(pipe.codec.decode_video(x.to(transformer.dtype)))
