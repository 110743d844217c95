"""The full-size path measured in one run on a GPU machine.

Stream speed, latency and memory, bf16 against fp32, and one optimizer step of each training stage at full sequence
length:

    python scripts/device/check.py --out gpu_check.json                 # one H200, sized for < 8 minutes
    python scripts/device/check.py --device cpu --tiny --out dry.json   # the same code on the tiny preset (tests)

Weights are random (speed and memory do not depend on their values): the 5B transformer and the Wan2.2 VAE at
their full configs, made on the device in the preset's dtype, with random text embeddings instead of UMT5. The JSON
is rewritten after each part, so a run stopped early keeps what it measured. README "Measuring on a GPU" says how
to bring the wheels a bare machine lacks.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, when run as a script

from fashionchameleon import media  # noqa: E402
from fashionchameleon.bench import run_bench  # noqa: E402
from fashionchameleon.engine import StreamingEngine  # noqa: E402
from fashionchameleon.pipeline import FashionChameleonPipeline  # noqa: E402
from fashionchameleon.presets import Preset, cast_except_fp32_modules, get_preset  # noqa: E402
from fashionchameleon.training.config import config_from_dict  # noqa: E402
from fashionchameleon.training.losses import LOSSES, Batch, Rngs  # noqa: E402

#: What each run measures. `full`: the issue's run on one GPU; `tiny`: the dry run the test suite makes on a CPU.
RUNS = {
    "full": dict(preset="wan22-ti2v-5b", chunks=24, switch_every=8, baseline_chunks=4, bidirectional_steps=2,
                 precision_chunks=3, train_layers=2, train_frames=81),
    "tiny": dict(preset="tiny", chunks=6, switch_every=2, baseline_chunks=2, bidirectional_steps=1,
                 precision_chunks=2, train_layers=2, train_frames=21),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset (a dry run of the same code)")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--skip", nargs="*", default=[], choices=["stream", "precision", "training"])
    args = parser.parse_args()
    run = RUNS["tiny" if args.tiny else "full"]
    device = torch.device(args.device)
    out = Path(args.out)
    report: dict = {"environment": environment(device), "run": run}

    def save(part: str, value) -> None:
        report[part] = value
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"== {part}\n{json.dumps(value, indent=2)}", flush=True)

    preset = get_preset(run["preset"])
    save("started", time.strftime("%Y-%m-%d %H:%M:%S"))
    if "stream" not in args.skip or "precision" not in args.skip:
        started = time.perf_counter()
        pipe = random_pipeline(preset, device)
        save("build_seconds", round(time.perf_counter() - started, 2))
        if "stream" not in args.skip:
            save("stream", stream_check(pipe, preset, run))
        if "precision" not in args.skip:
            save("precision", precision_check(pipe, preset, run["precision_chunks"]))
        del pipe
        release(device)
    if "training" not in args.skip:
        for stage in LOSSES:
            save(f"train_{stage}", training_step(stage, preset, run, device))
            release(device)
    save("finished", time.strftime("%Y-%m-%d %H:%M:%S"))


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                 "gpu_memory_gb": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)}
    return info


def random_pipeline(preset: Preset, device: torch.device, **transformer) -> FashionChameleonPipeline:
    """The preset's architecture with random weights, made on `device` in its dtype, with its stream settings."""
    if transformer:
        preset = replace(preset, transformer={**preset.transformer, **transformer})
    pipe = preset.build(preset, 0, device).to(device)
    pipe.register_to_config(stream=preset.stream.to_dict())
    return pipe


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stream_check(pipe: FashionChameleonPipeline, preset: Preset, run: dict) -> dict:
    """`bench` on the preset: end-to-end and transformer-only fps, first frame, switches, memory, the baselines."""
    reference, garments = preset.example_inputs()
    result = run_bench(pipe, preset.teacher, media.load_image(reference), [media.load_image(g) for g in garments],
                       chunks=run["chunks"], switch_every=run["switch_every"],
                       baseline_chunks=run["baseline_chunks"], bidirectional_steps=run["bidirectional_steps"])
    result["realtime_factor"] = result["fps"] / pipe.stream.fps
    return result


def stream_latents(pipe: FashionChameleonPipeline, preset: Preset, chunks: int) -> torch.Tensor:
    reference, garments = preset.example_inputs()
    stream = StreamingEngine(pipe).start(reference, garments[0], seed=0, chunks=chunks)
    return torch.cat([stream.rollout.next_latents().float() for _ in range(chunks)], dim=2)


