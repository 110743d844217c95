"""The example inputs every preset shows (`fashionchameleon/assets/world/`): a held-out person of the mini wardrobe
world and four garments, drawn by the world itself, so they are exactly what the `mini` model knows.

    python -m fashionchameleon.miniworld.examples [FOLDER]

The output is deterministic: re-running gives the same pixels (a test checks the shipped files against it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from .evaluate import held_out_clip

EXAMPLE_CLIP = 3  # held-out evaluation clip whose person and garments (A, then the one switched to) are shown
EXTRA_GARMENT_CLIPS = (5, 8)  # held-out clips lending one more garment each
UPSCALE = 4  # nearest neighbour, so the images are visible in the app and resize back to the world size exactly


def write_examples(folder: str | Path, height: int, width: int) -> list[Path]:
    """`reference.png` and `garment_<pattern>_<n>.png`, drawn at `height` x `width` and saved UPSCALE x larger."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def save(image, name: str) -> Path:
        big = Image.fromarray(image).resize((width * UPSCALE, height * UPSCALE), Image.Resampling.NEAREST)
        big.save(folder / name, format="PNG", optimize=True)
        return folder / name

    clip = held_out_clip(EXAMPLE_CLIP, 1, 1, height, width)
    garments = [clip.garment, clip.switch_garment] + [held_out_clip(i, 1, 1, height, width).garment
                                                      for i in EXTRA_GARMENT_CLIPS]
    written = [save(clip.reference, "reference.png")]
    for garment in garments:
        written.append(save(garment.flat_lay((height, width)), f"garment_{garment.pattern}_{len(written)}.png"))
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    from ..presets import WORLD_EXAMPLES, get_preset

    parser = argparse.ArgumentParser(prog="python -m fashionchameleon.miniworld.examples",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(WORLD_EXAMPLES))
    args = parser.parse_args(argv)
    stream = get_preset("mini").stream  # the world's own frame size
    return write_examples(args.folder, stream.height, stream.width)


if __name__ == "__main__":
    main()
