"""Convert an ImageFolder tree (root/<class>/<image>) into webdataset shards, keeping the original bytes.

Re-encoding would change the pixels CLIP sees compared with training on the folder, so files are copied
as they are; each is opened once with PIL to skip unreadable files up front instead of at training time.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import random
import re
from pathlib import Path

import PIL.Image
import webdataset as wds
from tqdm import tqdm

from sae_lightning.data.shards import CLASSNAMES_FILE

log = logging.getLogger(__name__)

# torchvision's ImageFolder extensions: files with these are candidates, the rest are ignored silently.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Shard key by the format PIL detects (ImageNet has PNG and CMYK files named .JPEG).
_FORMAT_KEYS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SYNSET = re.compile(r"n\d{8}")
_N_IMAGENET_CLASSES = 1000


def find_images(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class folders (label = index) and every image file under them, as torchvision's ImageFolder."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"no class sub-directories in {root} (expected root/<class>/<image>)")
    files = []
    for label, name in enumerate(classes):
        found = [
            Path(dirpath, fname)
            for dirpath, _, fnames in sorted(os.walk(root / name, followlinks=True))
            for fname in sorted(fnames)
            if fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith(".")
        ]
        if not found:
            log.warning("class folder %s has no images", root / name)
        files.extend((path, label) for path in found)
    return classes, files


def class_names(classes: list[str], imagenet_names: bool) -> list[str]:
    """Folder names, or open_clip's readable ImageNet names when the folders are the 1000 synsets."""
    if not imagenet_names:
        return classes
    if len(classes) != _N_IMAGENET_CLASSES or not all(_SYNSET.fullmatch(c) for c in classes):
        raise ValueError(
            f"--imagenet-names needs exactly {_N_IMAGENET_CLASSES} synset folders (n01440764, ...); "
            f"found {len(classes)} folders, e.g. {classes[:3]}"
        )
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def read_image_bytes(path: Path) -> tuple[str, bytes]:
    """The file's bytes and its shard key (jpg/png/webp by content); raises if PIL cannot read it."""
    data = path.read_bytes()
    with PIL.Image.open(io.BytesIO(data)) as image:
        if image.format not in _FORMAT_KEYS:
            raise ValueError(f"unsupported image format {image.format} (supported: {sorted(_FORMAT_KEYS)})")
        image.verify()
        return _FORMAT_KEYS[image.format], data


def imagefolder_to_shards(
    root: str | Path,
    out_dir: str | Path,
    *,
    prefix: str = "train",
    shard_size: int = 1000,
    shuffle: bool = True,
    seed: int = 0,
    imagenet_names: bool = False,
    max_images: int | None = None,
    holdout: int = 0,
    holdout_prefix: str = "holdout",
) -> list[str]:
    """Write `out_dir/{prefix}-%06d.tar` shards and `classnames.txt` from an ImageFolder tree.

    Files are shuffled by default: folders are sorted by class, so unshuffled shards stream one class
    after another, which a finite shuffle buffer cannot undo. max_images takes a random subset.
    holdout > 0 first sets aside that many of the (shuffled) files as `{holdout_prefix}-%06d.tar`, disjoint
    from the `{prefix}` shards (which get the rest, up to max_images): held-out images from the training
    distribution, e.g. the seed's 524,288-image evaluation. Returns the `{prefix}` shards' paths.
    """
    root, out_dir = Path(root).expanduser(), Path(out_dir).expanduser()
    if holdout < 0:
        raise ValueError(f"--holdout {holdout}: must be >= 0")
    if holdout and holdout_prefix == prefix:
        raise ValueError(f"--holdout-prefix {holdout_prefix!r} must differ from --prefix {prefix!r}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images {max_images}: must be >= 1")
    classes, files = find_images(root)
    names = class_names(classes, imagenet_names)
    if holdout >= len(files):
        raise ValueError(f"--holdout {holdout} leaves no training image: {root} has {len(files)} image files")
    if shuffle:
        random.Random(seed).shuffle(files)
    held, files = files[:holdout], files[holdout:]
    if max_images is not None:
        files = files[:max_images]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (prefix, holdout_prefix) if holdout else (prefix,):
        existing = sorted(out_dir.glob(f"{name}-*.tar"))
        if existing:
            raise FileExistsError(f"{out_dir} already has {len(existing)} {name}-*.tar shard(s); "
                                  "remove them or choose another --out / --prefix")
    if held:
        held_shards = _write_shards(held, out_dir, holdout_prefix, shard_size)
        log.info("held out %d image(s) in %d shard(s): %s-*.tar", len(held), len(held_shards), holdout_prefix)
    written = _write_shards(files, out_dir, prefix, shard_size)
    (out_dir / CLASSNAMES_FILE).write_text("\n".join(names) + "\n", encoding="utf-8")
    return written


def _write_shards(files: list[tuple[Path, int]], out_dir: Path, prefix: str, shard_size: int) -> list[str]:
    """`out_dir/{prefix}-%06d.tar` with keys `{prefix}_%08d`; unreadable files are skipped and counted."""
    written: list[str] = []
    n_written = n_skipped = 0
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, post=written.append) as sink:
        for path, label in tqdm(files, desc=f"{prefix} shards", unit="img"):
            try:
                key, data = read_image_bytes(path)
            except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as exn:
                log.warning("skipping unreadable file %s: %s", path, exn)
                n_skipped += 1
                continue
            sink.write({"__key__": f"{prefix}_{n_written:08d}", key: data, "cls": label})
            n_written += 1
    log.info("wrote %d images in %d shard(s) to %s; skipped %d unreadable file(s)",
             n_written, len(written), out_dir, n_skipped)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Convert an ImageFolder tree (root/<class>/<image>) into webdataset shards "
        "(original image bytes + cls label + classnames.txt)."
    )
    parser.add_argument("--root", required=True, help="ImageFolder root, e.g. /data/imagenet/train")
    parser.add_argument("--out", required=True, help="output directory for the shards")
    parser.add_argument("--prefix", default="train", help="shard names: <prefix>-000000.tar, ...")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument(
        "--shuffle", action=argparse.BooleanOptionalAction, default=True,
        help="shuffle the file order (default: on). ImageFolder trees are sorted by class, so --no-shuffle "
        "writes class-ordered shards, and training then sees one class after another.",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the file shuffle")
    parser.add_argument("--imagenet-names", action="store_true",
                        help="write open_clip's readable ImageNet names (needs the 1000 synset folders)")
    parser.add_argument("--max-images", type=int, default=None, help="write only a random subset of N images")
    parser.add_argument("--holdout", type=int, default=0, metavar="N",
                        help="first set aside N random images as <holdout-prefix>-*.tar, disjoint from the "
                        "<prefix> shards: held-out images for evaluate.py val_shards=... (the seed: 524288)")
    parser.add_argument("--holdout-prefix", default="holdout", help="names of the held-out shards")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shards = imagefolder_to_shards(
        args.root, args.out, prefix=args.prefix, shard_size=args.shard_size, shuffle=args.shuffle,
        seed=args.seed, imagenet_names=args.imagenet_names, max_images=args.max_images,
        holdout=args.holdout, holdout_prefix=args.holdout_prefix,
    )
    print(f"{len(shards)} {args.prefix} shard(s) in {args.out}"
          + (f", held-out images in {args.holdout_prefix}-*.tar" if args.holdout else ""))


if __name__ == "__main__":
    main()
