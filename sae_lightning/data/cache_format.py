"""The activation cache on disk: manifest, shard files, and their checks (docs/format-activations.md).

A cache is one directory: `manifest.json` plus shard files `<source>-<part>.safetensors`, each holding
`activations` [M, d] (fp32/fp16/bf16), `labels` [M] (int64, -1 without a class), `image` [M] (int32, the row's
image as an index into the file's `keys` metadata) and `token` [M] (int16, the row's token within the image's
selection) and one metadata entry `sae_lightning_cache` (JSON: the source shard, the part, the image `keys`).
`cache.py` writes it (sae_lightning/data/cache_write.py); `data=cache` reads it
(sae_lightning/data/cache.py). Everything here is plain file handling, shared by both.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sae_lightning.atomic import replace_file

FORMAT = "sae_lightning.activation_cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_SUFFIX = ".safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TENSORS = ("activations", "labels", "image", "token")
METADATA_KEY = "sae_lightning_cache"  # the file's one metadata entry: JSON (source, part, image keys)


class CacheError(ValueError):
    """A cache directory that cannot be used as it is; the message says what to do."""


def shard_name(source_index: int, part: int) -> str:
    """The file of part `part` of source shard number `source_index` (0-based, in the manifest's order)."""
    return f"{source_index:06d}-{part:04d}{SHARD_SUFFIX}"


def shard_metadata(path: str | Path) -> dict[str, Any]:
    """A shard file's metadata: format, version, source (shard name), source_index, part, keys, skipped_keys."""
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()[METADATA_KEY])


def config_hash(identity: dict[str, Any]) -> str:
    """A short, stable hash of what determines a cache's bytes."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Atomically (re)write `manifest.json`: a reader sees the old manifest or the new one."""
    text = json.dumps(manifest, indent=1, sort_keys=False) + "\n"
    replace_file(directory / MANIFEST, lambda tmp: tmp.write_text(text))


def read_manifest(directory: str | Path, *, what: str = "data.path") -> dict[str, Any]:
    """The manifest of a cache directory, or a CacheError saying what is wrong and what to do."""
    directory = Path(directory).expanduser()
    if not directory.exists():
        raise CacheError(f"{what}={str(directory)!r}: no such directory. Write a cache with `python cache.py` "
                         f"(e.g. python cache.py experiment=demo cache.dir={directory}) and point {what} at it.")
    if not directory.is_dir():
        raise CacheError(f"{what}={str(directory)!r} is a file, not a cache directory. An activation cache is the "
                         f"directory `python cache.py` writes (with a {MANIFEST}); for a single activations file "
                         f"use data=activations data.activations={directory}.")
    path = directory / MANIFEST
    if not path.is_file():
        raise CacheError(f"{what}={str(directory)!r} has no {MANIFEST}: it is not an activation cache (or its "
                         f"writing never started). Write one with `python cache.py cache.dir={directory}`.")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"{path} is not readable JSON ({err}). Rerun `python cache.py` with the config that "
                         f"wrote it and overwrite=true to rebuild the cache.") from err
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise CacheError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; this "
                         f"sae_lightning reads {FORMAT!r} version {FORMAT_VERSION}. Rewrite the cache with this "
                         f"version's `python cache.py ... overwrite=true`.")
    if manifest.get("dtype") not in DTYPES:
        raise CacheError(f"{path}: unknown dtype {manifest.get('dtype')!r}; a cache stores one of {list(DTYPES)}.")
    return manifest


def check_shard(directory: Path, entry: dict[str, Any], *, full: bool) -> str | None:
    """None if the shard file matches its manifest entry (size; and sha256 when `full`), else what is wrong."""
    path = directory / entry["file"]
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path} has {size} bytes, the manifest says {entry['bytes']} (truncated or overwritten)"
    if full and sha256_file(path) != entry["sha256"]:
        return f"{path}'s sha256 differs from the manifest's (the file is corrupt)"
    return None


def check_cache(directory: str | Path, manifest: dict[str, Any], *, full: bool, what: str = "data.path") -> None:
    """CacheError unless the cache is complete and every shard matches the manifest (size; sha256 when `full`)."""
    directory = Path(directory).expanduser()
    if not manifest.get("complete"):
        done = sum(1 for s in manifest.get("sources", []) if s.get("done"))
        raise CacheError(f"{what}={str(directory)!r}: the cache is incomplete ({done} of "
                         f"{len(manifest.get('sources', []))} source shards written). Finish it by rerunning the "
                         f"`python cache.py ...` command that started it (it continues where it stopped).")
    if not manifest.get("shards"):
        raise CacheError(f"{what}={str(directory)!r}: the cache holds no rows (no image could be read from its "
                         f"{len(manifest.get('sources', []))} source shard(s)).")
    problems = [p for p in (check_shard(directory, e, full=full) for e in manifest["shards"]) if p]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; ... ({len(problems)} in all)" if len(problems) > 3 else "")
        raise CacheError(f"{what}={str(directory)!r}: {len(problems)} shard file(s) do not match the manifest: "
                         f"{shown}. Rerun the `python cache.py ...` command that wrote the cache: it verifies the "
                         f"files and rewrites the bad ones.")


def backbone_source(directory: str | Path) -> dict[str, Any]:
    """What made a cache's rows, for tools that need the backbone back (e.g. evaluating an SAE trained on the
    cache): `backbone` (the resolved Hydra node, with `_target_`), `layer` (as configured) and `tokens`."""
    config = read_manifest(directory)["config"]
    return {"backbone": config["backbone"], "layer": config["layer"], "tokens": config["tokens"]}


def stale_temporaries(directory: Path) -> list[Path]:
    """Temporaries left by an interrupted atomic write (`*.tmp`)."""
    return sorted(p for p in directory.glob("*.tmp") if p.is_file()) if directory.is_dir() else []


def remove_cache_files(directory: Path) -> None:
    """Remove a cache's own files (shards, manifest, temporaries), nothing else."""
    for path in [*directory.glob(f"[0-9]*-[0-9]*{SHARD_SUFFIX}"), directory / MANIFEST, *stale_temporaries(directory)]:
        if path.is_file():
            os.unlink(path)
