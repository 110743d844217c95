"""The one trainer skeleton for all three stages: the stage's loss object supplies what differs.

Top to bottom as it runs: accelerate and seeds; data samples and the pipeline (VAE, UMT5, scheduler); the stage's
networks and their AdamW optimizers, prepared by accelerate (one process on CPU, DDP or FSDP under
`accelerate launch`); resume from the newest checkpoint; the loader; then the loop: per network the stage updates
this step, set the lr, accumulate micro-batch gradients, clip, step; EMA; log; checkpoint. At the end the trained
model is exported in the formats the presets load.

A checkpoint `<output_dir>/checkpoints/step_NNNNNN/` is accelerate's `save_state` (networks as safetensors,
optimizers, RNG states of every library) plus our own: `trainer_state.json` (step, stage, whole config),
`trainer_rank<k>.safetensors` (this process's noise generators and next data draw) and `ema.safetensors`. It is
written under a hidden name and renamed when complete, so a kill leaves either the old or the new checkpoint.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.utils.data import BatchSampler, DataLoader

from ..errors import UserInputError
from ..models.causal_wan import CausalWanTransformer3DModel
from ..models.text import PromptEncoder
from ..pipeline import FashionChameleonPipeline
from ..presets import load_preset
from .config import TrainConfig
from .data import DrawSampler, LatentCache, build_dataset, collate_triplets
from .losses import LOSSES, Batch, Rngs

logger = logging.getLogger(__name__)

CHECKPOINTS, TRANSFORMER_EXPORT, PIPELINE_EXPORT, LOSS_LOG = "checkpoints", "transformer", "pipeline", "loss.csv"


class EMA:
    """fp32 exponential moving average of a network's parameters, kept on CPU (docs/method.md §4.4)."""

    def __init__(self, decay: float, state: dict[str, torch.Tensor]) -> None:
        self.decay = decay
        self.shadow = {name: value.detach().float().cpu().clone() for name, value in state.items()}

    @torch.no_grad()
    def update(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.shadow[name].lerp_(value.detach().float().cpu(), 1.0 - self.decay)


def resolve_mixed_precision(value: str) -> str:
    """"auto": bf16 on a GPU (the authors' DiT precision), full fp32 on CPU."""
    if value == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    if value not in ("no", "bf16", "fp16"):
        raise UserInputError(f"mixed_precision must be auto, no, bf16 or fp16, got {value!r}")
    return value


def load_pipeline(config: TrainConfig, *, text_encoder: bool) -> FashionChameleonPipeline:
    """The run's preset on the CPU in fp32 (training keeps fp32 master weights; accelerate places it), from
    `model.pipeline` (a local diffusers folder, ours or a stock Wan2.2 one), fresh weights, or the preset's own, with
    the run's stream settings. `text_encoder=False` leaves UMT5 out when the latent cache replaces it."""
    model = config.model
    if model.pipeline is not None and not (Path(model.pipeline) / "model_index.json").is_file():
        raise UserInputError(f"model.pipeline {model.pipeline!r} is not a local diffusers pipeline folder")
    _, pipe = load_preset(config.preset, checkpoint=model.pipeline, device="cpu", random_weights=model.random_weights,
                          seed=model.seed, text_encoder=text_encoder, architecture=model.architecture)
    if not text_encoder:
        pipe.register_modules(text_encoder=None)
    if model.codec is not None:
        from ..models.vae import AutoencoderPixelShuffle

        pipe.register_modules(vae=AutoencoderPixelShuffle.from_pretrained(model.codec))
    pipe.register_to_config(stream=config.stream_config().to_dict())
    return pipe


class Trainer:
    """Trains one stage as its config says; `train()` runs to `max_steps` and exports the result."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.stage = LOSSES[config.stage]
        # 1. accelerate, seeds
        mixed_precision = resolve_mixed_precision(config.mixed_precision)
        self.accelerator = acc = Accelerator(mixed_precision=mixed_precision)
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.rng = Rngs(local=torch.Generator(self.device).manual_seed(config.seed + self.rank),
                        shared=torch.Generator().manual_seed(config.seed))
        self.step = 0
        self.next_draw = self.rank  # global draw number of this process's next sample
        self.ema: EMA | None = None  # main process only
        self.ema_active = False

        # 2. data samples, the pipeline, the latent cache
        self.stream = stream = config.stream_config()
        cache = LatentCache(config.data.latent_cache, config.data, stream) if config.data.latent_cache else None
        dataset, triplets, prompts = build_dataset(config.data, stream, seed=config.seed,
                                                   load_video=self.stage.needs_video, cache=cache,
                                                   stage_prompts=self.stage.prompts(config))
        needs_text_encoder = cache is None or config.export_pipeline or not cache.has_text(prompts)
        self.pipe = load_pipeline(config, text_encoder=needs_text_encoder)
        self.pipe.vae.to(self.device).requires_grad_(False)
        self.codec = self.pipe.codec
        self.prompt_encoder = None
        if self.pipe.text_encoder is not None:
            text_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32  # frozen; the authors' is bf16
            self.pipe.text_encoder.to(self.device, text_dtype).requires_grad_(False)
            self.prompt_encoder = PromptEncoder(self.pipe.tokenizer, self.pipe.text_encoder, stream.max_text_tokens)
        self.cache = cache
        if cache is not None:
            cache.build(triplets, config.data, stream, self.codec, self.prompt_encoder, prompts, rank=self.rank,
                        world=self.world, progress=acc.is_main_process)
            acc.wait_for_everyone()

        # 3. networks and optimizers
        trained, frozen = self.stage.build_networks(config, self.pipe)
        for net in trained.values():
            net.requires_grad_(True).eval()  # as the authors: eval mode (the DiT has no dropout)
            if config.model.gradient_checkpointing:
                net.enable_gradient_checkpointing()
        for net in frozen.values():
            net.requires_grad_(False).eval()
        optimizers = {}
        for name, net in trained.items():
            oc = self.stage.optim_config(config, name)
            optimizers[name] = torch.optim.AdamW(net.parameters(), lr=oc.lr, betas=oc.betas,
                                                 weight_decay=oc.weight_decay, eps=oc.eps)
        names = [*trained, *frozen]
        prepared = acc.prepare(*(trained | frozen).values(), *optimizers.values())
        self.networks = dict(zip(names, prepared[: len(names)]))
        self.optimizers = dict(zip(optimizers, prepared[len(names):]))
        self.loss = self.stage(config, self.pipe, self.networks, self.embed_prompts, self.device)

        # 4. resume, then the loader starts where the checkpoint stopped reading
        self.resume()
        sampler = DrawSampler(len(dataset), config.seed, first_draw=self.next_draw, world=self.world)
        self.loader = DataLoader(dataset, batch_sampler=BatchSampler(sampler, config.batch_size, drop_last=False),
                                 num_workers=config.data.num_workers, collate_fn=collate_triplets,
                                 persistent_workers=config.data.num_workers > 0)
        self._batches = iter(self.loader)

    # -- inputs --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_prompts(self, prompts: list[str]) -> torch.Tensor:
        """UMT5 embeddings [B, max_text_tokens, D] in fp32, from the latent cache or the encoder."""
        if self.cache is not None:
            embeds = torch.stack([self.cache.load_text(p) for p in prompts])
        else:
            embeds = self.prompt_encoder.encode(prompts)
        return embeds.to(self.device, torch.float32)

    @torch.no_grad()
    def next_batch(self) -> Batch:
        """The next conditioned batch; a batch whose samples were all broken is skipped."""
        broken = 0
        while True:
            raw = next(self._batches)
            self.next_draw = max(raw["draws"]) + self.world
            if raw["prompts"]:
                return self.condition(raw)
            broken += len(raw["draws"])
            if broken >= len(self.loader.dataset):
                raise UserInputError(f"{broken} samples in a row were broken: check {self.config.data.root}")

    @torch.no_grad()
    def condition(self, raw: dict[str, Any]) -> Batch:
        """Latents of reference, garment (and video) and text embeddings, from the cache or encoded now."""
        def to_device(x: torch.Tensor) -> torch.Tensor:
            return x.to(self.device, torch.float32)

        if "reference_latent" in raw:
            condition = torch.cat([raw["reference_latent"], raw["garment_latent"]], dim=2)
            video = raw.get("video_latent")
        else:
            condition = torch.cat([self.codec.encode_image(to_device(raw["reference"])),
                                   self.codec.encode_image(to_device(raw["garment"]))], dim=2)
            video = self.codec.encode_video(to_device(raw["video"])) if "video" in raw else None
        text = to_device(raw["text"]) if "text" in raw else self.embed_prompts(raw["prompts"])
        return Batch(to_device(condition), text, None if video is None else to_device(video), raw["clip"])

    # -- the loop -------------------------------------------------------------------------------------------
    def train(self) -> Path:
        """Run to `max_steps` or `max_seconds` (checkpointing on the way) and export; returns the exported
        transformer folder."""
        from tqdm import tqdm

        config, acc = self.config, self.accelerator
        log = LossLog(self.out / LOSS_LOG, self.stage.log_keys, self.step) if acc.is_main_process else None
        bar = tqdm(total=config.max_steps, initial=self.step, unit="step", disable=not acc.is_main_process)
        logs: dict[str, torch.Tensor] = {}
        deadline = time.monotonic() + config.max_seconds if config.max_seconds > 0 else None
        while self.step < config.max_steps:
            if deadline is not None and self.out_of_time(deadline):
                logger.info("%s: time budget of %g s spent at step %d", config.stage, config.max_seconds, self.step)
                if self.step % config.checkpoint_every:
                    self.save_checkpoint()
                break
            for network in self.loss.updates(self.step):
                logs.update(self.update(network))
            self.step += 1
            bar.update(1)
            self.maybe_start_ema()
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                values = self.gather_logs(logs)
                if log is not None:
                    log.write(self.step, values)
                    bar.set_postfix({k.split("/")[0]: f"{v:.4g}" for k, v in values.items() if k.endswith("/loss")})
            if self.step % config.checkpoint_every == 0 or self.step == config.max_steps:
                self.save_checkpoint()
        bar.close()
        return self.export()

    def out_of_time(self, deadline: float) -> bool:
        """Whether the time budget is spent, as every process agrees (one stopping alone would hang the others)."""
        late = torch.tensor(float(time.monotonic() > deadline), device=self.accelerator.device)
        return bool(self.accelerator.reduce(late, reduction="max"))

    def update(self, network: str) -> dict[str, torch.Tensor]:
        """One optimizer step of `network`: lr from the schedule, `grad_accum` micro-batches, clip, step."""
        config, acc = self.config, self.accelerator
        net, optimizer = self.networks[network], self.optimizers[network]
        optim = self.stage.optim_config(config, network)
        lr = optim.lr_at(self.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        extra: dict[str, torch.Tensor] = {}
        for micro in range(config.grad_accum):
            batch = self.next_batch()
            last = micro == config.grad_accum - 1
            with nullcontext() if last else acc.no_sync(net):
                with acc.autocast():
                    loss, extra = self.loss(network, batch, self.rng)
                acc.backward(loss / config.grad_accum)
            total += loss.detach().float() / config.grad_accum
        grad_norm = acc.clip_grad_norm_(net.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if network == self.stage.exported and self.ema_active:
            state = acc.get_state_dict(net)  # FSDP: gathered on the main process (every process takes part)
            if self.ema is not None:
                self.ema.update(state)
        return {f"{network}/loss": total, f"{network}/grad_norm": grad_norm.detach().float(),
                f"{network}/lr": torch.tensor(lr), **extra}

    def maybe_start_ema(self) -> None:
        """The EMA starts as a copy once `ema_start_step` steps are done, then follows every exported-network step."""
        config = self.config
        if config.ema_decay and not self.ema_active and self.step >= config.ema_start_step:
            state = self.accelerator.get_state_dict(self.networks[self.stage.exported])
            if self.accelerator.is_main_process:
                self.ema = EMA(config.ema_decay, state)
            self.ema_active = True

    def gather_logs(self, logs: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean over processes of the latest value of every log key (the one host sync per log interval)."""
        keys = [k for k in self.stage.log_keys if k in logs]
        if not keys:
            return {}
        values = torch.stack([logs[k].to(self.device, torch.float32).reshape(()) for k in keys])
        values = self.accelerator.reduce(values, "mean").tolist()  # sync: once per log_every steps
        return dict(zip(keys, values))

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        root = self.out / CHECKPOINTS
        final, staging = root / f"step_{self.step:06d}", root / f".step_{self.step:06d}.partial"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(staging), safe_serialization=True)
        save_file({"local_rng": self.rng.local.get_state(), "shared_rng": self.rng.shared.get_state(),
                   "next_draw": torch.tensor([self.next_draw])}, staging / f"trainer_rank{self.rank}.safetensors")
        if acc.is_main_process:
            if self.ema is not None:
                save_file(self.ema.shadow, staging / "ema.safetensors")
            state = {"step": self.step, "stage": self.config.stage, "ema_active": self.ema_active,
                     "config": self.config.to_dict()}
            (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            for old in sorted(root.glob("step_*"))[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    def resume(self) -> None:
        """Continue from the newest complete checkpoint in output_dir (if `resume` and one exists)."""
        checkpoints = sorted((self.out / CHECKPOINTS).glob("step_*"))
        if not self.config.resume or not checkpoints:
            return
        latest = checkpoints[-1]
        state = json.loads((latest / "trainer_state.json").read_text())
        if state["stage"] != self.config.stage:
            raise UserInputError(f"{latest} is a {state['stage']!r} checkpoint; this run trains {self.config.stage!r}"
                                 " (use another output_dir)")
        self.accelerator.load_state(str(latest))
        mine = load_file(latest / f"trainer_rank{self.rank}.safetensors")
        self.rng.local.set_state(mine["local_rng"])
        self.rng.shared.set_state(mine["shared_rng"])
        self.next_draw = int(mine["next_draw"][0])
        self.step = state["step"]
        self.ema_active = state["ema_active"]
        if self.ema_active and self.accelerator.is_main_process:
            self.ema = EMA(self.config.ema_decay, load_file(latest / "ema.safetensors"))
        logger.info("resumed from %s at step %d", latest, self.step)

    # -- export ---------------------------------------------------------------------------------------------
    def export(self) -> Path:
        """Save the trained model (its EMA when there is one) where the presets load it from:
        `<output_dir>/transformer` (a diffusers transformer folder: `--checkpoint` of wan22-ti2v-5b) and, with
        `export_pipeline`, `<output_dir>/pipeline` (a whole pipeline folder with the run's stream settings:
        `--checkpoint` of any preset)."""
        acc = self.accelerator
        net = self.networks[self.stage.exported]
        state = None if self.ema_active else acc.get_state_dict(net)
        folder = self.out / TRANSFORMER_EXPORT
        if acc.is_main_process:
            weights = self.ema.shadow if self.ema_active else state
            model = CausalWanTransformer3DModel.from_config(acc.unwrap_model(net).config)
            model.load_state_dict(weights)
            model.save_pretrained(folder)
            if self.config.export_pipeline:
                pipe = self.pipe
                FashionChameleonPipeline(pipe.tokenizer, pipe.text_encoder, model, pipe.vae, pipe.scheduler,
                                         stream=self.stream.to_dict()).save_pretrained(self.out / PIPELINE_EXPORT)
            logger.info("exported the trained %s to %s", self.stage.exported, folder)
        acc.wait_for_everyone()
        return folder


class LossLog:
    """CSV of the logged values, one row per log step; a resumed run drops the rows past its checkpoint."""

    def __init__(self, path: Path, keys: tuple[str, ...], resumed_step: int) -> None:
        self.keys = keys
        self.start = time.perf_counter()
        columns = ["step", "elapsed_s", *keys]
        rows = []
        if path.is_file():
            with path.open(newline="") as handle:
                rows = [r for r in csv.reader(handle)][1:]
            rows = [r for r in rows if r and int(r[0]) <= resumed_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerows([columns, *rows])
        self.file.flush()

    def write(self, step: int, values: dict[str, float]) -> None:
        elapsed = time.perf_counter() - self.start
        self.writer.writerow([step, f"{elapsed:.1f}", *(f"{values[k]:.6g}" if k in values else "" for k in self.keys)])
        self.file.flush()
