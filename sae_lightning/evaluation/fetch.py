"""Fetch the few images the grids show, by key, with a second pass over the shards.

The statistics pass keeps only keys (memory O(F * k)); here the shards are read again in order and only
samples whose key is wanted are decoded (tar reading without decoding is cheap), stopping as soon as all
are found. Keys follow the shard pipeline's "<shard basename>/<__key__>" form.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from functools import partial

import numpy as np
import PIL.Image
import webdataset as wds

from sae_lightning.data.shards import decode_samples

log = logging.getLogger(__name__)


def _skip_unreadable(exn: Exception) -> bool:
    log.warning("skipping unreadable shard data while fetching images: %r", exn)
    return True


def sample_key(sample: dict) -> str:
    """The key the shard pipeline gives a sample (see sae_lightning.data.shards.decode_samples)."""
    return f"{os.path.basename(sample.get('__url__', ''))}/{sample['__key__']}"


def thumbnail(image: PIL.Image.Image, size: int = 160) -> np.ndarray:
    """Centre-cropped square thumbnail as HxWx3 uint8 (what the grids draw)."""
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return np.asarray(image.convert("RGB").crop(box).resize((size, size), PIL.Image.BICUBIC))


def fetch_images(urls: list[str], keys: Iterable[str], size: int = 160) -> dict[str, np.ndarray]:
    """Thumbnails for `keys` from the shards `urls`; keys not found are absent from the result (logged)."""
    wanted = set(keys)
    found: dict[str, np.ndarray] = {}
    if not wanted:
        return found
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        wds.tarfile_to_samples(handler=_skip_unreadable),
        wds.select(lambda s: sample_key(s) in wanted),
    )
    for decoded in decode_samples(pipeline, partial(thumbnail, size=size)):
        if decoded is None:
            continue
        found[decoded.key] = decoded.image
        if len(found) == len(wanted):
            break
    if len(found) < len(wanted):
        log.warning("%d of %d top images were not found in the shards", len(wanted) - len(found), len(wanted))
    return found

