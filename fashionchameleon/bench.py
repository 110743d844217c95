"""`bench`: stream speed and the two baselines, measured side by side in one run on one preset.

The baselines: *recompute* (`RecomputeRollout`: no K/V kept, every pass re-runs the visible context under the
block-causal mask) and *bidirectional* (the teacher's sampler: the whole clip at once, many steps with guidance).
"""

from __future__ import annotations

import logging
import resource
import statistics
import time

import torch
from PIL import Image

from .engine import StreamingEngine
from .models.causal_wan import block_causal_mask
from .models.kv_cache import KVSlot
from .pipeline import FashionChameleonPipeline
from .rollout import Rollout, StreamConfig
from .teacher import TeacherSampling, sample_bidirectional

logger = logging.getLogger(__name__)


class RecomputeRollout(Rollout):
    """The rollout without a KV cache: each pass runs [visible clean context ; latents] under the block-causal
    mask and keeps the last frames. The cache is used for bookkeeping only (which frames stay visible).

    Each stored frame carries the id of the call that wrote it, so context frames see exactly what they saw when
    they were committed; outputs equal the cached rollout's until the window starts evicting (then the cache holds
    K/V computed with frames that are no longer visible, which recompute cannot see).
    """

    def __init__(self, *args, **kwargs) -> None:
        # Clean latents of the cached frames by slot: (latent [B, C, 1, h, w], RoPE position, call id).
        self._context: dict[KVSlot, list[tuple[torch.Tensor, int, int]]] = {slot: [] for slot in KVSlot}
        self._group = 0
        super().__init__(*args, **kwargs)

    def withdraw_history_kv(self) -> None:
        super().withdraw_history_kv()
        self._context[KVSlot.SINK].clear()
        self._context[KVSlot.HISTORY].clear()

    def _forward(self, latents, t, positions, write=None, read=None) -> torch.Tensor:
        n, batch = len(positions), latents.shape[0]
        self.cache.plan(positions, write=write, read=read)
        context = [frame for slot in (tuple(KVSlot) if read is None else read) for frame in self._visible(slot)]
        frames = torch.cat([latent for latent, _, _ in context] + [latents], dim=2)
        timestep = torch.cat([torch.zeros(len(context), device=latents.device), t.reshape(1).expand(n)])
        ids = [group for _, _, group in context] + [self._group] * n
        mask = block_causal_mask(ids, self.cache.frame_tokens, device=latents.device)
        frame_positions = [pos for _, pos, _ in context] + list(positions)
        out = self.model(frames.to(self.transformer.dtype), timestep.expand(batch, -1), self.text,
                         frame_positions=frame_positions, attention_mask=mask)
        if write is not None:
            for i, slot in enumerate([write] * n if isinstance(write, KVSlot) else write):
                if slot in (KVSlot.REFERENCE, KVSlot.GARMENT):
                    self._context[slot].clear()
                self._context[slot].append((latents[:, :, i : i + 1], positions[i], self._group))
            self._group += 1
        return out.sample[:, :, -n:]

    def _visible(self, slot: KVSlot) -> list[tuple[torch.Tensor, int, int]]:
        kept = self.cache.positions(slot)
        self._context[slot] = [frame for frame in self._context[slot] if frame[1] in kept]
        return self._context[slot]


class RecomputeEngine(StreamingEngine):
    """Streams on `RecomputeRollout`: the same chunks at the cost of keeping no K/V."""

    rollout_class = RecomputeRollout


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: whole-process peak RSS