def with_transformer(pipe: FashionChameleonPipeline, transformer) -> FashionChameleonPipeline:
    return FashionChameleonPipeline(**{**pipe.components, "transformer": transformer}, stream=pipe.config.stream)


def precision_check(pipe: FashionChameleonPipeline, preset: Preset, chunks: int) -> dict:
    """The same stream (weights, noise) with the transformer in bf16 and in fp32: the error of the latents. The fp32
    copy holds the bf16-rounded weights, so only the arithmetic differs."""
    bf16 = pipe if pipe.transformer.dtype == torch.bfloat16 else with_transformer(
        pipe, cast_except_fp32_modules(copy.deepcopy(pipe.transformer), torch.bfloat16))
    low = stream_latents(bf16, preset, chunks)
    high = stream_latents(with_transformer(pipe, copy.deepcopy(bf16.transformer).float()), preset, chunks)
    error = low - high
    scale = float(high.pow(2).mean().sqrt())
    return {"chunks": chunks, "latent_rms": scale, "error_rms": float(error.pow(2).mean().sqrt()),
            "error_rms_relative": float(error.pow(2).mean().sqrt()) / scale,
            "error_rms_per_frame": [round(float(e), 5) for e in error.pow(2).mean(dim=(0, 1, 3, 4)).sqrt()],
            "error_max": float(error.abs().max())}


def training_step(stage: str, preset: Preset, run: dict, device: torch.device) -> dict:
    """One optimizer step of `stage` (every network it updates at step 0) at the full sequence length with
    `train_layers` layers: fp32 master weights, bf16 autocast on a GPU, gradient checkpointing, the 5B configs'
    attention (FlexAttention for forcing on a GPU). Mirrors `Trainer.update` on one process without data loading."""
    pipe = random_pipeline(preset, device, num_layers=run["train_layers"])
    pipe.transformer.float()
    stream, codec = pipe.stream, pipe.codec
    latent_frames = (run["train_frames"] - 1) // codec.temporal_factor + 1
    height, width = stream.height // codec.spatial_factor, stream.width // codec.spatial_factor
    text_dim = pipe.transformer.config.text_dim
    with tempfile.TemporaryDirectory() as teacher:
        pipe.transformer.save_pretrained(teacher)  # DMD's critic and real score load it, as from stage 1
        values = {"preset": preset.name, "data": {"num_frames": run["train_frames"]},
                  "model": {"teacher": teacher}, "ema_decay": 0.0}
        if stage == "forcing":  # FlexAttention as configs/forcing_5b.yaml; it has no backward on a CPU
            values["attention"] = "flex" if device.type == "cuda" else "mask"
        if stage == "dmd":
            values["reward"] = {"kind": "tiny"}
        config = config_from_dict(stage, values)
        loss_class = LOSSES[stage]
        trained, frozen = loss_class.build_networks(config, pipe)
    for net in trained.values():
        net.to(device).requires_grad_(True).eval().enable_gradient_checkpointing()
    for net in frozen.values():
        net.to(device).requires_grad_(False).eval()
    optimizers = {name: torch.optim.AdamW(net.parameters(), lr=loss_class.optim_config(config, name).lr)
                  for name, net in trained.items()}
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device)

    def embed_prompts(prompts: list[str]) -> torch.Tensor:
        return randn(len(prompts), stream.max_text_tokens, text_dim)

    loss = loss_class(config, pipe, trained | frozen, embed_prompts, device)
    batch = Batch(randn(1, codec.latent_channels, 2, height, width), embed_prompts([""]),
                  randn(1, codec.latent_channels, latent_frames, height, width))
    rngs = Rngs(local=torch.Generator(device).manual_seed(0), shared=torch.Generator().manual_seed(0))
    release(device)
    sync(device)
    started = time.perf_counter()
    losses = {}
    for name in loss.updates(0):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            value, _ = loss(name, batch, rngs)
        value.backward()
        torch.nn.utils.clip_grad_norm_(trained[name].parameters(), loss_class.optim_config(config, name).grad_clip)
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        losses[name] = float(value.detach())
    sync(device)
    tokens = pipe.transformer.tokens_per_frame(height, width) * (2 + latent_frames)
    result = {"layers": run["train_layers"], "latent_frames": latent_frames,
              "sequence_tokens": tokens * (2 if stage == "forcing" else 1), "updates": list(losses),
              "loss": losses, "finite": all(math.isfinite(v) for v in losses.values()),
              "seconds": round(time.perf_counter() - started, 3)}
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


if __name__ == "__main__":
    main()
