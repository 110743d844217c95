"""`bench`: stream speed and the two baselines, measured side by side in one run on one preset."""

from __future__ import annotations

import logging
import resource
import statistics
import time

import torch
from PIL import Image

from .engine import StreamingEngine, sample_bidirectional
from .pipeline import FashionChameleonPipeline
from .presets import StreamConfig

logger = logging.getLogger(__name__)


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
    stream_config: StreamConfig,
    reference: Image.Image,
    garments: list[Image.Image],
    *,
    prompt: str = "a person walks forward and turns around",
    chunks: int = 40,
    switch_every: int = 0,
    baseline_chunks: int = 10,
    bidirectional_steps: int | None = None,
) -> dict:
    """Measure a stream of `chunks` chunks and, on the same preset in the same run, the recompute and the
    bidirectional baselines. `bidirectional_steps` < teacher_steps times a few steps and scales linearly
    (every teacher step costs the same); the JSON says when that was done."""
    device = pipe.transformer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine = StreamingEngine(pipe, stream_config, profile=True)
    garment, switch_images = garments[0], garments[1:] or garments
    # Warm-up (allocator, lazy init, kernels) so the first measured chunk is not a start-up artefact.
    list(engine.start(reference, garment, prompt, chunks=1))

    stamps, chunk_list, stream = _stream_seconds(engine, reference, garment, prompt, chunks, switch_every, switch_images)
    frames = sum(len(c.frames) for c in chunk_list)
    chunk_s = [c.timings["transformer"] + c.timings["decode"] for c in chunk_list]
    dit_s = sum(c.timings["transformer"] for c in chunk_list)
    switch_s = [c.timings["switch"] for c in chunk_list if "switch" in c.timings]

    # Baseline 1: no KV cache, every pass re-runs the visible context (same window, same chunks).
    m = min(baseline_chunks, chunks)
    recompute = StreamingEngine(pipe, stream_config, use_kv_cache=False, profile=True)
    _, recompute_chunks, _ = _stream_seconds(recompute, reference, garment, prompt, m, 0, switch_images)
    cached_dit = sum(c.timings["transformer"] for c in chunk_list[:m])
    recompute_dit = sum(c.timings["transformer"] for c in recompute_chunks)
    recompute_total = sum(c.timings["transformer"] + c.timings["decode"] for c in recompute_chunks)

    # The window is full from this chunk on (sink chunk + enough history chunks); cost should stay flat after.
    full_from = 1 + -(-(stream_config.history_frames - stream_config.chunk_frames) // stream_config.chunk_frames)
    steady = chunk_s[full_from : full_from + 6] or chunk_s

    # Baseline 2: the teacher-style sampler, the whole clip at once, CFG, teacher_steps steps.
    steps = stream_config.teacher_steps if bidirectional_steps is None else min(bidirectional_steps, stream_config.teacher_steps)
    bi_start = time.perf_counter()
    clip = sample_bidirectional(engine, reference, garment, prompt, steps=steps)
    bi_seconds = (time.perf_counter() - bi_start) * stream_config.teacher_steps / steps
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
        "kv_cache_mb": stream.cache.nbytes / 2**20,
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

