"""Generated demo shards: one coloured shape per image on a varied background, label = (colour, shape).

The demo must run offline, so its data is drawn here. The classes are easy for a CLIP model to separate
and the backgrounds vary, so an SAE trained on the demo has something to find. Same seed, same bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import webdataset as wds

from sae_lightning.data.shards import CLASSNAMES_FILE

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 210, 35),
    "purple": (135, 55, 185),
    "orange": (240, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
DEMO_CLASSNAMES: list[str] = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]

MARKER_FILE = "_demo_complete.json"
_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_SUPERSAMPLE = 2
_MAX_DEMO_SHARDS = 8
_MAX_DEMO_SHARD_SIZE = 256


def _split_rng(seed: int, split: str) -> np.random.Generator:
    """Independent stream per (seed, split): train and val never share images."""
    return np.random.default_rng([seed, zlib.crc32(split.encode())])


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A greyish colour with a faint tint: saturated shape colours always stand out from it."""
    return rng.uniform(30, 225) + rng.uniform(-25, 25, size=3)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = rng.integers(3)
    if kind == 0:
        image = np.broadcast_to(_muted_colour(rng), (size, size, 3)).astype(np.float32)
    elif kind == 1:
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:size, 0:size]
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = ((t - t.min()) / max(np.ptp(t), 1e-6))[..., None]
        image = _muted_colour(rng) * (1 - t) + _muted_colour(rng) * t
    else:
        cell = int(rng.choice([1, 2, 4, 8]))
        coarse = rng.normal(0, rng.uniform(10, 40), size=(-(-size // cell), -(-size // cell), 1))
        image = _muted_colour(rng) + np.kron(coarse, np.ones((cell, cell, 1)))[:size, :size]
    grain = rng.normal(0, rng.uniform(0, 12), size=(size, size, 3))
    return np.clip(image + grain, 0, 255).astype(np.uint8)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "cross":
        w = 0.3
        local = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
                 (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        polar = [(math.hypot(x, y), math.atan2(y, x)) for x, y in local]
    else:
        corners = {"square": 4, "triangle": 3, "star": 10}[shape]
        radii = [1.0, 0.45] * 5 if shape == "star" else [1.0] * corners
        polar = [(radii[k], 2 * math.pi * k / corners) for k in range(corners)]
    return [
        (cx + r * rho * math.cos(phi + angle), cy + r * rho * math.sin(phi + angle))
        for rho, phi in polar
    ]


def _draw_shape(image: PIL.Image.Image, rng: np.random.Generator, colour: str, shape: str) -> None:
    size = image.width
    r = rng.uniform(0.16, 0.34) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    fill = tuple(int(c) for c in np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 21, size=3), 0, 255))
    draw = PIL.ImageDraw.Draw(image)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(0.32 * r)))
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=fill)


def demo_image(rng: np.random.Generator, label: int, image_size: int) -> PIL.Image.Image:
    """Draw one demo image of class `label` (drawn at 2x and downsampled for smooth edges)."""
    colour, shape = DEMO_CLASSNAMES[label].split(" ")
    big = PIL.Image.fromarray(_background(rng, image_size * _SUPERSAMPLE))
    _draw_shape(big, rng, colour, shape)
    return big.resize((image_size, image_size), PIL.Image.Resampling.BOX)


