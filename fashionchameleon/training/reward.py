"""GR-DMD's reward and the chunk weights it induces (docs/method.md §4.1-4.2).

A reward model maps decoded frames [B, 3, F_pix, H, W] in [-1, 1] (and the batch they were rolled out for) to one
score per pixel frame [B, F_pix], higher = better. `chunk_weights` turns those scores into per-latent-frame weights
that favour the worst chunks. The paper's reward is the LAION improved aesthetic predictor (CLIP ViT-L/14 image
embedding -> linear MLP head), loaded from local files; `tiny_aesthetic_reward` is the same architecture at a tiny
seeded size for tests. In the mini wardrobe world `WorldReward` scores each frame exactly against the sample's truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from .. import media
from ..errors import UserInputError
from ..miniworld import Triplet, make_triplet, metrics
from .config import RewardConfig

if TYPE_CHECKING:
    from .losses import Batch

# LAION's head: 768 (CLIP ViT-L/14 projection) -> 1024 -> 128 -> 64 -> 16 -> 1.
AESTHETIC_HIDDEN = (1024, 128, 64, 16)


class RewardModel(Protocol):
    def __call__(self, frames: torch.Tensor, batch: Batch) -> torch.Tensor:
        """frames [B, 3, F, H, W] in [-1, 1] rolled out for `batch` -> scores [B, F]."""


def chunk_weights(frame_scores: torch.Tensor, *, temporal_factor: int, chunk_frames: int,
                  temperature: float) -> torch.Tensor:
    """Per-latent-frame weights A [B, F_lat] = softmax(-s / temperature) over the latent frames (rows sum to 1),
    in float64 like the loss they scale (equal scores give exactly plain DMD's 1 / F_lat).

    `frame_scores` [B, 1 + temporal_factor * (F_lat - 1)] scores the decoded frames. Latent 0 takes pixel frame 0's
    score, latent f >= 1 the mean of its `temporal_factor` pixel frames; every latent of a chunk then takes the
    chunk's mean, so the weight unit is the chunk. Lower score -> larger weight.
    """
    batch, pixel_frames = frame_scores.shape
    if (pixel_frames - 1) % temporal_factor:
        raise ValueError(f"{pixel_frames} pixel frames do not come from whole latent frames "
                         f"(1 + {temporal_factor} k)")
    scores = frame_scores.double()
    latent = torch.cat([scores[:, :1], scores[:, 1:].reshape(batch, -1, temporal_factor).mean(dim=2)], dim=1)
    if latent.shape[1] % chunk_frames:
        raise ValueError(f"{latent.shape[1]} latent frames do not split into chunks of {chunk_frames}")
    chunk = latent.reshape(batch, -1, chunk_frames).mean(dim=2).repeat_interleave(chunk_frames, dim=1)
    return torch.softmax(-chunk / temperature, dim=1)


class AestheticHead(nn.Module):
    """LAION's MLP, linear layers with no activation; its dropouts are inert in inference, so they are Identity
    here and the parameter names (`layers.0, 2, 4, 6, 7`) match the released `.pth`."""

    def __init__(self, in_dim: int = 768, hidden: tuple[int, ...] = AESTHETIC_HIDDEN) -> None:
        super().__init__()
        dims = (in_dim, *hidden)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.Identity())  # Dropout in training
        layers.append(nn.Linear(dims[-1], 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


class AestheticReward(nn.Module):
    """Frames -> uint8 -> CLIPImageProcessor (shortest side to the crop size, centre crop) -> CLIP image embedding,
    L2-normalised -> head. A portrait frame is scored on its central square only, as in the authors' code."""

    def __init__(self, vision, processor, head: AestheticHead) -> None:
        super().__init__()
        self.vision, self.processor, self.head = vision.eval().requires_grad_(False), processor, head.eval()
        self.head.requires_grad_(False)

    @classmethod
    def from_paths(cls, clip: str | Path, head: str | Path) -> "AestheticReward":
        """CLIP from a local transformers folder (openai/clip-vit-large-patch14), the head from .safetensors/.pth."""
        from safetensors.torch import load_file
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        for name, path in (("reward.clip", clip), ("reward.head", head)):
            if not path or not Path(path).exists():
                raise UserInputError(f"{name} must name an existing local path, got {path!r}")
        vision = CLIPVisionModelWithProjection.from_pretrained(clip)
        processor = CLIPImageProcessor.from_pretrained(clip)
        state = load_file(head) if str(head).endswith(".safetensors") else torch.load(head, map_location="cpu",
                                                                                        weights_only=True)
        module = AestheticHead(vision.config.projection_dim)
        module.load_state_dict(state)
        return cls(vision, processor, module)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """`batch` is not read: the aesthetic score judges pixels alone."""
        size, _, count = frames.shape[:3]
        pixels = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        images = list(pixels.transpose(1, 2).flatten(0, 1).cpu())  # B*F images [3, H, W]
        inputs = self.processor(images=images, return_tensors="pt").pixel_values
        device = next(self.vision.parameters()).device
        embeds = self.vision(pixel_values=inputs.to(device, self.vision.dtype)).image_embeds.float()
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return self.head(embeds).view(size, count)


def tiny_aesthetic_reward(seed: int = 0, image_size: int = 32) -> AestheticReward:
    """The aesthetic reward's architecture at a tiny seeded size (CPU tests)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=image_size // 4, projection_dim=16)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision = CLIPVisionModelWithProjection(config)
        head = AestheticHead(config.projection_dim, hidden=(16, 8, 8, 4))
    return AestheticReward(vision, processor, head)


def world_frame_quality(video: np.ndarray, truth: Triplet) -> np.ndarray:
    """[F] exact quality in [0, 1] of uint8 frames [F, H, W, 3] of `truth`'s sample: the mean of a garment factor,
    exp(-colour error against its garment A flat lay / COLOUR_TOLERANCE), and an identity factor, the identity
    fidelity against its person times the share of the person still there (each part's area over the truth's,
    at most 1, `metrics.part_areas`); masks estimated from colour as `miniworld.evaluate` scores a generated video.

    What the factors leave out is what a model behind a learned codec cannot show (measured, issue 12): the garment
    score's pattern and proportion terms read ~0 on the truth itself after the codec's round trip, so they cannot
    rank chunks; and identity alone scores a frame with the person erased (the background, exact) above the truth
    through the codec, so it would reward losing the person, the very drift GR-DMD is for. The mean, not the
    product, so the chunks are ranked by whichever factor varies. (The reward only ranks chunks and is never
    differentiated, so it is no target to climb.) A frame with no garment pixels has no garment factor, and one with
    no part of the person (nor background) to measure has no identity: either factor is then 0, the worst value.
    """
    masks = metrics.estimate_masks(video, truth.person)
    colour_error = metrics.garment_fidelity(video, masks["garment"], truth.garment_image).colour_error
    garment = np.exp(-np.nan_to_num(colour_error, nan=np.inf) / metrics.COLOUR_TOLERANCE)
    identity = metrics.identity_fidelity(video, masks, truth.person)
    measured = ~np.isnan(np.stack(list(identity.errors.values()))).all(axis=0)
    expected = metrics.part_areas(metrics.estimate_masks(truth.video[:1], truth.person))[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(expected > 0, np.minimum(metrics.part_areas(masks) / expected, 1.0), np.nan)
    presence = np.nanmean(shares, axis=-1)
    return (garment + np.where(measured, identity.score, 0.0) * presence) / 2


class WorldReward(nn.Module):
    """The mini wardrobe world's exact quality of every decoded frame (`world_frame_quality`) against the truth of
    the sample it was rolled out for, which `make_triplet(batch.clip[b])` rebuilds (the dataset's own item; about
    2 ms at 64 px, so nothing is cached). It has no weights; a Module so that it moves like the other rewards."""

    @torch.no_grad()
    def forward(self, frames: torch.Tensor, batch: Batch) -> torch.Tensor:
        height, width = frames.shape[-2:]
        scores = [world_frame_quality(media.tensor_to_frames(video), make_triplet(int(clip), 1, height, width))
                  for video, clip in zip(frames, batch.clip)]
        return torch.from_numpy(np.stack(scores)).float()


def build_reward(config: RewardConfig, *, layout: str, seed: int = 0) -> RewardModel | None:
    """The configured reward, or None for plain DMD (uniform weights). `layout` is the run's `data.layout`: the
    world reward needs the mini world's samples."""
    if config.kind == "none":
        return None
    if config.kind == "tiny":
        return tiny_aesthetic_reward(seed)
    if config.kind == "aesthetic":
        return AestheticReward.from_paths(config.clip, config.head)
    if config.kind == "world":
        if layout != "miniworld":
            raise UserInputError(f"reward.kind 'world' scores frames against the mini wardrobe world's truth, so it "
                                 f"needs data.layout 'miniworld', got {layout!r}")
        return WorldReward()
    raise UserInputError(f"reward.kind must be 'aesthetic', 'world', 'tiny' or 'none', got {config.kind!r}")
