"""`python -m fashionchameleon eval --preset mini --json OUT`: the method scored exactly on held-out world clips.

Held-out clips use seeds from `EVAL_SEED_OFFSET` on; training draws seeds below `DataConfig.clips`, far under it.
Clip i gives a person P, the reference (P's first frame in garment B), garment A (streamed first) and garment C
(switched to before chunk `switch_chunk`). Rows of the result:

- `ground_truth`: P rendered in A, then in C from the switch frame on, the motion continuing: the best any model
  can score (garment scores 1, continuity ~1), so every metric is read against it.
- `reference_copy`: the reference frame repeated (a negative control: the wrong garment B, no motion).
- `student/<mode>`: the 4-step streaming student with one switch, per switching mode (the paper's ablation).
- `teacher`, `student`: one clip of the teacher's `latent_frames` without a switch: the bidirectional teacher (many
  steps, guidance) against the streaming student (4 steps, no guidance) on the same inputs.

Metrics (means over clips, `metrics.py`): garment score/colour error against A before the switch and against C
after it; `follows_new_garment`, the fraction of clips whose post-switch garment is closer in colour to C than to
A; identity score; motion continuity at the switch (silhouette change into the switch frame over the ordinary
change around it, ~1 = the motion carries on); second difference and background flicker (smoothness).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from ..engine import StreamingEngine, SwitchMode
from ..errors import UserInputError
from ..teacher import TeacherSampling, sample_bidirectional
from . import metrics
from .world import Garment, Person, make_triplet, render, sample_garment

EVAL_SEED_OFFSET = 1_000_000


@dataclass(frozen=True)
class EvalConfig:
    clips: int = 16
    chunks: int = 8  # streamed chunks per clip
    switch_chunk: int = 4  # the switch to C is requested before this chunk
    modes: tuple[str, ...] = tuple(mode.value for mode in SwitchMode)
    seed: int = 0


@dataclass
class Clip:
    """One held-out case: the triplet's truth plus the garment switched to."""

    person: Person
    reference: np.ndarray
    garment: Garment  # A
    switch_garment: Garment  # C
    truth: np.ndarray  # P in A, then in C from the switch frame on

    @property
    def images(self) -> tuple[Image.Image, Image.Image, Image.Image]:
        height, width = self.reference.shape[:2]
        return (Image.fromarray(self.reference), Image.fromarray(self.garment.flat_lay((height, width))),
                Image.fromarray(self.switch_garment.flat_lay((height, width))))


def held_out_clip(index: int, frames: int, switch_frame: int, height: int, width: int) -> Clip:
    triplet = make_triplet(EVAL_SEED_OFFSET + index, 1, height, width)
    rng = np.random.default_rng([EVAL_SEED_OFFSET + index, 1])
    avoid = triplet.person.colour_segments() + [(c, c) for c in triplet.garment.colours]
    other = sample_garment(rng, avoid=avoid)
    before, _ = render(triplet.person, triplet.garment, triplet.motion, switch_frame, height, width)
    after, _ = render(triplet.person, other, triplet.motion, frames - switch_frame, height, width, start=switch_frame)
    return Clip(triplet.person, triplet.reference, triplet.garment, other, np.concatenate([before, after]))


