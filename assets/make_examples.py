"""Draw the example inputs shipped with the project (our own drawings, PIL only, fixed seed).

Run ``python assets/make_examples.py`` to regenerate; the output is deterministic, so re-running
gives the same pixels (and, with the same Pillow, the same bytes). Writes next to this file:

* ``reference.png``            a stylised person in a plain top, portrait 352x640
* ``garment_red_stripes.png``  flat-lay tee on white, square 512x512
* ``garment_blue_checks.png``  same silhouette, gingham checks
* ``garment_green_dots.png``   same silhouette, polka dots
* ``world/``                   the `mini` preset's examples: a held-out person and garments of the mini wardrobe
                               world (the only inputs that model knows), drawn by `fashionchameleon.miniworld`

Shapes are drawn at 2x and downsampled (anti-aliasing), then reduced to a small palette so each
PNG stays a few tens of KB.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SEED = 20240611
SS = 2  # supersampling factor
OUT_DIR = Path(__file__).resolve().parent
REFERENCE_SIZE = (352, 640)
GARMENT_SIZE = (512, 512)
PALETTE_COLOURS = 48

WHITE = (255, 255, 255)
SKIN = (233, 190, 160)
SKIN_SHADE = (214, 166, 136)
HAIR = (62, 40, 28)
TOP = (226, 226, 220)  # plain off-white top: the garment the examples replace
TOP_SHADE = (200, 200, 194)
TROUSERS = (52, 62, 86)
SHOES = (40, 36, 34)
WALL = (200, 214, 226)
FLOOR = (170, 160, 150)


def _s(*values: float) -> list[int]:
    """Scale design coordinates (final-size pixels) to the supersampled canvas."""
    return [round(v * SS) for v in values]


def _finish(canvas: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Downsample and quantize: smooth edges, few colours, small deterministic PNG."""
    small = canvas.resize(size, Image.Resampling.LANCZOS)
    return small.quantize(colors=PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def _save(image: Image.Image, name: str) -> Path:
    path = OUT_DIR / name
    image.save(path, format="PNG", optimize=True)
    return path


# --- person -----------------------------------------------------------------------------------


def draw_reference(rng: random.Random) -> Image.Image:
    """A front-facing stylised person standing in a room (wall + floor), plain short-sleeve top."""
    w, h = REFERENCE_SIZE
    img = Image.new("RGB", _s(w, h), WALL)
    d = ImageDraw.Draw(img)

    # Room: wall with a faint skirting line, floor, soft shadow under the feet.
    d.rectangle(_s(0, 520, w, h), fill=FLOOR)
    d.rectangle(_s(0, 514, w, 520), fill=(184, 196, 208))
    shadow = Image.new("L", img.size, 0)
    ImageDraw.Draw(shadow).ellipse(_s(96, 596, 256, 624), fill=90)
    shadow = shadow.filter(ImageFilter.GaussianBlur(6 * SS))
    img.paste(Image.new("RGB", img.size, (120, 112, 104)), (0, 0), shadow)
    d = ImageDraw.Draw(img)

    cx = w / 2 + rng.uniform(-2, 2)

    # Legs (trousers) and shoes.
    d.polygon([tuple(_s(cx - 46, 330)), tuple(_s(cx + 46, 330)), tuple(_s(cx + 40, 600)),
               tuple(_s(cx + 8, 600)), tuple(_s(cx, 390)), tuple(_s(cx - 8, 600)),
               tuple(_s(cx - 40, 600))], fill=TROUSERS)
    d.rounded_rectangle(_s(cx - 46, 594, cx - 4, 612), radius=8 * SS, fill=SHOES)
    d.rounded_rectangle(_s(cx + 4, 594, cx + 46, 612), radius=8 * SS, fill=SHOES)

    # Arms hang slightly away from the body; forearms in skin tone, hands as circles.
    for side in (-1, 1):
        sx = cx + side * 62
        d.line([tuple(_s(sx, 190)), tuple(_s(sx + side * 18, 300)), tuple(_s(sx + side * 22, 372))],
               fill=SKIN, width=22 * SS, joint="curve")
        d.ellipse(_s(sx + side * 22 - 13, 362, sx + side * 22 + 13, 392), fill=SKIN_SHADE)

    # Neck, then the plain top (short sleeves over the upper arms).
    d.rectangle(_s(cx - 14, 140, cx + 14, 176), fill=SKIN_SHADE)
    top = [(cx - 52, 164), (cx - 20, 160), (cx, 172), (cx + 20, 160), (cx + 52, 164),
           (cx + 86, 206), (cx + 70, 246), (cx + 54, 232), (cx + 52, 340), (cx - 52, 340),
           (cx - 54, 232), (cx - 70, 246), (cx - 86, 206)]
    d.polygon([tuple(_s(x, y)) for x, y in top], fill=TOP)
    d.line([tuple(_s(x, y)) for x, y in top + top[:1]], fill=TOP_SHADE, width=2 * SS)
    d.line([tuple(_s(cx - 54, 232)), tuple(_s(cx - 50, 300))], fill=TOP_SHADE, width=2 * SS)
    d.line([tuple(_s(cx + 54, 232)), tuple(_s(cx + 50, 300))], fill=TOP_SHADE, width=2 * SS)
    d.arc(_s(cx - 20, 150, cx + 20, 180), start=20, end=160, fill=TOP_SHADE, width=2 * SS)

    # Head: hair behind, face, hair fringe on top, simple features.
    d.ellipse(_s(cx - 46, 58, cx + 46, 160), fill=HAIR)
    d.ellipse(_s(cx - 36, 70, cx + 36, 156), fill=SKIN)
    d.chord(_s(cx - 40, 58, cx + 40, 118), start=180, end=360, fill=HAIR)
    d.pieslice(_s(cx - 40, 66, cx + 10, 110), start=180, end=300, fill=HAIR)
    d.ellipse(_s(cx - 40, 104, cx - 32, 120), fill=SKIN_SHADE)  # ears
    d.ellipse(_s(cx + 32, 104, cx + 40, 120), fill=SKIN_SHADE)
    for ex in (cx - 14, cx + 14):
        d.ellipse(_s(ex - 4, 106, ex + 4, 113), fill=(50, 40, 36))
        d.line([tuple(_s(ex - 8, 98)), tuple(_s(ex + 7, 97))], fill=HAIR, width=2 * SS)
    d.line([tuple(_s(cx, 112)), tuple(_s(cx - 3, 126)), tuple(_s(cx + 2, 127))], fill=SKIN_SHADE, width=2 * SS)
    d.arc(_s(cx - 11, 126, cx + 11, 142), start=20, end=160, fill=(176, 92, 92), width=3 * SS)

    return _finish(img, REFERENCE_SIZE)


# --- garments ---------------------------------------------------------------------------------

# A tee seen from the front, laid flat; coordinates on the 512x512 final canvas.
# The outline starts and ends at the collar, whose lower half-ellipse is cut out of the body.
TEE = [(298, 62), (326, 70), (428, 120), (466, 214), (392, 244), (372, 206), (374, 450),
       (138, 450), (140, 206), (120, 244), (46, 214), (84, 120), (186, 70), (214, 62)]
NECK = (214, 24, 298, 100)  # centre on the shoulder line y=62: only the scoop below it shows
COLLAR = (206, 16, 306, 108)  # the rib seam around the neck opening


def _tee_mask() -> Image.Image:
    mask = Image.new("L", _s(*GARMENT_SIZE), 0)
    d = ImageDraw.Draw(mask)
    d.polygon([tuple(_s(x, y)) for x, y in TEE], fill=255)
    d.chord(_s(*NECK), start=0, end=180, fill=0)
    return mask


def _pattern_stripes(rng: random.Random) -> Image.Image:
    img = Image.new("RGB", _s(*GARMENT_SIZE), (250, 246, 240))
    d = ImageDraw.Draw(img)
    period, width = 36, 16
    offset = rng.randrange(period)
    for y in range(-period + offset, GARMENT_SIZE[1] + period, period):
        d.rectangle(_s(0, y, GARMENT_SIZE[0], y + width), fill=(196, 32, 44))
    return img


def _pattern_checks(rng: random.Random) -> Image.Image:
    img = Image.new("RGB", _s(*GARMENT_SIZE), (246, 248, 252))
    band = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(band)
    period, width = 40, 20
    offset = rng.randrange(period)
    for v in range(-period + offset, GARMENT_SIZE[0] + period, period):
        d.rectangle(_s(v, 0, v + width, GARMENT_SIZE[1]), fill=(40, 84, 170, 120))
    img.paste(band, (0, 0), band)
    band = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(band)
    for v in range(-period + offset, GARMENT_SIZE[1] + period, period):
        d.rectangle(_s(0, v, GARMENT_SIZE[0], v + width), fill=(40, 84, 170, 120))
    img.paste(band, (0, 0), band)  # overlaps come out darker: the gingham look
    return img


def _pattern_dots(rng: random.Random) -> Image.Image:
    img = Image.new("RGB", _s(*GARMENT_SIZE), (212, 236, 214))
    d = ImageDraw.Draw(img)
    step, radius = 44, 9
    for row, y in enumerate(range(0, GARMENT_SIZE[1] + step, step)):
        shift = step / 2 if row % 2 else 0
        for x in range(0, GARMENT_SIZE[0] + step, step):
            jx, jy = rng.uniform(-2, 2), rng.uniform(-2, 2)
            px, py = x + shift + jx, y + jy
            d.ellipse(_s(px - radius, py - radius, px + radius, py + radius), fill=(30, 122, 60))
    return img


def draw_garment(pattern: Image.Image, outline: tuple[int, int, int]) -> Image.Image:
    """Cut the tee silhouette out of ``pattern`` and lay it on white with seams and a soft shadow."""
    mask = _tee_mask()
    canvas = Image.new("RGB", mask.size, WHITE)
    shadow = mask.filter(ImageFilter.GaussianBlur(5 * SS)).point(lambda v: v * 50 // 255)
    canvas.paste(Image.new("RGB", mask.size, (150, 150, 150)), (4 * SS, 6 * SS), shadow)
    canvas.paste(pattern, (0, 0), mask)
    d = ImageDraw.Draw(canvas)
    d.line([tuple(_s(x, y)) for x, y in TEE], fill=outline, width=2 * SS, joint="curve")
    d.arc(_s(*NECK), start=0, end=180, fill=outline, width=2 * SS)
    d.arc(_s(*COLLAR), start=8, end=172, fill=outline, width=SS)
    for x0, y0, x1, y1 in ((140, 206, 120, 244), (372, 206, 392, 244)):  # sleeve hems
        d.line([tuple(_s(x0 - (x1 - x0) * 0.1, y0 + 8)), tuple(_s(x1 + 2, y1 - 10))], fill=outline, width=SS)
    d.line([tuple(_s(140, 438)), tuple(_s(372, 438))], fill=outline, width=SS)  # bottom hem
    return _finish(canvas, GARMENT_SIZE)


WORLD_CLIP = 3  # held-out evaluation clip whose person and garments the `mini` examples show
WORLD_EXTRA_GARMENTS = (5, 8)  # held-out clips lending one more garment each
WORLD_UPSCALE = 4  # nearest-neighbour, so the 64x48 world images are visible in the app and resize back exactly


def write_world_examples() -> list[Path]:
    """`world/reference.png` and `world/garment_*.png` at WORLD_UPSCALE x the `mini` frame size."""
    from fashionchameleon.miniworld.evaluate import held_out_clip
    from fashionchameleon.presets import MINI_STREAM

    height, width = MINI_STREAM.height, MINI_STREAM.width
    folder = OUT_DIR / "world"
    folder.mkdir(exist_ok=True)

    def save(image, name: str) -> Path:
        big = Image.fromarray(image).resize((width * WORLD_UPSCALE, height * WORLD_UPSCALE), Image.Resampling.NEAREST)
        big.save(folder / name, format="PNG", optimize=True)
        return folder / name

    clip = held_out_clip(WORLD_CLIP, 1, 1, height, width)
    garments = [clip.garment, clip.switch_garment] + [held_out_clip(i, 1, 1, height, width).garment
                                                      for i in WORLD_EXTRA_GARMENTS]
    written = [save(clip.reference, "reference.png")]
    for garment in garments:
        written.append(save(garment.flat_lay((height, width)), f"garment_{garment.pattern}_{len(written)}.png"))
    return written


def main() -> list[Path]:
    rng = random.Random(SEED)
    written = [_save(draw_reference(rng), "reference.png")]
    for name, pattern, outline in (
        ("garment_red_stripes.png", _pattern_stripes, (120, 20, 28)),
        ("garment_blue_checks.png", _pattern_checks, (26, 52, 110)),
        ("garment_green_dots.png", _pattern_dots, (24, 90, 44)),
    ):
        written.append(_save(draw_garment(pattern(rng), outline), name))
    return written + write_world_examples()


if __name__ == "__main__":
    main()
