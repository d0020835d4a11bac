"""Generated demo shards: scenes of 1-3 coloured shapes (sae_lightning.world.scenes) with known attributes.

The demo must run offline, so its data is drawn here. Each sample holds the image, its label (the main
object's "colour shape"), a caption and the full attribute record (docs/format-scenes.md), so everything an
SAE finds can be checked against the truth. Same seed, same bytes; train and val come from independent
random streams.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import webdataset as wds

from sae_lightning.data.shards import CLASSNAMES_FILE, expand_shards
from sae_lightning.world.scenes import CLASSNAMES, SCENE_VERSION, make_scene

log = logging.getLogger(__name__)

DEMO_CLASSNAMES: list[str] = list(CLASSNAMES)

MARKER_FILE = "_demo_complete.json"
_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_MAX_DEMO_SHARDS = 8
_MAX_DEMO_SHARD_SIZE = 256


def _split_rng(seed: int, split: str) -> np.random.Generator:
    """Independent stream per (seed, split): train and val never share images."""
    return np.random.default_rng([seed, zlib.crc32(split.encode())])


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
    """Write `out_dir/{split}-%06d.tar` scene shards and `classnames.txt`; return the shard paths.

    Each sample: `<key>.<fmt>` image, `<key>.cls` label, `<key>.txt` caption, `<key>.json` attribute record.

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
    with tempfile.TemporaryDirectory(prefix=f".{split}-", dir=out_dir) as tmp:
        written: list[str] = []
        pattern = f"{tmp}/{split}-%06d.tar"
        with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, post=written.append) as sink:
            for i in range(n_images):
                image, record = make_scene(rng, image_size)
                sink.write({
                    "__key__": f"{split}_{i:08d}",
                    fmt: _encode(image, fmt),
                    "cls": int(record["label"]),
                    "txt": record["caption"],
                    "json": json.dumps(record, sort_keys=True).encode("utf-8"),
                })
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
    params = {"n_train": n_train, "n_val": n_val, "image_size": image_size, "seed": seed,
              "version": SCENE_VERSION + 1}
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


def read_attribute_records(shards: str | list[str]) -> dict[str, dict]:
    """The attribute records of scene shards, keyed like the shard reader's keys: `<shard basename>/<key>`.

    `shards` is a brace/glob pattern or a list of paths (e.g. the val shards). Samples without a record
    (not scene shards) raise, since every key the reader yields must have its truth.
    """
    records: dict[str, dict] = {}
    for url in expand_shards(shards):
        for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False):
            key = f"{os.path.basename(url)}/{sample['__key__']}"
            if "json" not in sample:
                raise ValueError(f"{key} has no attribute record (.json): not a scene shard (docs/format-scenes.md)")
            records[key] = json.loads(sample["json"])
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the offline demo scene shards (coloured shapes).")
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
