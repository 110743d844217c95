"""The three stages as loss objects over one trainer skeleton (docs/method.md §3-§5).

A stage says which networks it trains and from which weights they start (`build_networks`), which of them update
at a step (`updates`), and computes a network's loss on a conditioned batch (`__call__`). Everything else (data,
accelerate, optimizers, checkpoints, logging) is the trainer's and is the same for every stage.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from .. import media
from ..errors import UserInputError
from ..models.causal_wan import (
    CausalWanTransformer3DModel,
    in_context_velocity,
    teacher_forcing_block_mask,
    teacher_forcing_mask,
)
from ..models.convert import load_transformer_weights
from ..pipeline import FashionChameleonPipeline
from ..presets import get_preset
from ..rollout import Rollout
from .config import DMDConfig, ForcingConfig, OptimConfig, TeacherConfig, TrainConfig
from .flow import FlowTable, add_noise, flow_matching_loss, predict_x0
from .reward import build_reward, chunk_weights


@dataclass
class Batch:
    """One conditioned batch on the training device (fp32)."""

    condition: torch.Tensor  # [B, C, 2, h, w]: reference and garment latents, always at t = 0
    text: torch.Tensor  # [B, L, D] UMT5 embeddings of the chosen captions
    video: torch.Tensor | None = None  # [B, C, F, h, w] clean video latents (None for data-free DMD)
    clip: torch.Tensor | None = None  # [B] int64 on the CPU: each sample's dataset index (miniworld: its world seed)


@dataclass
class Rngs:
    """`local`: this process's noise and timesteps (seed + rank). `shared`: the same stream on every process, for
    choices all processes must agree on without communicating (the rollout's exit step)."""

    local: torch.Generator
    shared: torch.Generator


def load_weights(model: CausalWanTransformer3DModel, path: str | None) -> CausalWanTransformer3DModel:
    """Load trained transformer weights (folder, .safetensors or the authors' model.pt) into `model`, strictly."""
    if path is not None:
        missing, unexpected = model.load_state_dict(load_transformer_weights(path), strict=False)
        if missing or unexpected:
            raise UserInputError(f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def num_chunks(video_frames: int, chunk_frames: int) -> int:
    if video_frames % chunk_frames:
        raise UserInputError(f"{video_frames} video latent frames do not split into chunks of {chunk_frames}")
    return video_frames // chunk_frames


def chunk_ids(condition_frames: int, video_frames: int, chunk_frames: int) -> list[int]:
    """Per latent frame of [reference, garment, video]: 0 for the conditioning frames, k + 1 for chunk k."""
    num_chunks(video_frames, chunk_frames)
    return [0] * condition_frames + [1 + f // chunk_frames for f in range(video_frames)]


class StageLoss:
    """What the trainer asks of a stage. The defaults are stages 1 and 2's: one trained network, the authors'
    `generator` (their checkpoint key for every stage's trained model), started from `model.init`."""

    config_class: type[TrainConfig] = TrainConfig
    trained: tuple[str, ...] = ("generator",)
    exported: str = "generator"
    needs_video: bool = True
    log_keys: tuple[str, ...] = ("generator/loss", "generator/grad_norm", "generator/lr")

    def __init__(self, config: TrainConfig, pipe: FashionChameleonPipeline, networks: dict[str, nn.Module],
                 embed_prompts: Callable[[list[str]], torch.Tensor], device: torch.device) -> None:
        self.config = config
        self.networks = networks  # as prepared by accelerate: call these
        self.generator_module = pipe.transformer  # the generator itself: read its attributes here (DDP hides them)
        self.stream = pipe.stream  # the run's stream settings (the preset's, with the config's overrides)
        self.table = FlowTable.from_scheduler(pipe.scheduler, device)
        self.device = device

    @classmethod
    def build_networks(cls, config: TrainConfig, pipe: FashionChameleonPipeline) -> tuple[dict, dict]:
        """(trained, frozen) networks with their starting weights: the pipeline's transformer, or `model.init`."""
        return {"generator": load_weights(pipe.transformer, config.model.init)}, {}

    @classmethod
    def optim_config(cls, config: TrainConfig, network: str) -> OptimConfig:
        return config.optim

    @classmethod
    def prompts(cls, config: TrainConfig) -> list[str]:
        """Prompts the stage embeds besides the captions (the latent cache encodes them too)."""
        return [""]

    def updates(self, step: int) -> tuple[str, ...]:
        """Networks that take an optimizer step at `step`, in order."""
        return self.trained

    def loss_weights(self, index: torch.Tensor) -> torch.Tensor | None:
        """Per-frame flow-matching weights [B, F] of table indices [B, F] (None: unweighted)."""
        return self.table.weights[index] if self.config.loss_weighting == "wan" else None

    def __call__(self, network: str, batch: Batch, rng: Rngs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss of `network` on `batch`, extra log values named as in `log_keys`)."""
        raise NotImplementedError


class TeacherLoss(StageLoss):
    """Stage 1, in-context teacher: flow matching on [reference, garment, noisy video] with full attention, one t
    per sample from the shifted table, Wan bell-curve weighting, loss on the video frames only (docs/method.md §5)."""

    config_class = TeacherConfig

    def __call__(self, network: str, batch: Batch, rng: Rngs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        video = batch.video
        index = self.table.sample_index((video.shape[0], 1), rng.local).expand(-1, video.shape[2])  # [B, F]
        noise = torch.randn(video.shape, generator=rng.local, device=video.device)
        noisy = add_noise(video, noise, self.table.sigmas[index])
        velocity = in_context_velocity(self.networks[network], batch.condition, noisy, self.table.timesteps[index],
                                       batch.text)
        return flow_matching_loss(velocity, noise, video, self.loss_weights(index)), {}


class TeacherForcingLoss(StageLoss):
    """Stage 2, in-context teacher forcing (docs/method.md §3.2): [clean ; noisy] copies of [reference, garment, video]
    with the same RoPE positions in both halves, an independent t per stream chunk on the noisy video, the §3.2
    mask; the loss is stage 1's, on the noisy half's video frames."""

    config_class = ForcingConfig

    def __init__(self, config: ForcingConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self._masks: dict[tuple[int, int], object] = {}
        if config.attention not in ("mask", "flex"):
            raise UserInputError(f"attention must be 'mask' or 'flex', got {config.attention!r}")

    def attention_mask(self, condition_frames: int, video_frames: int, frame_tokens: int):
        """The §3.2 mask for this size, built once: an exact [2L, 2L] bool mask or a FlexAttention BlockMask."""
        key = (condition_frames, video_frames, frame_tokens)
        if key not in self._masks:
            build = teacher_forcing_block_mask if self.config.attention == "flex" else teacher_forcing_mask
            ids = chunk_ids(condition_frames, video_frames, self.stream.chunk_frames)
            self._masks[key] = build(ids, frame_tokens, device=self.device)
        return self._masks[key]

    def __call__(self, network: str, batch: Batch, rng: Rngs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = self.networks[network]
        video, condition = batch.video, batch.condition
        batch_size, _, frames, height, width = video.shape
        condition_frames, chunk = condition.shape[2], self.stream.chunk_frames
        index = self.table.sample_index((batch_size, num_chunks(frames, chunk)), rng.local)
        index = index.repeat_interleave(chunk, dim=1)  # [B, F]: one t per chunk
        noise = torch.randn(video.shape, generator=rng.local, device=video.device)
        noisy = add_noise(video, noise, self.table.sigmas[index])
        clean_half = torch.cat([condition, video], dim=2)
        noisy_half = torch.cat([condition, noisy], dim=2)
        zeros = torch.zeros(batch_size, condition_frames + frames, device=video.device)
        t = torch.cat([zeros, zeros[:, :condition_frames], self.table.timesteps[index]], dim=1)
        positions = list(range(condition_frames + frames)) * 2
        mask = self.attention_mask(condition_frames, frames, self.generator_module.tokens_per_frame(height, width))
        out = model(torch.cat([clean_half, noisy_half], dim=2), t, batch.text, frame_positions=positions,
                    attention_mask=mask).sample
        velocity = out[:, :, -frames:]
        return flow_matching_loss(velocity, noise, video, self.loss_weights(index)), {}


class GRDMDLoss(StageLoss):
    """Stage 3, gradient-reweighted DMD (docs/method.md §4).

    Generator: a self-forcing rollout on the streaming core (`rollout.Rollout`: random shared exit step, gradient
    at that step only), the DMD gradient g = (mu_fake - mu_real) / mean|x - mu_real| with mu_real = teacher CFG,
    and the per-frame reweighting A = softmax(-chunk score / temperature) from the reward. The unconditional branch
    of mu_real drops the text (negative prompt, the paper) or, for a preset whose teacher was trained with blank
    garments, the garment. Critic (fake score): flow matching on fresh rollouts, every step; the generator every
    `generator_every` steps.
    """

    config_class = DMDConfig
    trained = ("generator", "critic")
    needs_video = False
    log_keys = ("generator/loss", "generator/grad_norm", "generator/lr", "generator/reward", "generator/exit_step",
                "critic/loss", "critic/grad_norm", "critic/lr")

    def __init__(self, config: DMDConfig, pipe: FashionChameleonPipeline, networks: dict[str, nn.Module],
                 embed_prompts: Callable[[list[str]], torch.Tensor], device: torch.device) -> None:
        super().__init__(config, pipe, networks, embed_prompts, device)
        self.reward = build_reward(config.reward, layout=config.data.layout, seed=config.seed)
        if self.reward is not None:
            self.reward.to(device)
        self.codec = pipe.codec
        self.negative_text = embed_prompts([config.negative_prompt])  # [1, L, D]
        temporal, spatial = self.codec.temporal_factor, self.codec.spatial_factor
        stream, frames = self.stream, config.data.num_frames
        if (frames - 1) % temporal or stream.height % spatial or stream.width % spatial:
            raise UserInputError(f"data.num_frames must be 1 + {temporal} k and the frame size a multiple of "
                                 f"{spatial}, got {frames} frames of {stream.width}x{stream.height}")
        video_frames = (frames - 1) // temporal + 1  # DMD scores a training clip's length
        self.num_chunks = num_chunks(video_frames, stream.chunk_frames)
        self.lead_chunks = max(config.rollout_chunks - self.num_chunks, 0)  # streamed first, without gradient
        if self.lead_chunks:
            self.rollout_stream = stream  # the window a long stream has, eviction included
        else:
            # The paper's rollout never evicts (docs/method.md §3.3): sink = first chunk, history = all later chunks.
            self.rollout_stream = replace(stream, sink_frames=stream.chunk_frames,
                                          history_frames=video_frames - stream.chunk_frames)
        self.sigmas = pipe.student_sigmas(stream.denoising_steps)
        self.guidance_condition = get_preset(config.preset).teacher.guidance_condition
        blank = media.blank_garment(stream.width, stream.height)
        self.blank_garment = pipe.encode_garment(blank, stream).to(device, torch.float32)

    @classmethod
    def build_networks(cls, config: DMDConfig, pipe: FashionChameleonPipeline) -> tuple[dict, dict]:
        """Generator from `model.init` (stage 2); critic and frozen real score from `model.teacher` (stage 1)."""
        if config.model.teacher is None:
            raise UserInputError("the dmd stage needs model.teacher: the stage-1 teacher's weights")
        generator = load_weights(pipe.transformer, config.model.init)
        critic = load_weights(copy.deepcopy(generator), config.model.teacher)
        real_score = load_weights(copy.deepcopy(generator), config.model.teacher).requires_grad_(False)
        return {"generator": generator, "critic": critic}, {"real_score": real_score}

    @classmethod
    def optim_config(cls, config: DMDConfig, network: str) -> OptimConfig:
        return config.critic_optim if network == "critic" else config.optim

    @classmethod
    def prompts(cls, config: DMDConfig) -> list[str]:
        return ["", config.negative_prompt]

    def updates(self, step: int) -> tuple[str, ...]:
        return ("generator", "critic") if step % self.config.generator_every == 0 else ("critic",)

    def __call__(self, network: str, batch: Batch, rng: Rngs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.generator_loss(batch, rng) if network == "generator" else self.critic_loss(batch, rng)

    # -- the paper's operations ----------------------------------------------------------------------------
    def rollout(self, batch: Batch, rng: Rngs) -> tuple[torch.Tensor, int]:
        """Self-forcing rollout of the generator [B, C, F, h, w] and its exit step (docs/method.md §3.7). Gradient flows
        only through each chunk's exit-step forward, and only if grad is enabled; with `rollout_chunks`, the lead
        chunks stream first without gradient and only the last clip's worth of chunks is returned."""
        exit_step = int(torch.randint(len(self.sigmas), (), generator=rng.shared))  # CPU generator: no device sync
        rollout = Rollout(self.generator_module, self.rollout_stream, self.sigmas, batch.condition[:, :, :1],
                          batch.condition[:, :, 1:2], batch.text, rng.local, model=self.networks["generator"],
                          exit_step=exit_step, context_noise=self.config.context_noise)
        if self.lead_chunks:
            with torch.no_grad():
                rollout.rollout(self.lead_chunks)
        return rollout.rollout(self.num_chunks).float(), exit_step

    def noise_level(self, batch_size: int, rng: Rngs) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma, t) [B] for DMD and the critic: shifted uniform, clamped (docs/method.md §4.3)."""
        sigma = self.table.sample_dmd_sigma(batch_size, self.config.timestep_range, rng.local)
        return sigma, sigma * self.table.num_train_timesteps

    @torch.no_grad()
    def frame_weights(self, video: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """GR weights A [B, F] from the reward of the decoded rollout of `batch`, and the mean reward (without a
        reward: uniform weights, i.e. plain DMD, and NaN)."""
        size, _, frames = video.shape[:3]
        if self.reward is None:
            return video.new_full((size, frames), 1.0 / frames, dtype=torch.float64), video.new_full((), float("nan"))
        scores = self.reward(self.codec.decode_video(video), batch).to(video.device)
        weights = chunk_weights(scores, temporal_factor=self.codec.temporal_factor,
                                chunk_frames=self.stream.chunk_frames, temperature=self.config.reward.temperature)
        return weights, scores.mean()

    @torch.no_grad()
    def dmd_gradient(self, video: torch.Tensor, batch: Batch, rng: Rngs) -> torch.Tensor:
        """g = (mu_fake - mu_real) / mean|x - mu_real| per sample, NaN -> 0 (docs/method.md §4.3) [B, C, F, h, w]."""
        sigma, t = self.noise_level(video.shape[0], rng)
        noisy = add_noise(video, torch.randn(video.shape, generator=rng.local, device=video.device), sigma)

        def x0(name: str, text: torch.Tensor, condition: torch.Tensor = batch.condition) -> torch.Tensor:
            return predict_x0(noisy, in_context_velocity(self.networks[name], condition, noisy, t, text), sigma)

        fake = x0("critic", batch.text)
        cond = x0("real_score", batch.text)
        if self.guidance_condition == "garment":
            blank = self.blank_garment.expand_as(batch.condition[:, :, 1:])
            uncond = x0("real_score", batch.text, torch.cat([batch.condition[:, :, :1], blank], dim=2))
        else:
            uncond = x0("real_score", self.negative_text.expand(video.shape[0], -1, -1))
        real = cond + self.config.guidance_scale * (cond - uncond)
        normalizer = (video - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        return torch.nan_to_num((fake - real) / normalizer)

    def generator_loss(self, batch: Batch, rng: Rngs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        video, exit_step = self.rollout(batch, rng)
        weights, reward = self.frame_weights(video.detach(), batch)
        gradient = self.dmd_gradient(video.detach(), batch, rng)
        return gr_dmd_loss(video, gradient, weights), {"generator/reward": reward,
                                                       "generator/exit_step": torch.tensor(float(exit_step))}

    def critic_loss(self, batch: Batch, rng: Rngs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            video, _ = self.rollout(batch, rng)
        sigma, t = self.noise_level(video.shape[0], rng)
        noise = torch.randn(video.shape, generator=rng.local, device=video.device)
        velocity = in_context_velocity(self.networks["critic"], batch.condition, add_noise(video, noise, sigma), t,
                                       batch.text)
        return flow_matching_loss(velocity, noise, video), {}


def gr_dmd_loss(video: torch.Tensor, gradient: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L = 1/2 sum_f A_f mean_{C,h,w} (x_f - sg(x_f - g_f))^2, averaged over the batch, in float64.

    Its gradient w.r.t. frame f is A_f g_f / (C h w); with A_f = 1/F it is plain DMD's 1/2 mse(x, sg(x - g)).
    `video` [B, C, F, h, w] (with grad), `gradient` like it, `weights` [B, F] (rows sum to 1).
    """
    x = video.double()
    target = (x - gradient.double()).detach()
    per_frame = (x - target).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    return 0.5 * (weights.double() * per_frame).sum(dim=1).mean()


LOSSES: dict[str, type[StageLoss]] = {cls.config_class.stage: cls for cls in (TeacherLoss, TeacherForcingLoss, GRDMDLoss)}
