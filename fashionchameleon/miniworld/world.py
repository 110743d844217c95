"""A procedural wardrobe world (issue 7): people, garments, motions and the paper's training triplets.

Everything is drawn from a numpy Generator, so a seed fixes a clip bit for bit, and frames are painted with hard
edges from a label map, so every mask and every colour is exact: `metrics.py` can then score a video against the
truth instead of against a learned judge. Screen coordinates are in frame heights (x right from the frame centre,
y down); garment patterns live in body units (1 = the person's torso length, u right, v up from the hem), so a
pattern moves, leans and turns with the body instead of sliding over it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Colour = tuple[int, int, int]

# Label map values, painted back to front; `render` turns them into colours and masks.
BACKGROUND, HAIR, LEGS, GARMENT_BASE, GARMENT_PATTERN, SKIN, FACE = range(7)

PATTERNS = ("solid", "stripes", "checks", "dots")
HAIR_STYLES = ("short", "long", "bun", "bald")
MOTION_KINDS = ("sway", "arm_swing", "walk", "turn", "wave")
PATTERN_ORIENTATIONS = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)

WHITE = (255, 255, 255)
# Colour separations (RGB Euclidean) that keep masks recoverable from colour alone (`metrics.estimate_masks`).
MIN_COLOUR_DISTANCE = 60.0  # between any two of a person's colours, the background, and a garment's colours
MIN_WHITE_DISTANCE = 60.0  # garment colours vs the flat lay's white, so the garment image segments itself
MIN_PATTERN_CONTRAST = 80.0  # base vs pattern colour, so pattern edges are unambiguous
MAX_DRAWS = 1000  # rejection-sampling attempts before giving up (never reached in practice)

# People. Skin tones are interpolated between neighbouring anchors; hair colours are jittered anchors.
SKIN_TONES = np.array([[255, 224, 196], [241, 194, 150], [224, 172, 105], [198, 134, 66], [141, 85, 36],
                       [92, 51, 23]], dtype=np.float64)
HAIR_COLOURS = np.array([[20, 16, 14], [70, 45, 30], [130, 85, 45], [215, 180, 100], [165, 60, 30],
                         [200, 200, 205]], dtype=np.float64)
HAIR_JITTER = 15
TROUSER_RANGE = (15, 150)  # per channel: darkish trousers
BACKGROUND_RANGE = (110, 235)  # per channel: light, plain studio backgrounds
BACKGROUND_GRADIENT = 30  # max per-channel change from the top row to the bottom row
HEIGHT_RANGE = (0.74, 0.88)  # head top to feet, frame heights
X_OFFSET_RANGE = (-0.08, 0.08)  # body centre from the frame centre, frame heights
HEAD_RATIO_RANGE = (0.065, 0.08)  # head radius / person height
TORSO_RATIO_RANGE = (0.30, 0.34)  # torso length / person height
NECK_RATIO = 0.03  # neck length / person height
SHOULDER_WIDTH_RANGE = (0.75, 0.95)  # torso lengths
HIP_WIDTH_RANGE = (0.55, 0.7)  # torso lengths
ARM_LENGTH_RANGE = (0.95, 1.15)  # upper arm + forearm, torso lengths
LIMB_RADIUS_RANGE = (0.09, 0.12)  # torso lengths
UPPER_ARM_FRACTION = 0.5  # of the arm length
THIGH_FRACTION = 0.5  # of the leg length
LEG_RADIUS_FACTOR = 1.25  # legs are thicker than arms
LEG_SPREAD = 0.06  # rad, legs slightly apart
FEET_Y = 0.96  # frame heights from the top
NECK_RADIUS_FACTOR = 0.45  # of the head radius
HAIRLINE = {"short": 0.2, "long": 0.2, "bun": 0.4}  # hair covers the head above this height (head radii)
HAIR_OVERHANG = 1.1  # the hair cap is this much wider than the head
BUN_RADIUS = 0.45  # head radii
LONG_HAIR_LENGTH = 0.45  # below the neck, torso lengths
LONG_HAIR_HALF_WIDTH = 1.05  # head radii

# Garments. Sizes in torso lengths; the flat lay uses the same units so its pattern matches the worn one.
PATTERN_SCALE_RANGE = (0.2, 0.4)  # pattern period
STRIPE_DUTY = 0.5  # fraction of a stripe period in the pattern colour
DOT_RADIUS = 0.28  # fraction of the period
SLEEVE_LENGTH = 0.3  # along the upper arm from the shoulder joint
FLAT_TORSO_FRACTION = 0.5  # flat lay torso length / the image's shorter side
FLAT_HEM_HALF = 0.36  # flat lay half-width at the hem
FLAT_SHOULDER_HALF = 0.44  # flat lay half-width at the shoulders
FLAT_NECK_RADIUS = 0.13  # collar cut-out
FLAT_SLEEVE_ANGLE = 1.05  # rad from hanging straight down
FLAT_SLEEVE_HALF_WIDTH = 0.13

# Motion. Frequencies are per frame so a motion continues identically however a clip is cut into chunks.
FREQUENCY_RANGE = (1 / 30, 1 / 12)  # cycles per frame
IDLE_SWAY = (0.0, 0.04)  # rad: every motion breathes a little
IDLE_ARM_RAISE = (0.12, 0.3)  # rad from hanging down
IDLE_ARM_SWING = (0.0, 0.08)  # rad
SWAY_RANGE = (0.08, 0.16)  # rad
DRIFT_RANGE = (0.02, 0.05)  # frame heights
ARM_SWING_RANGE = (0.35, 0.8)  # rad
ELBOW_RANGE = (0.2, 0.9)  # rad
STEP_RANGE = (0.5, 0.9)  # rad of knee lift
BOB_RANGE = (0.005, 0.015)  # frame heights
TURN_RANGE = (0.4, 0.9)  # rad of yaw
WAVE_RAISE = (2.0, 2.5)  # rad: the waving arm is up
WAVE_SWING = (0.25, 0.45)  # rad
EPS = 1e-9


def _colour(values) -> Colour:
    return tuple(int(c) for c in np.clip(np.rint(values), 0, 255))


def _segment_distance(colour: Colour, segment: tuple[Colour, Colour]) -> float:
    """RGB distance from `colour` to the colour segment (a gradient; a point when both ends match)."""
    c, a, b = (np.asarray(x, dtype=np.float64) for x in (colour, *segment))
    ab = b - a
    t = np.clip(np.dot(c - a, ab) / max(float(np.dot(ab, ab)), EPS), 0.0, 1.0)
    return float(np.linalg.norm(c - a - t * ab))


def _far_from(colours, segments, distance: float) -> bool:
    return all(_segment_distance(c, s) >= distance for c in colours for s in segments)


@dataclass(frozen=True)
class Person:
    """Identity: colours, hair style, body proportions and a plain gradient background."""

    skin: Colour
    hair: Colour
    hair_style: str
    trousers: Colour
    background_top: Colour
    background_bottom: Colour
    height: float  # head top to feet, frame heights
    x_offset: float  # body centre from the frame centre, frame heights
    head_ratio: float  # head radius / height
    torso_ratio: float  # torso length / height
    shoulder_width: float  # torso lengths
    hip_width: float  # torso lengths
    arm_length: float  # torso lengths
    limb_radius: float  # torso lengths

    def colour_segments(self) -> list[tuple[Colour, Colour]]:
        """The person's colours as segments (the background is a gradient) for colour-separation checks."""
        return [(self.skin, self.skin), (self.hair, self.hair), (self.trousers, self.trousers),
                (self.background_top, self.background_bottom)]

    def background(self, height: int, width: int) -> np.ndarray:
        """uint8 [H, W, 3]: the vertical gradient behind the person."""
        t = ((np.arange(height) + 0.5) / height)[:, None]
        rows = (1 - t) * np.asarray(self.background_top, np.float64) + t * np.asarray(self.background_bottom)
        return np.broadcast_to(np.rint(rows).astype(np.uint8)[:, None, :], (height, width, 3)).copy()


