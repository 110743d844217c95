"""Metrics that are exact in the wardrobe world (issue 7).

Every function takes uint8 videos [F, H, W, 3] plus masks or the world's ground truth and returns values per frame
(or per frame transition), so a garment switch can be scored just before and just after its frame. Conventions:
errors are >= 0 (0 = exact, lower is better); scores lie in [0, 1] (1 = exact, higher is better); ratios are
~1 for an ordinary frame. Masks come from `world.render` for ground truth, or from `estimate_masks` for a generated
video of a known person (exact on rendered frames because the world keeps all colours apart, see `world`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world import PATTERNS, Person

MAX_RGB = 255.0
GARMENT_WHITE_DISTANCE = 30.0  # flat-lay pixels farther than this from white are garment (world keeps >= 60)
PALETTE_SIZE = 2  # a garment shows a base colour and at most one pattern colour
PALETTE_MERGE_DISTANCE = 1.0  # a second palette colour closer than this to the first is the same colour (solid)
KMEANS_ITERATIONS = 10
EDGE_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))  # (dy, dx) neighbour steps: along x, y and both diagonals
DIRECTION_WEIGHT = 1.0  # how edges share out over directions (stripes vs checks, orientation)
MIN_EDGE_DENSITY = 0.5  # below this (about one edge per two torso lengths) a region is plain: shares ~0
EDGE_THRESHOLD = 40.0  # RGB step between neighbours that counts as a pattern edge (world keeps contrast >= 80)
# Score tolerances: the error at which a factor of the score falls to 1/e. Set from measurements on ground truth
# (solid garments score 1, patterned ones 0.59-0.9 per frame at 64 px: pattern statistics alias) and on
# corrupted clips (<= 0.1; see tests/test_miniworld.py).
COLOUR_TOLERANCE = 20.0  # RGB units
PROPORTION_TOLERANCE = 0.5  # total variation of palette shares
PATTERN_TOLERANCE = 1.0  # pattern_error units
IDENTITY_TOLERANCE = 20.0  # RGB units
SILHOUETTE_DISTANCE = 30.0  # a pixel this far from the background is the person (world keeps >= 60)
PART_DISTANCE = 30.0  # a person pixel this close to an identity colour belongs to that part (world keeps >= 60)
CONTINUITY_WINDOW = 1  # ordinary transitions on each side of a switch that set its expected change
MIN_SILHOUETTE_CHANGE = 0.01  # floor of the ordinary change, so a frozen clip does not divide by zero
# Pattern class thresholds, measured on 120 held-out clips x 24 frames at 64 x 48 (`pattern_class`): per-frame
# accuracy 0.988 (seeds 1,000,000+; 0.996 on seeds 0-119), see tests/test_miniworld.py.
MIN_PATTERN_EDGE_DENSITY = 5.0  # fewer edges per torso length is solid: worn patterns measured >= 10, solid 0
MIN_PATTERN_SHARE = 0.1  # a second colour covering less is specks, not a pattern: dots cover >= 0.18 measured
MAX_STRIPE_DIRECTION_RATIO = 0.5  # weakest / strongest edge direction: stripes have none along them (measured
# 0.23 median, 0.39 at the 95th percentile; checks and dots >= 0.5)
MAX_DOT_SHARE = 0.35  # dots cover pi 0.28^2 = 0.25 of the garment (measured <= 0.335), checks and stripes 0.5
MIN_PALETTE_FIT = 0.8  # share of garment pixels near one of its two colours for a pattern to be read at all: the
# world's garments are two flat colours (1.0); the shipped mini's smeared garments measured 0.01-0.47
PALETTE_FIT_DISTANCE = 30.0  # RGB: a pixel this close to a palette colour is that colour (world keeps >= 80 apart)
PRESENCE_PARTS = ("hair", "skin", "legs")  # parts whose areas say the person is all still there (hair, skin: head)
SOLID, STRIPES, CHECKS, DOTS = PATTERNS  # the world's pattern names, in its order
NO_PATTERN = ""  # `pattern_class` of a frame with no garment, or one that is not two flat colours: matches none


@dataclass
class GarmentFidelity:
    """Per frame [F]; NaN where a frame shows no garment."""

    colour_error: np.ndarray  # mean RGB distance of garment pixels to the garment image's nearest colour, 0..441
    proportion_error: np.ndarray  # total variation between the colours' shares in the frame and in the image, 0..1
    pattern_error: np.ndarray  # pattern frequency and orientation distance, frame vs image, >= 0
    score: np.ndarray  # exp(-sum of errors / tolerances), 0..1


@dataclass
class IdentityFidelity:
    """Per frame [F]; a part absent from a frame (a bald head, hidden face) is NaN and left out of the score."""

    errors: dict[str, np.ndarray]  # per part: mean RGB distance to the person's true colour, 0..441
    score: np.ndarray  # exp(-mean part error / IDENTITY_TOLERANCE), 0..1


@dataclass
class Smoothness:
    """Per transition; both 0..1, lower is smoother."""

    second_difference: np.ndarray  # [F-2] mean |x[t+1] - 2 x[t] + x[t-1]| / 255: jerk and flicker everywhere
    background_flicker: np.ndarray  # [F-1] mean |x[t] - x[t-1]| / 255 where both frames show background: 0 if true


def _distance(pixels: np.ndarray, colour) -> np.ndarray:
    return np.linalg.norm(pixels.astype(np.float64) - np.asarray(colour, dtype=np.float64), axis=-1)


def garment_image_mask(image: np.ndarray) -> np.ndarray:
    """bool [H, W]: the garment pixels of a flat lay (everything not near its white backdrop)."""
    return _distance(image, (MAX_RGB,) * 3) > GARMENT_WHITE_DISTANCE


def palette(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(colours [K, 3], shares [K]) of up to PALETTE_SIZE colours: exact for the world's two-colour garments.

    Deterministic k-means seeded with the most frequent colour, then each next colour farthest from those chosen.
    """
    pixels = pixels.reshape(-1, 3).astype(np.float64)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    centres = [colours[np.argmax(counts)]]
    while len(centres) < PALETTE_SIZE:
        far = np.min([_distance(pixels, c) for c in centres], axis=0)
        if far.max() < PALETTE_MERGE_DISTANCE:
            break
        centres.append(pixels[np.argmax(far)])
    centres = np.array(centres)
    for _ in range(KMEANS_ITERATIONS):
        nearest = np.argmin(np.stack([_distance(pixels, c) for c in centres], -1), -1)
        centres = np.array([pixels[nearest == k].mean(0) for k in range(len(centres))])
    nearest = np.argmin(np.stack([_distance(pixels, c) for c in centres], -1), -1)
    return centres, np.bincount(nearest, minlength=len(centres)) / len(pixels)


