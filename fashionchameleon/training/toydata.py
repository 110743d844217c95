"""A toy triplet dataset drawn procedurally, in either layout, for the tiny configs and the tests.

Each clip is a coloured "person" block sliding over a grey floor while wearing a striped "garment"; the reference is
the first frame with the garment in another colour (the paper's mismatched reference, METHOD.md §2.2).

    python -m fashionchameleon.training.toydata data/toy [--layout folder|authors] [--clips 4]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .. import media
from .data import (AUTHORS_GARMENT_SUFFIX, AUTHORS_REFERENCE_SUFFIX, FOLDER_GARMENT, FOLDER_PROMPT, FOLDER_REFERENCE,
                   FOLDER_VIDEO)

MOTIONS = ("walks to the left", "walks to the right", "turns around", "waves a hand")
SCENES = ("in a grey studio", "on a plain stage")


def draw_frame(width: int, height: int, x: int, body: tuple[int, ...], stripes: tuple[int, ...]) -> np.ndarray:
    """uint8 [H, W, 3]: a body block at column `x` with a striped torso."""
    frame = np.full((height, width, 3), 96, dtype=np.uint8)
    w, h = max(2, width // 4), max(4, height // 2)
    top = height // 4
    frame[top : top + h, x : x + w] = body
    frame[top + h // 4 : top + h // 2 : 2, x : x + w] = stripes
    return frame


def write_toy_dataset(root: str | Path, *, layout: str = "folder", clips: int = 2, width: int = 64,
                      height: int = 64, frames: int = 13, seed: int = 0) -> Path:
    """Write `clips` triplets under `root` in `layout` ("folder" or "authors"); returns `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for clip in range(clips):
        body, stripes, other = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(3))
        step = 1 if clip % 2 == 0 else -1
        start = width // 3
        video = np.stack([draw_frame(width, height, (start + step * i) % (width - width // 4), body, stripes)
                          for i in range(frames)])
        reference = Image.fromarray(draw_frame(width, height, start, body, other))
        garment = Image.new("RGB", (width, height * 2 // 3), stripes)  # >= media.MIN_IMAGE_SIDE
        dynamic = f"A person {MOTIONS[clip % len(MOTIONS)]}."
        static = f"They stand {SCENES[clip % len(SCENES)]}."
        if layout == "folder":
            folder = root / f"clip_{clip:03d}"
            folder.mkdir(exist_ok=True)
            paths = folder / FOLDER_VIDEO, folder / FOLDER_REFERENCE, folder / FOLDER_GARMENT
            (folder / FOLDER_PROMPT).write_text(json.dumps({"dynamic": dynamic, "static": static}))
        elif layout == "authors":
            stem = root / f"case{clip}" / f"slice_{clip:04d}"
            stem.parent.mkdir(exist_ok=True)
            paths = (stem.with_suffix(".mp4"), Path(f"{stem}{AUTHORS_REFERENCE_SUFFIX}"),
                     Path(f"{stem}{AUTHORS_GARMENT_SUFFIX}"))
            prompt = {"en_long": [dynamic, static], "en_short": [dynamic, ""]}
            rows.append([paths[0].relative_to(root).as_posix(), json.dumps(prompt), width, height])
        else:
            raise ValueError(f"layout must be 'folder' or 'authors', got {layout!r}")
        with media.VideoWriter(paths[0]) as writer:
            writer.write(video)
        reference.save(paths[1])
        garment.save(paths[2])
    if layout == "authors":
        with (root / "meta_train.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([["video", "prompt", "width", "height"], *rows])
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fashionchameleon.training.toydata", description=__doc__.split("\n")[0])
    parser.add_argument("root")
    parser.add_argument("--layout", default="folder", choices=["folder", "authors"])
    parser.add_argument("--clips", type=int, default=4)
    args = parser.parse_args(argv)
    write_toy_dataset(args.root, layout=args.layout, clips=args.clips)


if __name__ == "__main__":
    main()