@dataclass(frozen=True)
class Garment:
    """A top: base colour plus a pattern (in body units) in a second colour."""

    base: Colour
    pattern: str
    pattern_colour: Colour
    scale: float  # pattern period, torso lengths
    orientation: float  # rad

    @property
    def colours(self) -> tuple[Colour, ...]:
        """The colours that actually appear (a solid garment shows only its base)."""
        return (self.base,) if self.pattern == "solid" else (self.base, self.pattern_colour)

    def pattern_mask(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Where body coordinates (u, v) show the pattern colour rather than the base colour."""
        cos, sin = np.cos(self.orientation), np.sin(self.orientation)
        a, b = (u * cos + v * sin) / self.scale, (v * cos - u * sin) / self.scale
        if self.pattern == "solid":
            return np.zeros(np.broadcast(a, b).shape, dtype=bool)
        if self.pattern == "stripes":
            return a - np.floor(a) < STRIPE_DUTY
        if self.pattern == "checks":
            return (np.floor(a) + np.floor(b)) % 2 == 0
        if self.pattern == "dots":
            return (a - np.floor(a) - 0.5) ** 2 + (b - np.floor(b) - 0.5) ** 2 < DOT_RADIUS ** 2
        raise ValueError(f"unknown pattern {self.pattern!r}; expected one of {PATTERNS}")

    def flat_lay(self, size: int | tuple[int, int]) -> np.ndarray:
        """uint8 [H, W, 3]: the tee laid flat on white, centred, like a product shot; `size` is a side or (H, W)."""
        height, width = (size, size) if isinstance(size, int) else size
        torso_px = FLAT_TORSO_FRACTION * min(height, width)
        u = ((np.arange(width) + 0.5 - width / 2) / torso_px)[None, :]
        v = ((height / 2 + torso_px / 2 - np.arange(height) - 0.5) / torso_px)[:, None]
        half = FLAT_HEM_HALF + (FLAT_SHOULDER_HALF - FLAT_HEM_HALF) * v
        torso = (v >= 0) & (v <= 1) & (np.abs(u) <= half) & (u ** 2 + (v - 1) ** 2 > FLAT_NECK_RADIUS ** 2)
        garment = torso.copy()
        pattern = self.pattern_mask(u, v) & torso
        for side in (-1, 1):
            root = (side * (FLAT_SHOULDER_HALF - FLAT_SLEEVE_HALF_WIDTH), 1 - FLAT_SLEEVE_HALF_WIDTH)
            direction = (side * np.sin(FLAT_SLEEVE_ANGLE), -np.cos(FLAT_SLEEVE_ANGLE))
            s, t = _along_across(u - root[0], v - root[1], direction)
            sleeve = (s >= 0) & (s <= SLEEVE_LENGTH) & (np.abs(t) <= FLAT_SLEEVE_HALF_WIDTH) & ~torso
            garment |= sleeve
            pattern |= sleeve & self.pattern_mask(*_sleeve_coords(s, t, side))
        image = np.empty((height, width, 3), dtype=np.uint8)
        image[:] = WHITE
        image[garment & ~pattern] = self.base
        image[garment & pattern] = self.pattern_colour
        return image


@dataclass(frozen=True)
class Motion:
    """Smooth periodic articulation: every joint angle is a sinusoid (or its square) of one shared phase."""

    kind: str
    frequency: float  # cycles per frame
    phase: float  # rad
    sway: float  # torso lean amplitude, rad
    drift: float  # horizontal hip sway amplitude, frame heights
    arm_raise: tuple[float, float]  # mean angle of (left, right) arm from hanging down, rad
    arm_swing: tuple[float, float]  # amplitude of each arm's angle, rad
    arm_lag: float  # phase of the right arm behind the left, rad
    elbow: float  # elbow bend amplitude, rad
    step: float  # knee lift of walking in place, rad
    bob: float  # hip dip while stepping, frame heights
    turn: float  # yaw amplitude, rad

    def pose(self, t: np.ndarray) -> dict[str, np.ndarray]:
        """Joint parameters at (possibly fractional) frame times `t`."""
        phi = 2 * np.pi * self.frequency * np.asarray(t, dtype=np.float64) + self.phase
        sin = np.sin(phi)
        return {
            "lean": self.sway * sin,
            "drift": self.drift * np.sin(phi + np.pi / 2),
            "yaw": self.turn * sin,
            "arm_left": self.arm_raise[0] + self.arm_swing[0] * sin,
            "arm_right": self.arm_raise[1] + self.arm_swing[1] * np.sin(phi + self.arm_lag),
            "elbow_left": self.elbow * (1 + sin) / 2,
            "elbow_right": self.elbow * (1 + np.sin(phi + self.arm_lag)) / 2,
            "lift_left": self.step * np.maximum(sin, 0) ** 2,
            "lift_right": self.step * np.maximum(-sin, 0) ** 2,
            "bob": self.bob * sin ** 2,
        }


@dataclass
class Triplet:
    """One training sample as the paper builds it: P in garment A, P's first frame in garment B, A's flat lay."""

    video: np.ndarray  # uint8 [F, H, W, 3]: person P wearing garment A
    reference: np.ndarray  # uint8 [H, W, 3]: P's first frame re-dressed in B (the deliberate mismatch)
    garment_image: np.ndarray  # uint8 [H, W, 3]: A laid flat
    masks: dict[str, np.ndarray]  # bool [F, H, W] per region of `video`
    person: Person
    garment: Garment  # A
    reference_garment: Garment  # B
    motion: Motion


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds))


def sample_person(rng: np.random.Generator) -> Person:
    """A person whose skin, hair, trousers and background are pairwise separable by colour."""
    for _ in range(MAX_DRAWS):
        tone = rng.uniform(0, len(SKIN_TONES) - 1)
        low = int(tone)
        skin = _colour(SKIN_TONES[low] + (tone - low) * (SKIN_TONES[min(low + 1, len(SKIN_TONES) - 1)]
                                                          - SKIN_TONES[low]))
        hair = _colour(HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] + rng.integers(-HAIR_JITTER, HAIR_JITTER + 1, 3))
        trousers = _colour(rng.integers(TROUSER_RANGE[0], TROUSER_RANGE[1] + 1, 3))
        top = rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1, 3)
        bottom = _colour(top + rng.integers(-BACKGROUND_GRADIENT, BACKGROUND_GRADIENT + 1, 3))
        points = [skin, hair, trousers]
        segments = [(_colour(top), bottom)]
        separable = _far_from(points, segments, MIN_COLOUR_DISTANCE) and all(
            _segment_distance(a, (b, b)) >= MIN_COLOUR_DISTANCE for i, a in enumerate(points) for b in points[:i])
        if separable:
            return Person(
                skin=skin, hair=hair, hair_style=HAIR_STYLES[rng.integers(len(HAIR_STYLES))], trousers=trousers,
                background_top=_colour(top), background_bottom=bottom, height=_uniform(rng, HEIGHT_RANGE),
                x_offset=_uniform(rng, X_OFFSET_RANGE), head_ratio=_uniform(rng, HEAD_RATIO_RANGE),
                torso_ratio=_uniform(rng, TORSO_RATIO_RANGE), shoulder_width=_uniform(rng, SHOULDER_WIDTH_RANGE),
                hip_width=_uniform(rng, HIP_WIDTH_RANGE), arm_length=_uniform(rng, ARM_LENGTH_RANGE),
                limb_radius=_uniform(rng, LIMB_RADIUS_RANGE))
    raise RuntimeError(f"no separable person in {MAX_DRAWS} draws")


def sample_garment(rng: np.random.Generator, avoid: list[tuple[Colour, Colour]] = ()) -> Garment:
    """A garment whose colours are far from white, from each other and from every colour segment in `avoid`."""
    for _ in range(MAX_DRAWS):
        garment = Garment(base=_colour(rng.integers(0, 256, 3)), pattern=PATTERNS[rng.integers(len(PATTERNS))],
                          pattern_colour=_colour(rng.integers(0, 256, 3)), scale=_uniform(rng, PATTERN_SCALE_RANGE),
                          orientation=float(PATTERN_ORIENTATIONS[rng.integers(len(PATTERN_ORIENTATIONS))]))
        if (_far_from(garment.colours, [(WHITE, WHITE)], MIN_WHITE_DISTANCE)
                and _segment_distance(garment.base, (garment.pattern_colour,) * 2) >= MIN_PATTERN_CONTRAST
                and _far_from(garment.colours, list(avoid), MIN_COLOUR_DISTANCE)):
            return garment
    raise RuntimeError(f"no garment clear of {len(avoid)} colours in {MAX_DRAWS} draws")


def sample_motion(rng: np.random.Generator) -> Motion:
    """A motion of a random kind; every kind keeps a little idle sway and arm movement."""
    kind = MOTION_KINDS[rng.integers(len(MOTION_KINDS))]
    params = dict(kind=kind, frequency=_uniform(rng, FREQUENCY_RANGE), phase=float(rng.uniform(0, 2 * np.pi)),
                  sway=_uniform(rng, IDLE_SWAY), drift=0.0,
                  arm_raise=(_uniform(rng, IDLE_ARM_RAISE), _uniform(rng, IDLE_ARM_RAISE)),
                  arm_swing=(_uniform(rng, IDLE_ARM_SWING), _uniform(rng, IDLE_ARM_SWING)), arm_lag=np.pi,
                  elbow=0.0, step=0.0, bob=0.0, turn=0.0)
    if kind == "sway":
        params.update(sway=_uniform(rng, SWAY_RANGE), drift=_uniform(rng, DRIFT_RANGE))
    elif kind == "arm_swing":
        swing = _uniform(rng, ARM_SWING_RANGE)  # raised by the swing so the arms never cross the torso
        params.update(arm_raise=tuple(r + swing for r in params["arm_raise"]), arm_swing=(swing, swing),
                      arm_lag=float(rng.choice([0.0, np.pi])), elbow=_uniform(rng, ELBOW_RANGE))
    elif kind == "walk":
        params.update(step=_uniform(rng, STEP_RANGE), bob=_uniform(rng, BOB_RANGE),
                      arm_swing=(_uniform(rng, IDLE_ARM_SWING),) * 2)
    elif kind == "turn":
        params.update(turn=_uniform(rng, TURN_RANGE))
    elif kind == "wave":
        side = int(rng.integers(2))
        raise_, swing = list(params["arm_raise"]), list(params["arm_swing"])
        raise_[side], swing[side] = _uniform(rng, WAVE_RAISE), _uniform(rng, WAVE_SWING)
        params.update(arm_raise=tuple(raise_), arm_swing=tuple(swing), elbow=_uniform(rng, ELBOW_RANGE))
    return Motion(**params)


def _along_across(du, dv, direction):
    """Components of an offset along a unit direction and across it (the direction turned +90 degrees)."""
    return du * direction[0] + dv * direction[1], dv * direction[0] - du * direction[1]


def _sleeve_coords(s, t, side):
    """Body coordinates of a sleeve point `s` along and `t` across the arm, so the sleeve pattern rides the arm."""
    return side * (FLAT_SHOULDER_HALF + s), 1 - FLAT_SLEEVE_HALF_WIDTH + t


def _capsule(px, py, a, b, radius):
    """Pixels within `radius` of the segment a-b (points as (x, y) arrays broadcasting against px, py)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    t = np.clip(((px - a[0]) * dx + (py - a[1]) * dy) / (dx * dx + dy * dy + EPS), 0, 1)
    ex, ey = px - a[0] - t * dx, py - a[1] - t * dy
    return ex * ex + ey * ey <= radius * radius


def _label_map(person: Person, garment: Garment, motion: Motion, t: np.ndarray, height: int,
               width: int) -> np.ndarray:
    """uint8 [F, H, W] labels for the frames at times `t`, painted back to front."""
    pose = {k: v[:, None, None] for k, v in motion.pose(t).items()}
    py = ((np.arange(height) + 0.5) / height)[None, :, None]
    px = ((np.arange(width) + 0.5 - width / 2) / height)[None, None, :]
    labels = np.zeros((len(t), height, width), dtype=np.uint8)

    def paint(region, label):
        labels[region] = label

    def paint_garment(region, u, v):
        labels[region] = np.where(garment.pattern_mask(u, v), GARMENT_PATTERN, GARMENT_BASE)[region]

    head_r = person.head_ratio * person.height
    torso = person.torso_ratio * person.height
    neck = NECK_RATIO * person.height
    leg = person.height - 2 * head_r - neck - torso
    limb_r = person.limb_radius * torso
    lean, squash = pose["lean"], np.cos(pose["yaw"])
    up, right = (np.sin(lean), -np.cos(lean)), (np.cos(lean), np.sin(lean))
    hip = (person.x_offset + pose["drift"], FEET_Y - leg + pose["bob"])
    neck_base = (hip[0] + torso * up[0], hip[1] + torso * up[1])
    head = (neck_base[0] + (neck + head_r) * up[0], neck_base[1] + (neck + head_r) * up[1])

    def body(x, y, origin):
        """Body-unit coordinates (right, up) of screen points relative to `origin`."""
        ox, oy = x - origin[0], y - origin[1]
        return (ox * right[0] + oy * right[1]) / torso, (ox * up[0] + oy * up[1]) / torso

    if person.hair_style == "long":
        length = neck + head_r + LONG_HAIR_LENGTH * torso
        paint(_capsule(px, py, head, (head[0] - length * up[0], head[1] - length * up[1]),
                       LONG_HAIR_HALF_WIDTH * head_r), HAIR)
    for side, lift in ((-1, pose["lift_left"]), (1, pose["lift_right"])):
        joint = (hip[0] + side * (person.hip_width / 2 * torso * squash - limb_r * LEG_RADIUS_FACTOR), hip[1])
        thigh = THIGH_FRACTION * leg
        knee = (joint[0] + side * np.sin(LEG_SPREAD) * thigh * np.cos(lift),
                joint[1] + np.cos(LEG_SPREAD) * thigh * np.cos(lift))
        foot = (knee[0] + side * np.sin(LEG_SPREAD) * (leg - thigh), knee[1] + np.cos(LEG_SPREAD) * (leg - thigh))
        paint(_capsule(px, py, joint, knee, limb_r * LEG_RADIUS_FACTOR)
              | _capsule(px, py, knee, foot, limb_r * LEG_RADIUS_FACTOR), LEGS)
    u, v = body(px, py, hip)
    half = (person.hip_width + (person.shoulder_width - person.hip_width) * v) / 2 * squash
    paint_garment((v >= 0) & (v <= 1) & (np.abs(u) <= half), u / squash, v)
    paint(_capsule(px, py, neck_base, head, NECK_RADIUS_FACTOR * head_r), SKIN)
    upper, fore = UPPER_ARM_FRACTION * person.arm_length, (1 - UPPER_ARM_FRACTION) * person.arm_length
    for side, angle, bend in ((-1, pose["arm_left"], pose["elbow_left"]), (1, pose["arm_right"], pose["elbow_right"])):
        root_u = side * (person.shoulder_width / 2 * squash - person.limb_radius)
        root = (neck_base[0] + torso * (root_u * right[0] - person.limb_radius * up[0]),
                neck_base[1] + torso * (root_u * right[1] - person.limb_radius * up[1]))
        direction = (side * np.sin(angle), -np.cos(angle))  # body units; hanging down is -v
        elbow_u, elbow_v = direction[0] * upper, direction[1] * upper
        hand_u = elbow_u + side * np.sin(angle + bend) * fore
        hand_v = elbow_v - np.cos(angle + bend) * fore

        def screen(bu, bv, root=root):
            return (root[0] + torso * (bu * right[0] + bv * up[0]), root[1] + torso * (bu * right[1] + bv * up[1]))

        paint(_capsule(px, py, screen(elbow_u, elbow_v), screen(hand_u, hand_v), limb_r), SKIN)
        s, across = _along_across(*body(px, py, root), direction)
        arm = (s - np.clip(s, 0, upper)) ** 2 + across ** 2 <= person.limb_radius ** 2
        paint(arm & (s > SLEEVE_LENGTH), SKIN)
        paint_garment(arm & (s <= SLEEVE_LENGTH), *_sleeve_coords(s, across, side))
    hu, hv = body(px, py, head)
    hu, hv = hu * torso / head_r, hv * torso / head_r  # head radii
    paint(hu ** 2 + hv ** 2 <= 1, FACE)
    if person.hair_style in HAIRLINE:
        paint((hu ** 2 + hv ** 2 <= HAIR_OVERHANG ** 2) & (hv >= HAIRLINE[person.hair_style]), HAIR)
    if person.hair_style == "bun":
        paint(hu ** 2 + (hv - 1) ** 2 <= BUN_RADIUS ** 2, HAIR)
    return labels


def masks_from_labels(labels: np.ndarray) -> dict[str, np.ndarray]:
    """bool masks per region; "garment" is every visible garment pixel (torso and sleeves)."""
    return {"person": labels != BACKGROUND, "garment": (labels == GARMENT_BASE) | (labels == GARMENT_PATTERN),
            "face": labels == FACE, "hair": labels == HAIR, "skin": (labels == SKIN) | (labels == FACE),
            "legs": labels == LEGS}


def render(person: Person, garment: Garment, motion: Motion, frames: int, height: int, width: int, *,
           start: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(uint8 [F, H, W, 3] video, bool [F, H, W] masks) of frames start .. start + frames - 1 of the motion.

    `start` lets a clip continue where another stopped (streaming chunks, a garment switch mid-motion).
    """
    labels = _label_map(person, garment, motion, np.arange(start, start + frames, dtype=np.float64), height, width)
    table = np.array([(0, 0, 0), person.hair, person.trousers, garment.base, garment.pattern_colour, person.skin,
                      person.skin], dtype=np.uint8)
    video = np.where((labels == BACKGROUND)[..., None], person.background(height, width)[None], table[labels])
    return video, masks_from_labels(labels)


def make_triplet(rng: np.random.Generator | int, frames: int, height: int, width: int) -> Triplet:
    """A paper-style triplet; `rng` is a Generator or a seed. B's colours stay clear of A's, so B visibly differs."""
    rng = np.random.default_rng(rng)
    person = sample_person(rng)
    garment = sample_garment(rng, avoid=person.colour_segments())
    reference_garment = sample_garment(rng, avoid=person.colour_segments() + [(c, c) for c in garment.colours])
    motion = sample_motion(rng)
    video, masks = render(person, garment, motion, frames, height, width)
    reference, _ = render(person, reference_garment, motion, 1, height, width)
    return Triplet(video=video, reference=reference[0], garment_image=garment.flat_lay((height, width)), masks=masks,
                   person=person, garment=garment, reference_garment=reference_garment, motion=motion)