def edge_density(frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """[F, 4] pattern edges between neighbours along x, y and both diagonals inside the masks, per pixel, times
    the masks' height in pixels.

    A tee's height is its torso length worn or laid flat, so the product counts edges per torso length: the same
    for a 64-pixel frame and a flat lay of any size, and independent of how much of the garment is visible. The
    four directions tell stripes (no edges along the stripes) from checks and dots. Region borders never count:
    both neighbours must lie inside the mask.
    """
    frames = frames.astype(np.float64)
    rows = masks.any(-1)
    first, last = rows.argmax(-1), rows.shape[-1] - rows[..., ::-1].argmax(-1)
    scale = np.where(rows.any(-1), last - first, 0) / np.maximum(masks.sum((-2, -1)), 1)
    height, width = masks.shape[-2:]
    densities = []
    for dy, dx in EDGE_DIRECTIONS:
        here = (..., slice(0, height - dy), slice(max(-dx, 0), width - max(dx, 0)))
        there = (..., slice(dy, height), slice(max(dx, 0), width - max(-dx, 0)))
        inside = masks[here] & masks[there]
        step = np.linalg.norm(frames[here + (slice(None),)] - frames[there + (slice(None),)], axis=-1)
        densities.append(((step > EDGE_THRESHOLD) & inside).sum((-2, -1)) * scale)
    return np.stack(densities, -1)


def pattern_class(video: np.ndarray, garment_masks: np.ndarray) -> np.ndarray:
    """str [F]: each frame's garment pattern, one of the world's `PATTERNS`, or NO_PATTERN.

    Read off the two statistics a pattern is made of, so a model is scored on what it drew rather than on its
    colours: too few edges or no second colour is solid; stripes leave one edge direction empty (the one along
    them) while checks and dots cut all four; dots cover a quarter of the garment where checks cover half. A
    garment that is not two flat colours is no pattern at all, so a smear cannot pass for stripes by its edges.
    """
    edges = edge_density(video, garment_masks)
    classes = np.full(len(video), NO_PATTERN, dtype=f"<U{max(map(len, PATTERNS))}")
    for frame, (pixels, mask, density) in enumerate(zip(video, garment_masks, edges)):
        if not mask.any():
            continue
        colours, shares = palette(pixels[mask])
        if np.mean(np.min([_distance(pixels[mask], c) for c in colours], 0) <= PALETTE_FIT_DISTANCE) < MIN_PALETTE_FIT:
            continue
        second = shares.min() if len(shares) == PALETTE_SIZE else 0.0
        if density.sum() < MIN_PATTERN_EDGE_DENSITY or second < MIN_PATTERN_SHARE:
            classes[frame] = SOLID
        elif density.min() < MAX_STRIPE_DIRECTION_RATIO * density.max():
            classes[frame] = STRIPES
        else:
            classes[frame] = DOTS if second < MAX_DOT_SHARE else CHECKS
    return classes


def _pattern_distance(edges: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """|log| ratio of total edge densities (pattern frequency) plus the weighted L1 change of how the edges share
    out over the four directions (stripes versus checks, and stripe orientation). Shares rather than raw
    per-direction densities, because a leaning body tilts the pattern and trades edges between directions."""
    def shares(e):
        return e / np.maximum(e.sum(-1, keepdims=True), MIN_EDGE_DENSITY)
    frequency = np.abs(np.log1p(edges.sum(-1)) - np.log1p(reference.sum(-1)))
    return frequency + DIRECTION_WEIGHT * np.abs(shares(edges) - shares(reference)).sum(-1)


def garment_fidelity(video: np.ndarray, garment_masks: np.ndarray, garment_image: np.ndarray) -> GarmentFidelity:
    """How well each frame's garment region matches the flat lay: its colours, their shares, and its pattern."""
    image_mask = garment_image_mask(garment_image)
    colours, shares = palette(garment_image[image_mask])
    image_edges = edge_density(garment_image[None], image_mask[None])[0]
    distances = np.stack([_distance(video, c) for c in colours], -1)  # [F, H, W, K]
    count = garment_masks.sum((1, 2)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        colour_error = (distances.min(-1) * garment_masks).sum((1, 2)) / count
        nearest = distances.argmin(-1)
        frame_shares = np.stack([((nearest == k) & garment_masks).sum((1, 2)) for k in range(len(colours))], -1)
        proportion_error = 0.5 * np.abs(frame_shares / count[:, None] - shares).sum(-1)
    pattern_error = _pattern_distance(edge_density(video, garment_masks), image_edges)
    empty = count == 0
    colour_error[empty], proportion_error[empty], pattern_error[empty] = np.nan, np.nan, np.nan
    score = np.exp(-colour_error / COLOUR_TOLERANCE - proportion_error / PROPORTION_TOLERANCE
                   - pattern_error / PATTERN_TOLERANCE)
    return GarmentFidelity(colour_error=colour_error, proportion_error=proportion_error,
                           pattern_error=pattern_error, score=score)


def identity_fidelity(video: np.ndarray, masks: dict[str, np.ndarray], person: Person) -> IdentityFidelity:
    """How well face, hair, skin, trousers and background keep the reference person's colours.

    Uses whichever of "face", "hair", "skin", "legs" the masks hold, and the background outside "person".
    """
    height, width = video.shape[1:3]
    targets = {"face": person.skin, "hair": person.hair, "skin": person.skin, "legs": person.trousers}
    parts = {name: (masks[name], _distance(video, colour)) for name, colour in targets.items() if name in masks}
    parts["background"] = (~masks["person"], _distance(video, person.background(height, width)))
    errors = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, (mask, distance) in parts.items():
            errors[name] = (distance * mask).sum((1, 2)) / mask.sum((1, 2))
    stacked = np.stack(list(errors.values()))
    mean_error = np.nansum(stacked, 0) / np.maximum((~np.isnan(stacked)).sum(0), 1)
    return IdentityFidelity(errors=errors, score=np.exp(-mean_error / IDENTITY_TOLERANCE))


def silhouettes(video: np.ndarray, person: Person) -> np.ndarray:
    """bool [F, H, W]: the person, as every pixel that differs from their known background."""
    return _distance(video, person.background(*video.shape[1:3])) > SILHOUETTE_DISTANCE


def estimate_masks(video: np.ndarray, person: Person) -> dict[str, np.ndarray]:
    """Masks of a video of `person` from colour alone: the silhouette, then hair, skin and trousers by their colours;
    the rest of the person is garment. Exact on rendered clips; an estimate for generated ones ("face" is not
    separable from other skin by colour, so it is left out)."""
    person_mask = silhouettes(video, person)
    parts = {name: person_mask & (_distance(video, colour) <= PART_DISTANCE)
             for name, colour in (("hair", person.hair), ("skin", person.skin), ("legs", person.trousers))}
    garment = person_mask & ~(parts["hair"] | parts["skin"] | parts["legs"])
    return {"person": person_mask, "garment": garment, **parts}


def part_areas(masks: dict[str, np.ndarray]) -> np.ndarray:
    """[F, len(PRESENCE_PARTS)] pixel areas of the parts that make the person whole: identity only judges the
    pixels it finds in a part's colour, so it cannot see a part (a head) that is gone; these areas can."""
    return np.stack([masks[part].sum((-2, -1)) for part in PRESENCE_PARTS], -1).astype(np.float64)


def silhouette_change(person_masks: np.ndarray) -> np.ndarray:
    """[F-1] 1 - IoU of consecutive silhouettes: 0 for a still frame, 1 for disjoint ones."""
    previous, current = person_masks[:-1], person_masks[1:]
    union = (previous | current).sum((1, 2))
    return 1 - (previous & current).sum((1, 2)) / np.maximum(union, 1)


def motion_continuity(person_masks: np.ndarray, switch_frames: list[int]) -> np.ndarray:
    """[len(switch_frames)] silhouette change into each switch frame over the median ordinary change around it.

    The ordinary changes are the CONTINUITY_WINDOW transitions on each side, not the whole clip's, because the
    world's motions speed up and slow down within a cycle. ~1 means the motion carries on through the switch; a cut
    or a reset of the motion makes the silhouette jump and the ratio large. A switch frame is the first frame after
    its switch.
    """
    change = silhouette_change(person_masks)
    transitions = [frame - 1 for frame in switch_frames]
    ratios = []
    for transition in transitions:
        window = range(max(transition - CONTINUITY_WINDOW, 0), min(transition + CONTINUITY_WINDOW + 1, len(change)))
        ordinary = [change[i] for i in window if i not in transitions]
        ratios.append(change[transition] / max(float(np.median(ordinary)), MIN_SILHOUETTE_CHANGE))
    return np.array(ratios)


def temporal_smoothness(video: np.ndarray, person_masks: np.ndarray) -> Smoothness:
    """Second differences of the whole frame, and changes of the background, which is static in this world."""
    frames = video.astype(np.float64)
    second = np.abs(frames[2:] - 2 * frames[1:-1] + frames[:-2]).mean((1, 2, 3)) / MAX_RGB
    background = ~person_masks[1:] & ~person_masks[:-1]
    change = np.abs(frames[1:] - frames[:-1]).mean(-1)
    flicker = (change * background).sum((1, 2)) / np.maximum(background.sum((1, 2)), 1) / MAX_RGB
    return Smoothness(second_difference=second, background_flicker=flicker)
