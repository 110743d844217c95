"""What the tests need beyond the package: the shipped example inputs, reading back what the code wrote (videos,
official checkpoints), and the mini wardrobe world written to disk in the training data layouts."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import av
from PIL import Image

from fashionchameleon import media
from fashionchameleon.miniworld import make_triplet
from fashionchameleon.presets import WORLD_EXAMPLES, get_preset
from fashionchameleon.training.data import (AUTHORS_GARMENT_SUFFIX, AUTHORS_REFERENCE_SUFFIX, FOLDER_GARMENT,
                                            FOLDER_PROMPT, FOLDER_REFERENCE, FOLDER_VIDEO)

ROOT = Path(__file__).resolve().parent.parent
TINY_TRANSFORMER = get_preset("tiny").transformer
REFERENCE = str(WORLD_EXAMPLES / "reference.png")
GARMENTS = [str(p) for p in sorted(WORLD_EXAMPLES.glob("garment_*.png"))]


# -- the CLI ----------------------------------------------------------------------------------------------
#: One process imports the CLI once, then forks a child per command line: each child is `python -m fashionchameleon`
#: from main() on, with its own stderr (the file descriptor, so logging's handler writes there too) and exit code.
#: Ten refusals cost one import (~4 s) instead of ten.
_FORKED_CLI = r"""
import json, os, sys, tempfile
from fashionchameleon.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    with tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            os.dup2(err.fileno(), 2)
            try:
                code = main(argv)
            except SystemExit as exit:
                code = exit.code
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
        _, status = os.waitpid(pid, 0)
        err.seek(0)
        results.append([os.waitstatus_to_exitcode(status), err.read().decode()])
print(json.dumps(results))
"""


def cli_refusals(*argvs: list[str]) -> list[tuple[int, str]]:
    """(exit code, stderr) of each command line, as `python -m fashionchameleon` gives them. For commands that end
    before loading a model; a run that makes files is a subprocess of its own."""
    done = subprocess.run([sys.executable, "-c", _FORKED_CLI, json.dumps(argvs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return [tuple(result) for result in json.loads(done.stdout)]


# -- videos ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoInfo:
    """What a video file really contains (frames counted by decoding, not from the header)."""

    codec: str
    frames: int
    width: int
    height: int
    fps: float
    pix_fmt: str | None


def probe_video(path: str | Path) -> VideoInfo:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        frames = sum(1 for _ in container.decode(stream))
        context = stream.codec_context
        return VideoInfo(context.name, frames, context.width, context.height, float(rate) if rate else 0.0,
                         context.pix_fmt)


# -- official checkpoints -------------------------------------------------------------------------------------
# Inverse of diffusers' table (diffusers -> native), applied in order with str.replace; the norm2/norm3 swap goes
# through a placeholder exactly as the forward table does.
_TO_OFFICIAL = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1.", "self_attn."),
    ("attn2.", "cross_attn."),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".add_k_proj.", ".k_img."),
    (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."),
    ("proj_out", "head.head"),
    ("scale_shift_table", "modulation"),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
)


def to_official_state_dict(state_dict: dict) -> dict:
    """Diffusers names -> `model.` + native Wan2.2 names, the layout of an official `model.pt` generator dict."""
    out = {}
    for key, value in state_dict.items():
        if key == "scale_shift_table":  # the head's table; the blocks' ones become `modulation`
            new = "head.modulation"
        else:
            new = key
            for old, rep in _TO_OFFICIAL:
                new = new.replace(old, rep)
        out["model." + new] = value
    return out


# -- the world on disk -----------------------------------------------------------------------------------------
MOTION_CAPTIONS = {"sway": "A person sways from side to side.", "arm_swing": "A person swings their arms.",
                   "walk": "A person walks in place.", "turn": "A person turns left and right.",
                   "wave": "A person waves a hand."}
STATIC_CAPTION = "They stand in a plain studio."
FPS = 12


def write_world_dataset(root: str | Path, *, layout: str = "folder", clips: int = 2, frames: int = 13,
                        height: int = 64, width: int = 32, seed: int = 0) -> Path:
    """`clips` world triplets under `root` in `layout` ("folder" or "authors"), captioned from their motion."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for clip in range(clips):
        triplet = make_triplet(seed + clip, frames, height, width)
        dynamic = MOTION_CAPTIONS[triplet.motion.kind]
        if layout == "folder":
            folder = root / f"clip_{clip:03d}"
            folder.mkdir(exist_ok=True)
            paths = folder / FOLDER_VIDEO, folder / FOLDER_REFERENCE, folder / FOLDER_GARMENT
            (folder / FOLDER_PROMPT).write_text(json.dumps({"dynamic": dynamic, "static": STATIC_CAPTION}))
        else:
            stem = root / f"case{clip}" / f"slice_{clip:04d}"
            stem.parent.mkdir(exist_ok=True)
            paths = (stem.with_suffix(".mp4"), Path(f"{stem}{AUTHORS_REFERENCE_SUFFIX}"),
                     Path(f"{stem}{AUTHORS_GARMENT_SUFFIX}"))
            prompt = {"en_long": [dynamic, STATIC_CAPTION], "en_short": [dynamic, ""]}
            rows.append([paths[0].relative_to(root).as_posix(), json.dumps(prompt), width, height])
        with media.VideoWriter(paths[0], FPS) as writer:
            writer.write(triplet.video)
        Image.fromarray(triplet.reference).save(paths[1])
        Image.fromarray(triplet.garment_image).save(paths[2])
    if layout == "authors":
        with (root / "meta_train.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([["video", "prompt", "width", "height"], *rows])
    return root


def caption(seed: int) -> str:
    """The dynamic caption `write_world_dataset` gives the clip drawn from `seed`."""
    return MOTION_CAPTIONS[make_triplet(seed, 1, 16, 16).motion.kind]