def _stream_seconds(engine: StreamingEngine, reference, garment, prompt, chunks, switch_every, switch_images):
    """Run one stream; return (seconds from request to each chunk, the chunks, the stream)."""
    start = time.perf_counter()
    stream = engine.start(reference, garment, prompt, seed=0, chunks=chunks)
    stamps, out = [], []
    for chunk in stream:
        stamps.append(time.perf_counter() - start)
        out.append(chunk)
        if switch_every and (chunk.index + 1) % switch_every == 0:
            stream.request_switch(switch_images[(chunk.index + 1) // switch_every % len(switch_images)])
    return stamps, out, stream


def run_bench(
    pipe: FashionChameleonPipeline,
    teacher: TeacherSampling,
    reference: Image.Image,
    garments: list[Image.Image],
    *,
    stream: StreamConfig | None = None,
    prompt: str = "a person walks forward and turns around",
    chunks: int = 40,
    switch_every: int = 0,
    baseline_chunks: int = 10,
    bidirectional_steps: int | None = None,
) -> dict:
    """Measure a stream of `chunks` chunks (`stream`: the pipeline's settings unless given) and, on the same model in
    the same run, the recompute and the bidirectional baselines (the latter sampled as `teacher` says, on the
    student's weights). `bidirectional_steps` < teacher.steps times a few steps and scales linearly (every teacher
    step costs the same); the JSON says when that was done."""
    stream_config = stream or pipe.stream
    device = pipe.transformer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine = StreamingEngine(pipe, stream_config, profile=True)
    garment, switch_images = garments[0], garments[1:] or garments
    # Warm-up (allocator, lazy init, kernels) so the first measured chunk is not a start-up artefact.
    list(engine.start(reference, garment, prompt, chunks=1))

    stamps, chunk_list, streamed = _stream_seconds(engine, reference, garment, prompt, chunks, switch_every,
                                                   switch_images)
    frames = sum(c.num_frames for c in chunk_list)
    chunk_s = [c.timings["transformer"] + c.timings["decode"] for c in chunk_list]
    dit_s = sum(c.timings["transformer"] for c in chunk_list)
    switch_s = [c.timings["switch"] for c in chunk_list if "switch" in c.timings]

    # Baseline 1: no KV cache, every pass re-runs the visible context (same window, same chunks).
    m = min(baseline_chunks, chunks)
    recompute = RecomputeEngine(pipe, stream_config, profile=True)
    _, recompute_chunks, _ = _stream_seconds(recompute, reference, garment, prompt, m, 0, switch_images)
    cached_dit = sum(c.timings["transformer"] for c in chunk_list[:m])
    recompute_dit = sum(c.timings["transformer"] for c in recompute_chunks)
    recompute_total = sum(c.timings["transformer"] + c.timings["decode"] for c in recompute_chunks)

    # The window is full from this chunk on (sink chunk + enough history chunks); cost should stay flat after.
    full_from = 1 + -(-(stream_config.history_frames - stream_config.chunk_frames) // stream_config.chunk_frames)
    steady = chunk_s[full_from : full_from + 6] or chunk_s

    # Baseline 2: the teacher's sampler, the whole clip at once with guidance, `teacher.steps` steps.
    steps = teacher.steps if bidirectional_steps is None else min(bidirectional_steps, teacher.steps)
    bi_start = time.perf_counter()
    clip = sample_bidirectional(pipe, pipe.transformer, teacher, reference, garment, prompt, stream=stream_config,
                                steps=steps)
    bi_seconds = (time.perf_counter() - bi_start) * teacher.steps / steps
    bi_fps = clip.shape[0] / bi_seconds

    fps = frames / stamps[-1]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(pipe.transformer.dtype).replace("torch.", ""),
        "resolution": f"{stream_config.width}x{stream_config.height}",
        "steps": len(stream_config.denoising_steps),
        "chunks": chunks,
        "frames": frames,
        "fps": fps,
        "dit_fps": frames / dit_s,
        "first_frame_ms": stamps[0] * 1000,
        "chunk_ms_median": statistics.median(chunk_s) * 1000,
        "decode_ms_median": statistics.median(c.timings["decode"] for c in chunk_list) * 1000,
        "chunk_ms_first": chunk_s[0] * 1000,
        "chunk_ms_last": chunk_s[-1] * 1000,
        "chunk_ms_all": [round(s * 1000, 3) for s in chunk_s],
        "last_over_first": chunk_s[-1] / chunk_s[0],
        "window_full_from_chunk": full_from,
        "flatness": statistics.median(chunk_s[-6:]) / statistics.median(steady),
        "dit_chunk_ms_all": [round(c.timings["transformer"] * 1000, 3) for c in chunk_list],
        "switch_every": switch_every,
        "switches": len(switch_s),
        "switch_ms_median": statistics.median(switch_s) * 1000 if switch_s else None,
        "switch_fraction_of_chunk": statistics.median(switch_s) / statistics.median(chunk_s) if switch_s else None,
        "peak_memory_mb": _peak_memory_mb(device),
        "kv_cache_mb": streamed.rollout.cache.nbytes / 2**20,
        "baseline_chunks": m,
        "speedup_vs_recompute": recompute_dit / cached_dit,
        "speedup_vs_recompute_end_to_end": recompute_total / sum(chunk_s[:m]),
        "bidirectional_fps": bi_fps,
        "bidirectional_steps_timed": steps,
        "speedup_vs_bidirectional": fps / bi_fps,
    }


def format_table(result: dict) -> str:
    rows = [
        ("device", result["device"]), ("resolution", result["resolution"]), ("dtype", result["dtype"]),
        ("chunks / frames", f"{result['chunks']} / {result['frames']}"),
        ("fps (end to end)", f"{result['fps']:.2f}"), ("dit_fps", f"{result['dit_fps']:.2f}"),
        ("first_frame_ms", f"{result['first_frame_ms']:.1f}"),
        ("decode_ms_median", f"{result['decode_ms_median']:.1f}"),
        ("chunk_ms median / first / last", f"{result['chunk_ms_median']:.1f} / {result['chunk_ms_first']:.1f} / "
                                           f"{result['chunk_ms_last']:.1f}"),
        ("last / first chunk", f"{result['last_over_first']:.2f}"),
        ("flatness (last 6 / 6 after window fills)", f"{result['flatness']:.2f}"),
        ("switch_ms_median", "-" if result["switch_ms_median"] is None else
         f"{result['switch_ms_median']:.1f} ({result['switch_fraction_of_chunk']:.2f} of a chunk)"),
        ("peak_memory_mb", f"{result['peak_memory_mb']:.0f}"), ("kv_cache_mb", f"{result['kv_cache_mb']:.2f}"),
        ("speedup_vs_recompute", f"{result['speedup_vs_recompute']:.2f}x transformer, "
                                 f"{result['speedup_vs_recompute_end_to_end']:.2f}x end to end "
                                 f"(first {result['baseline_chunks']} chunks)"),
        ("speedup_vs_bidirectional", f"{result['speedup_vs_bidirectional']:.2f}x"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)

