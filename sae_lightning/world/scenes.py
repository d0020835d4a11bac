"""A small world with known answers: scenes of 1-3 coloured shapes, their attribute records and captions.

Every image is drawn from an attribute record (a plain dict, stored as JSON next to the image in the
shards, see docs/format-scenes.md), so each pixel has a known cause: the objects' colour, shape, size and
position, the background kind and an image effect. Captions are composed from the same record with varied
templates; a tiny CLIP trains on them (sae_lightning.world.train_clip). Same rng state, same bytes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter

SCENE_VERSION = 1

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (35, 170, 50),
    "cyan": (30, 205, 225),
    "blue": (35, 70, 225),
    "purple": (140, 50, 195),
    "pink": (250, 110, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
SIZES: tuple[str, ...] = ("small", "large")
COUNTS: tuple[int, ...] = (1, 2, 3)
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noise", "stripes")
EFFECTS: tuple[str, ...] = ("none", "pixelated", "blurred", "old_photo", "chromatic_aberration")
CLASSNAMES: list[str] = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]

COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses", "ring": "rings"}
BACKGROUND_PHRASES = {
    "plain": ("on a plain background", "on a plain backdrop", "against a plain background"),
    "gradient": ("on a gradient background", "on a smooth gradient", "against a gradient background"),
    "noise": ("on a noisy background", "on a grainy noisy backdrop", "against a noisy background"),
    "stripes": ("on a striped background", "on a backdrop of stripes", "against a striped background"),
}
EFFECT_PREFIXES = {
    "none": ("a photo of", "an image of", "a picture of", "a clean photo of"),
    "pixelated": ("a pixelated photo of", "a pixelated image of", "a low resolution pixelated picture of"),
    "blurred": ("a blurry photo of", "a blurred image of", "an out of focus blurry picture of"),
    "old_photo": ("an old sepia photo of", "a vintage sepia image of", "an old faded picture of"),
    "chromatic_aberration": ("a photo with chromatic aberration of", "an image with colour fringes of",
                             "a glitchy chromatic aberration picture of"),
}
# Radii as a fraction of the image side; objects never overlap (their bounding circles keep a gap).
_RADIUS = {"small": (0.1, 0.125), "large": (0.16, 0.2)}
_N_OBJECTS_P = (0.4, 0.3, 0.3)
_SAME_GROUP_P = 0.5  # a multi-object scene repeats one colour and shape ("two red stars") this often
_SUPERSAMPLE = 2
_RING_WIDTH = 0.32   # of the radius: a ring covers radii (1 - width) r .. r
_STAR_INNER = 0.45
_CROSS_ARM = 0.3


def class_index(colour: str, shape: str) -> int:
    """The integer label of a "colour shape" class: index into CLASSNAMES."""
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def _muted(rng: np.random.Generator, low: float = 50, high: float = 205) -> np.ndarray:
    """A greyish colour with a faint tint: the saturated object colours always stand out from it."""
    return rng.uniform(low, high) + rng.uniform(-20, 20, size=3)


def _place(rng: np.random.Generator, radii: list[float]) -> list[tuple[float, float]]:
    """Centres (fractions of the side) for non-overlapping discs of the given radii (rejection sampling)."""
    for _ in range(1000):
        centres: list[tuple[float, float]] = []
        for r in radii:
            for _ in range(200):
                x, y = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
                if all(math.hypot(x - cx, y - cy) > r + radii[j] + 0.03 for j, (cx, cy) in enumerate(centres)):
                    centres.append((float(x), float(y)))
                    break
            else:
                break
        if len(centres) == len(radii):
            return centres
    raise RuntimeError(f"could not place objects of radii {radii}")  # unreachable with the radii above


def sample_scene(rng: np.random.Generator) -> dict[str, Any]:
    """Draw one scene's attribute record (without caption); the main object (the label) comes first.

    Objects are sorted large before small, so the main object is never smaller than another one.
    """
    count = int(rng.choice(COUNTS, p=_N_OBJECTS_P))
    colours, shapes = list(COLOURS), list(SHAPES)
    same = count > 1 and rng.random() < _SAME_GROUP_P
    first = (colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))])
    objects = []
    for i in range(count):
        colour, shape = first if (same or i == 0) else (colours[rng.integers(len(colours))],
                                                         shapes[rng.integers(len(shapes))])
        size = SIZES[rng.integers(len(SIZES))]
        objects.append({"colour": colour, "shape": shape, "size": size,
                        "radius": round(float(rng.uniform(*_RADIUS[size])), 4)})
    objects.sort(key=lambda o: o["size"] != "large")
    centres = _place(rng, [o["radius"] for o in objects])
    for obj, (x, y) in zip(objects, centres, strict=True):
        base = np.array(COLOURS[obj["colour"]])
        obj["x"], obj["y"] = round(x, 4), round(y, 4)
        obj["angle"] = round(float(rng.uniform(0, 360)), 2)
        obj["rgb"] = [int(c) for c in np.clip(base + rng.integers(-15, 16, size=3), 0, 255)]
    main = objects[0]
    return {
        "version": SCENE_VERSION,
        "label": class_index(main["colour"], main["shape"]),
        "classname": f"{main['colour']} {main['shape']}",
        "count": count,
        "background": BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        "effect": EFFECTS[rng.integers(len(EFFECTS))],
        "objects": objects,
        "seed": int(rng.integers(2**31)),  # drives the render's own randomness (background, grain, effect)
    }


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """[size, size, 3] float background of one of BACKGROUNDS."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "plain":
        image = np.broadcast_to(_muted(rng), (size, size, 3)).astype(np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = ((t - t.min()) / max(float(np.ptp(t)), 1e-6))[..., None]
        a = _muted(rng, 30, 110) if rng.random() < 0.5 else _muted(rng, 150, 225)
        b = _muted(rng, 150, 225) if a.mean() < 128 else _muted(rng, 30, 110)
        image = a * (1 - t) + b * t
    elif kind == "noise":
        cell = int(rng.choice([2, 4])) * _SUPERSAMPLE
        coarse = rng.normal(0, 32, size=(-(-size // cell), -(-size // cell), 1))
        image = _muted(rng, 80, 175) + np.kron(coarse, np.ones((cell, cell, 1)))[:size, :size]
    elif kind == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.1, 0.18)
        t = (xx * math.cos(angle) + yy * math.sin(angle)) / period
        on = ((t - np.floor(t)) < 0.5)[..., None]
        image = np.where(on, _muted(rng, 40, 100), _muted(rng, 160, 225))
    else:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {kind!r}")
    grain = rng.normal(0, 4, size=(size, size, 3))
    return np.clip(image + grain, 0, 255)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "cross":
        w = _CROSS_ARM
        local = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
                 (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        polar = [(math.hypot(x, y), math.atan2(y, x)) for x, y in local]
    else:
        corners = {"square": 4, "triangle": 3, "star": 10}[shape]
        radii = [1.0, _STAR_INNER] * 5 if shape == "star" else [1.0] * corners
        polar = [(radii[k], 2 * math.pi * k / corners) for k in range(corners)]
    return [(cx + r * rho * math.cos(phi + angle), cy + r * rho * math.sin(phi + angle)) for rho, phi in polar]


def _draw_object(draw: PIL.ImageDraw.ImageDraw, obj: dict, size: int) -> None:
    r, cx, cy = obj["radius"] * size, obj["x"] * size, obj["y"] * size
    fill = tuple(obj["rgb"])
    box = (cx - r, cy - r, cx + r, cy + r)
    if obj["shape"] == "circle":
        draw.ellipse(box, fill=fill)
    elif obj["shape"] == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(_RING_WIDTH * r)))
    else:
        draw.polygon(_polygon(obj["shape"], cx, cy, r, math.radians(obj["angle"])), fill=fill)


def _sepia(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Old photo: part-way to sepia (hues stay readable), faded contrast and a vignette."""
    matrix = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]])
    toned = 0.4 * (image @ matrix.T) + 0.6 * image
    toned = 0.85 * toned + 0.15 * 128 + np.array([18.0, 6.0, -14.0])
    size = image.shape[0]
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
    vignette = 1 - 0.9 * (xx**2 + yy**2)
    return toned * vignette[..., None] + rng.normal(0, 5, size=image.shape)


def apply_effect(image: PIL.Image.Image, effect: str, rng: np.random.Generator) -> PIL.Image.Image:
    """Apply one of EFFECTS to a final-size image; pixel sizes scale with the image (64 px reference)."""
    size = image.width
    scale = size / 64
    if effect == "none":
        return image
    if effect == "pixelated":
        block = max(2, round(3 * scale))
        small = image.resize((max(1, size // block),) * 2, PIL.Image.Resampling.BOX)
        return small.resize((size, size), PIL.Image.Resampling.NEAREST)
    if effect == "blurred":
        return image.filter(PIL.ImageFilter.GaussianBlur(radius=float(rng.uniform(1.2, 1.8)) * scale))
    array = np.asarray(image, dtype=np.float32)
    if effect == "old_photo":
        out = _sepia(array, rng)
    elif effect == "chromatic_aberration":
        shift = max(2, round(int(rng.choice([2, 3])) * scale))
        dy, dx = (shift, 0) if rng.random() < 0.5 else (0, shift)
        out = array.copy()
        out[..., 0] = np.roll(array[..., 0], (dy, dx), axis=(0, 1))
        out[..., 2] = np.roll(array[..., 2], (-dy, -dx), axis=(0, 1))
    else:
        raise ValueError(f"effect must be one of {EFFECTS}, got {effect!r}")
    return PIL.Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))


def render(record: dict[str, Any], image_size: int = 64) -> PIL.Image.Image:
    """Draw a scene from its attribute record (at 2x, box-downsampled for smooth edges, then the effect)."""
    rng = np.random.default_rng(record["seed"])
    big_size = image_size * _SUPERSAMPLE
    big = PIL.Image.fromarray(_background(rng, record["background"], big_size).round().astype(np.uint8))
    draw = PIL.ImageDraw.Draw(big)
    for obj in reversed(record["objects"]):  # main object last, on top (objects never overlap anyway)
        _draw_object(draw, obj, big_size)
    image = big.resize((image_size, image_size), PIL.Image.Resampling.BOX)
    return apply_effect(image, record["effect"], rng)


def _object_groups(objects: list[dict]) -> list[tuple[int, str, str, str | None]]:
    """(count, colour, shape, size or None if mixed) per distinct colour+shape, in record order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for obj in objects:
        groups.setdefault((obj["colour"], obj["shape"]), []).append(obj)
    out = []
    for (colour, shape), members in groups.items():
        sizes = {m["size"] for m in members}
        out.append((len(members), colour, shape, sizes.pop() if len(sizes) == 1 else None))
    return out


def _noun_phrase(n: int, colour: str, shape: str, size: str | None, with_size: bool) -> str:
    adjective = f"{size} " if with_size and size else ""
    if n == 1:
        return f"a {adjective}{colour} {shape}"
    return f"{COUNT_WORDS[n]} {adjective}{colour} {PLURALS[shape]}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(record: dict[str, Any], rng: np.random.Generator) -> str:
    """A caption composed from the record with varied templates.

    e.g. "a pixelated photo of two red stars on a striped background",
    "on a plain backdrop, a blurry photo of three shapes: a large blue ring, a green cross and a pink star".
    """
    with_size = rng.random() < 0.5
    groups = _object_groups(record["objects"])
    things = _join([_noun_phrase(*g, with_size=with_size) for g in groups])
    if len(groups) > 1 and rng.random() < 0.6:
        things = f"{COUNT_WORDS[record['count']]} shapes: {things}"
    prefix = EFFECT_PREFIXES[record["effect"]][rng.integers(len(EFFECT_PREFIXES[record["effect"]]))]
    background = BACKGROUND_PHRASES[record["background"]][rng.integers(3)]
    if rng.random() < 0.25:
        return f"{background}, {prefix} {things}"
    return f"{prefix} {things} {background}"


def make_scene(rng: np.random.Generator, image_size: int = 64) -> tuple[PIL.Image.Image, dict[str, Any]]:
    """One (image, record) pair; the record carries its caption under "caption"."""
    record = sample_scene(rng)
    record["caption"] = caption(record, rng)
    record["image_size"] = image_size
    return render(record, image_size), record
