"""The recipe's first stage for `mini`: train the codec's learned encoder/decoder (`AutoencoderPixelShuffle` with
`latent_channels`) on world frames, so the transformer works on a few channels a token and a decoder draws the
flat colours, edges and patterns of the world (issue 12: the exact codec left every pixel to a 128-wide
transformer, which showed as 8x8-pixel blocks and noise).

An ordinary autoencoder, L1 on pixels, with TAESD's blocks and activations. (Noisy latents for the decoder, so that
it would draw clean frames from the transformer's imperfect estimates, were tried with SiLU blocks and twice
collapsed the training to a constant output; the cause was not isolated.) The run is short (minutes), so it keeps
no checkpoints: a finished export is not retrained, an unfinished run starts over.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import UserInputError
from ..presets import load_preset
from .config import CodecConfig

logger = logging.getLogger(__name__)

CODEC_EXPORT = "vae"


def world_frames(first_seed: int, clips: int, frames: int, height: int, width: int) -> torch.Tensor:
    """uint8 [N, 3, H, W]: each clip's video frames, its reference and its flat-lay garment (what the codec
    encodes at inference)."""
    from ..miniworld import make_triplet

    out = []
    for seed in range(first_seed, first_seed + clips):
        triplet = make_triplet(seed, frames, height, width)
        out += [*triplet.video, triplet.reference, triplet.garment_image]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _unit(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [N, 3, H, W] -> one-frame videos [N, 3, 1, H, W] in [-1, 1]."""
    return (frames.float() / 127.5 - 1.0).unsqueeze(2)


def reconstruction_error(vae, frames: torch.Tensor) -> float:
    """Mean absolute pixel error (0 … 255) of encode then decode of uint8 frames [N, 3, H, W]."""
    with torch.no_grad():
        video = _unit(frames)
        return float((vae.decode(vae.encode(video)) - video).abs().mean() * 127.5)


def train_codec(config: CodecConfig) -> Path:
    """Train, set the channel normalisation on the pool, export `<output_dir>/vae`; returns that folder."""
    from ..miniworld.evaluate import EVAL_SEED_OFFSET

    out = Path(config.output_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, pipe = load_preset(config.preset, device="cpu", random_weights=True, seed=config.seed,
                          architecture=config.architecture)
    vae, stream = pipe.vae.to(device), pipe.stream
    if not getattr(vae.config, "latent_channels", None):
        raise UserInputError(f"preset {config.preset}'s codec has nothing to learn (no latent_channels)")
    frames = config.clip_frames
    pool = world_frames(0, config.clips, frames, stream.height, stream.width).to(device)
    held_out = world_frames(EVAL_SEED_OFFSET, config.eval_clips, frames, stream.height, stream.width).to(device)
    generator = torch.Generator(device).manual_seed(config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.optim.lr, betas=config.optim.betas,
                                  weight_decay=config.optim.weight_decay, eps=config.optim.eps)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (out / "loss.csv").open("w", newline="") as handle:
        log = csv.writer(handle)
        log.writerow(["step", "elapsed_s", "loss", "held_out_l1"])
        vae.train().requires_grad_(True)
        for step in range(1, config.max_steps + 1):
            for group in optimizer.param_groups:
                group["lr"] = config.optim.lr_at(step - 1)
            video = _unit(pool[torch.randint(len(pool), (config.batch_size,), generator=generator, device=device)])
            loss = (vae.decode(vae.encode(video), clamp=False) - video).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), config.optim.grad_clip)
            optimizer.step()
            late = config.max_seconds > 0 and time.perf_counter() - start > config.max_seconds
            if step % config.log_every == 0 or step == config.max_steps or late:
                vae.eval()
                error = reconstruction_error(vae, held_out)
                vae.train()
                log.writerow([step, f"{time.perf_counter() - start:.1f}", f"{loss.item():.6g}", f"{error:.4g}"])
                handle.flush()
                logger.info("codec step %d: loss %.4f, held-out L1 %.2f / 255", step, loss.item(), error)
            if late:
                logger.info("codec: time budget of %g s spent at step %d", config.max_seconds, step)
                break
    vae.eval().requires_grad_(False)
    vae.fit_channel_stats(_unit(pool[: config.stats_clips * (frames + 2)]))
    vae.to("cpu").save_pretrained(out / CODEC_EXPORT)
    return out / CODEC_EXPORT