def _encode(image: PIL.Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=_FORMATS[fmt], quality=90)
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_demo_shards(
    out_dir: str | Path,
    n_images: int,
    *,
    split: str = "train",
    image_size: int = 64,
    shard_size: int = 256,
    seed: int = 0,
    fmt: str = "jpg",
) -> list[str]:
    """Write `out_dir/{split}-%06d.tar` demo shards and `classnames.txt`; return the shard paths.

    Shards are written in a temporary directory and moved in at the end, replacing older shards of the
    split, so an interrupted run never leaves a mix of old and new shards.
    """
    if n_images < 1 or shard_size < 1:
        raise ValueError(f"need n_images >= 1 and shard_size >= 1, got {n_images} and {shard_size}")
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {sorted(_FORMATS)}, got {fmt!r}")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = _split_rng(seed, split)
    labels = rng.integers(len(DEMO_CLASSNAMES), size=n_images)
    with tempfile.TemporaryDirectory(prefix=f".{split}-", dir=out_dir) as tmp:
        written: list[str] = []
        pattern = f"{tmp}/{split}-%06d.tar"
        with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, post=written.append) as sink:
            for i, label in enumerate(labels):
                image = demo_image(rng, int(label), image_size)
                sink.write({"__key__": f"{split}_{i:08d}", fmt: _encode(image, fmt), "cls": int(label)})
        for stale in out_dir.glob(f"{split}-*.tar"):
            stale.unlink()
        shards = [str(out_dir / Path(name).name) for name in written]
        for name, final in zip(written, shards, strict=True):
            os.replace(name, final)
    _write_text(out_dir / CLASSNAMES_FILE, "\n".join(DEMO_CLASSNAMES) + "\n")
    return shards


def _demo_shard_size(n_images: int) -> int:
    """Up to 8 shards for small sets (so DataLoader workers all get one), 256 images per shard beyond."""
    return max(1, min(_MAX_DEMO_SHARD_SIZE, -(-n_images // _MAX_DEMO_SHARDS)))


def _brace_pattern(root: Path, split: str, n_shards: int) -> str:
    if n_shards == 1:
        return str(root / f"{split}-000000.tar")
    return str(root / f"{split}-{{000000..{n_shards - 1:06d}}}.tar")


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive file lock, so parallel jobs (multirun) don't generate the same shards twice."""
    try:
        import fcntl
    except ImportError:  # no fcntl on Windows: generation there is single-process anyway
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(marker: dict | None, params: dict, root: Path) -> bool:
    if marker is None or marker.get("params") != params:
        return False
    return all((root / name).is_file() for split in ("train", "val") for name in marker.get(split, []))


def ensure_demo_shards(
    root: str | Path, n_train: int, n_val: int, image_size: int = 64, seed: int = 0
) -> tuple[str, str]:
    """Generate `root/train-*.tar` and `root/val-*.tar` once; return (train, val) brace patterns.

    A json marker written last records the parameters: a complete set with the same parameters is reused,
    anything else (missing, interrupted, different parameters) is regenerated.
    """
    root = Path(root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    params = {"n_train": n_train, "n_val": n_val, "image_size": image_size, "seed": seed, "version": 1}
    with _exclusive(root / ".demo.lock"):
        marker = _read_marker(root)
        if not _is_complete(marker, params, root):
            log.info("generating demo shards in %s (%d train, %d val images, %d px)", root, n_train, n_val,
                     image_size)
            (root / MARKER_FILE).unlink(missing_ok=True)
            marker = {"params": params}
            for split, n in (("train", n_train), ("val", n_val)):
                shards = write_demo_shards(root, n, split=split, image_size=image_size,
                                           shard_size=_demo_shard_size(n), seed=seed)
                marker[split] = [Path(s).name for s in shards]
            _write_text(root / MARKER_FILE, json.dumps(marker, indent=2) + "\n")
        else:
            log.info("using existing demo shards in %s", root)
    train, val = (_brace_pattern(root, split, len(marker[split])) for split in ("train", "val"))
    return train, val


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the offline demo image shards (coloured shapes).")
    parser.add_argument("--out", default="data/demo", help="output directory")
    parser.add_argument("--n-train", type=int, default=4096)
    parser.add_argument("--n-val", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train, val = ensure_demo_shards(args.out, args.n_train, args.n_val, args.image_size, args.seed)
    # Hydra's override grammar reads unquoted braces as a dict: print the quoted, copy-pasteable form.
    print(f"""'data.train_shards="{train}"' 'data.val_shards="{val}"'""")


if __name__ == "__main__":
    main()