def score_video(video: np.ndarray, clip: Clip, switch_frame: int | None) -> dict[str, float]:
    """The metrics of one video of `clip`'s person; with `switch_frame`, before/after the switch separately."""
    masks = metrics.estimate_masks(video, clip.person)
    height, width = video.shape[1:3]
    end = len(video) if switch_frame is None else switch_frame
    before = metrics.garment_fidelity(video[:end], masks["garment"][:end], clip.garment.flat_lay((height, width)))
    smooth = metrics.temporal_smoothness(video, masks["person"])
    row = {"garment_score": np.nanmean(before.score), "garment_colour_error": np.nanmean(before.colour_error),
           "identity_score": float(np.nanmean(metrics.identity_fidelity(video, masks, clip.person).score)),
           "second_difference": float(smooth.second_difference.mean()),
           "background_flicker": float(smooth.background_flicker.mean())}
    if switch_frame is not None:
        after_masks = masks["garment"][switch_frame:]
        new = metrics.garment_fidelity(video[switch_frame:], after_masks, clip.switch_garment.flat_lay((height, width)))
        old = metrics.garment_fidelity(video[switch_frame:], after_masks, clip.garment.flat_lay((height, width)))
        row.update(garment_score_after=np.nanmean(new.score), garment_colour_error_after=np.nanmean(new.colour_error),
                   follows_new_garment=float(np.nanmean(new.colour_error) < np.nanmean(old.colour_error)),
                   continuity=float(metrics.motion_continuity(masks["person"], [switch_frame])[0]))
    return {key: float(value) for key, value in row.items()}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean over clips (continuity: median, a ratio with a long tail); NaN-free entries only."""
    out = {}
    for key in rows[0]:
        values = np.array([row[key] for row in rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        reduce = np.median if key == "continuity" else np.mean
        out[key] = float(reduce(values)) if values.size else float("nan")
    return out


def _switch_timing(pipe, chunks: int, switch_chunk: int) -> tuple[int, int]:
    """(first pixel frame after a switch requested before chunk `switch_chunk`, pixel frames of `chunks` chunks)."""
    codec, chunk = pipe.codec, pipe.stream.chunk_frames
    switch_frame = codec.pixel_frames(chunk, first=True) + codec.pixel_frames(chunk * (switch_chunk - 1), first=False)
    return switch_frame, switch_frame + codec.pixel_frames(chunk * (chunks - switch_chunk), first=False)


def _stream(engine: StreamingEngine, clip: Clip, chunks: int, seed: int,
            switches: dict[int, Image.Image]) -> np.ndarray:
    reference, garment, _ = clip.images
    stream = engine.start(reference, garment, "", seed, chunks=chunks)
    return np.concatenate([chunk.frames for chunk in stream.play(switches)])


def evaluate(pipe, config: EvalConfig = EvalConfig(), teacher=None, sampling: TeacherSampling | None = None,
             progress: bool = False) -> dict:
    """Every row of the module docstring over `config.clips` held-out clips; `teacher` is the teacher transformer
    sampled as `sampling` says (None: no teacher rows)."""
    from tqdm import tqdm

    if not 1 <= config.switch_chunk < config.chunks:
        raise UserInputError(f"switch_chunk must lie in 1 .. chunks-1, got {config.switch_chunk} of {config.chunks}")
    if teacher is not None and sampling is None:
        raise ValueError("a teacher needs its `sampling` (the preset's `teacher`)")
    stream_config = pipe.stream
    engines = {mode: StreamingEngine(pipe, switch_mode=mode) for mode in config.modes}
    chunk = stream_config.chunk_frames
    switch_frame, frames = _switch_timing(pipe, config.chunks, config.switch_chunk)
    rows: dict[str, list[dict[str, float]]] = {}
    for index in tqdm(range(config.clips), disable=not progress, unit="clip"):
        clip = held_out_clip(index, frames, switch_frame, stream_config.height, stream_config.width)
        seed = config.seed + index
        rows.setdefault("ground_truth", []).append(score_video(clip.truth, clip, switch_frame))
        copies = np.repeat(clip.reference[None], frames, axis=0)
        rows.setdefault("reference_copy", []).append(score_video(copies, clip, switch_frame))
        for mode, engine in engines.items():
            video = _stream(engine, clip, config.chunks, seed, {config.switch_chunk: clip.images[2]})
            rows.setdefault(f"student/{mode}", []).append(score_video(video, clip, switch_frame))
        if teacher is not None:
            engine = next(iter(engines.values()))
            student = _stream(engine, clip, sampling.latent_frames // chunk, seed, {})
            rows.setdefault("student", []).append(score_video(student, clip, None))
            video = sample_bidirectional(pipe, teacher, sampling, *clip.images[:2], seed=seed)
            rows.setdefault("teacher", []).append(score_video(video, clip, None))
    return {"config": asdict(config), "frames": frames, "switch_frame": switch_frame,
            "rows": {name: _mean(values) for name, values in rows.items()}}


COLUMNS = (("garment_colour_error", "colour err. A", ".1f"), ("garment_colour_error_after", "colour err. C after", ".1f"),
           ("follows_new_garment", "follows C", ".0%"), ("garment_score", "garment score A", ".3f"),
           ("identity_score", "identity", ".3f"), ("continuity", "continuity", ".2f"),
           ("second_difference", "2nd diff", ".4f"), ("background_flicker", "bg flicker", ".4f"))


def format_results(result: dict) -> str:
    """A Markdown table of the rows (what the README shows); '' where a row has no such metric."""
    lines = ["| row | " + " | ".join(name for _, name, _ in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for row, values in result["rows"].items():
        cells = [format(values[key], spec) if key in values else "" for key, _, spec in COLUMNS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def example_strip(pipe, index: int = 0, chunks: int = 8, switch_chunk: int = 4, seed: int = 0,
                  every: int = 2) -> np.ndarray:
    """uint8 image: inputs (reference, garment A, garment C) then every `every`-th streamed frame of a switch,
    above the same frames of the ground truth, for the README and the model card."""
    engine = StreamingEngine(pipe)
    switch_frame, frames = _switch_timing(pipe, chunks, switch_chunk)
    clip = held_out_clip(index, frames, switch_frame, pipe.stream.height, pipe.stream.width)
    video = _stream(engine, clip, chunks, seed, {switch_chunk: clip.images[2]})
    inputs = [np.asarray(image) for image in clip.images]
    blank = np.full_like(inputs[0], 255)
    top = np.concatenate([*inputs, *video[::every]], axis=1)
    bottom = np.concatenate([blank, blank, blank, *clip.truth[::every]], axis=1)
    return np.concatenate([top, bottom], axis=0)


__all__ = ["EVAL_SEED_OFFSET", "EvalConfig", "evaluate", "example_strip", "format_results", "held_out_clip",
           "score_video"]
