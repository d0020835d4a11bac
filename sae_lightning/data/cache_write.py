"""`python cache.py`: the training shards through the frozen backbone once, activations to a cache directory.

The image pipeline is the training one (`shards.image_loader`, the backbone's pixel transform, its truncated
forward and token selection, `data.autocast`), read in a fixed order: no shard or sample shuffle. Each source
shard's rows go to their own files, `rows_per_shard` rows (whole images) at a time, so a file's bytes depend
only on its source shard and the config, never on how many workers read or where a run was interrupted:

- every backbone forward takes the next `batch_size` images of one source shard (the last group of a shard
  may be smaller), and a file holds a multiple of `batch_size` images, so a resumed run forms the same groups;
- each file is written atomically, then the manifest (also atomic) lists it with its size and sha256;
- a rerun with the same config verifies the listed files, skips finished source shards and the images of
  finished files, and continues; a different config refuses unless `overwrite=true`;
- SIGTERM/SIGINT stop after the current batch: what is complete is saved, the rest is redone on the rerun;
- a write that fails (a full disk, a quota) stops the run with `CacheWriteError`: the manifest and the files
  it lists stay intact, the file being written is removed, and the rerun after freeing space resumes.

Format: docs/format-activations.md.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import signal
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from sae_lightning.atomic import replace_file
from sae_lightning.backbone import TOKEN_CHOICES
from sae_lightning.data.cache_format import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    METADATA_KEY,
    SHARD_SUFFIX,
    CacheError,
    check_shard,
    config_hash,
    read_manifest,
    remove_cache_files,
    shard_metadata,
    shard_name,
    stale_temporaries,
    write_manifest,
)
from sae_lightning.data.datamodule import AUTOCAST_DTYPES, require_train_shards
from sae_lightning.data.shards import IMAGE_KEYS, _is_url, image_loader
from sae_lightning.validation import Problems, _is_int

log = logging.getLogger(__name__)

STOP_EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}


class CacheWriteError(OSError):
    """A cache file or the manifest could not be written (a full disk, a quota): the message says what to do."""


def validate_cache_config(cfg: DictConfig) -> None:
    """ValueError listing every problem of a composed cache.py config (conf/cache.yaml), before any work."""
    p = Problems("cache config")
    if cfg.get("backbone") is None:
        p.add("backbone", None, "cache.py computes activations with a backbone: choose one (e.g. backbone=tiny_clip "
                                "or experiment=demo); do not pass '~backbone'")
    tokens = cfg.get("tokens")
    if tokens not in TOKEN_CHOICES:
        p.add("tokens", tokens, "must be one of cls, patches or all")
    if not _is_int(cfg.get("layer")):
        p.add("layer", cfg.get("layer"), "must be an integer block index (negative counts from the end)")
    cache = cfg.get("cache") or {}
    if cache.get("dtype") not in DTYPES:
        p.add("cache.dtype", cache.get("dtype"), f"must be one of {', '.join(DTYPES)}")
    p.int_at_least("cache.rows_per_shard", cache.get("rows_per_shard"), 1, " (rows per file, e.g. 65536)")
    p.int_at_least("cache.batch_size", cache.get("batch_size"), 1, " (images per backbone forward)")
    if not cache.get("dir"):
        p.add("cache.dir", cache.get("dir"), "must name the directory to write the cache to")
    device = str(cache.get("device", "auto"))
    if device != "auto":
        try:
            kind = torch.device(device).type
        except RuntimeError:
            kind = None
        if kind is None:
            p.add("cache.device", device, "must be auto, cpu, cuda or cuda:<index>")
        elif kind == "cuda" and not torch.cuda.is_available():
            p.add("cache.device", device, "no CUDA device is visible here: use cache.device=cpu (or auto)")
    autocast = (cfg.get("data") or {}).get("autocast", "32")
    if autocast not in AUTOCAST_DTYPES:
        p.add("data.autocast", autocast, f"must be one of {', '.join(AUTOCAST_DTYPES)}")
    p.raise_if_any()


def cache_identity(cfg: DictConfig, sources: list[str]) -> dict[str, Any]:
    """Everything that determines the cache's bytes (its config hash): not the workers, device or directory."""
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    for key in ("device", "cache_dir"):
        backbone.pop(key, None)
    return {"format_version": FORMAT_VERSION, "backbone": backbone, "layer": cfg.layer, "tokens": cfg.tokens,
            "dtype": cfg.cache.dtype, "rows_per_shard": cfg.cache.rows_per_shard,
            "batch_size": cfg.cache.batch_size, "autocast": str(cfg.data.get("autocast", "32")), "sources": sources}


def train_command(directory: Path) -> str:
    """The train.py command for this cache, keeping the cache run's experiment (whose SAE settings the user
    most likely wants) and dropping the backbone it selects."""
    experiment = None
    try:
        from hydra.core.hydra_config import HydraConfig

        experiment = HydraConfig.get().runtime.choices.get("experiment")
    except ValueError:  # not under Hydra (CacheWriter used from Python)
        pass
    prefix = f"experiment={experiment} '~backbone' " if experiment else ""
    return f"python train.py {prefix}data=cache data.path={directory}"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_manifest(identity: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "complete": False,
        "model": None, "pretrained": None, "layer": None, "tokens": identity["tokens"], "tokens_per_image": None,
        "d_in": None, "dtype": identity["dtype"], "rows_per_shard": None, "images_per_shard": None,
        "total_rows": 0, "images": 0, "samples_skipped": 0,
        "sources": [{"url": url, "done": False, "images": 0, "rows": 0, "skipped": 0} for url in identity["sources"]],
        "shards": [], "config_hash": config_hash(identity), "config": identity, "created": _now(), "updated": _now(),
    }


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            if isinstance(a, list) and isinstance(b, list):
                a, b = f"{len(a)} items", f"{len(b)} items (differ)"
            lines.append(f"  {prefix}{key}: {a!r} in the cache, {b!r} now")
    return lines


def _recount(manifest: dict[str, Any]) -> None:
    manifest["total_rows"] = sum(s["rows"] for s in manifest["shards"])
    manifest["images"] = sum(s["images"] for s in manifest["shards"])
    manifest["samples_skipped"] = sum(s.get("skipped", 0) for s in manifest["sources"])
    manifest["updated"] = _now()


def prepare_directory(directory: Path, identity: dict[str, Any], *, overwrite: bool, verify: bool) -> dict[str, Any]:
    """The manifest to continue from: a fresh one, or the directory's own after checking its config and files."""
    fresh = new_manifest(identity)
    if directory.exists() and not directory.is_dir():
        raise CacheError(f"cache.dir={str(directory)!r} is a file: point cache.dir at a directory.")
    if not directory.exists() or not any(directory.iterdir()):
        return fresh
    if not (directory / MANIFEST).is_file():
        if overwrite:
            remove_cache_files(directory)
            if not any(directory.iterdir()):
                return fresh
        raise CacheError(f"cache.dir={str(directory)!r} is not empty and holds no {MANIFEST}: it is not a cache "
                         f"this command wrote. Choose an empty or new cache.dir.")
    try:
        manifest = read_manifest(directory, what="cache.dir")
    except CacheError as err:
        if not overwrite:
            raise CacheError(f"{err} (or overwrite=true to replace it)") from err
        manifest = None
    if manifest is not None and manifest.get("config_hash") != fresh["config_hash"] and not overwrite:
        lines = "\n".join(_differences(manifest.get("config", {}), identity)) or "  (the format changed)"
        raise CacheError(f"cache.dir={str(directory)!r} holds a cache written with a different config:\n{lines}\n"
                         f"Rerun with its config to continue it, choose another cache.dir, or add overwrite=true "
                         f"to replace it.")
    if manifest is None or manifest.get("config_hash") != fresh["config_hash"]:
        log.warning("overwrite=true: removing the cache in %s (written with another config).", directory)
        remove_cache_files(directory)
        return fresh
    for path in stale_temporaries(directory):
        log.warning("Removed %s, left by an interrupted write.", path)
        path.unlink()
    bad_sources = set()
    for entry in manifest["shards"]:
        problem = check_shard(directory, entry, full=verify)
        if problem:
            log.warning("%s: its source shard %s is redone.", problem, manifest["sources"][entry["source"]]["url"])
            bad_sources.add(entry["source"])
    if bad_sources:
        manifest["shards"] = [s for s in manifest["shards"] if s["source"] not in bad_sources]
        for index in bad_sources:
            manifest["sources"][index].update(done=False, images=0, rows=0, skipped=0)
        manifest["complete"] = False
        _recount(manifest)
    listed = {s["file"] for s in manifest["shards"]}
    for path in directory.glob(f"[0-9]*-[0-9]*{SHARD_SUFFIX}"):
        if path.name not in listed:  # written, but the run stopped before the manifest listed it: redone
            path.unlink()
    return manifest


@dataclass
class _Source:
    """One source shard in progress: images waiting for a forward, rows waiting for a file."""

    index: int
    url: str
    part: int = 0
    images: list[torch.Tensor] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # keys of the images in the current part (forwarded or not)
    rows: list[torch.Tensor] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _count_images(url: str) -> int | None:
    """Images in a local tar shard, from its headers only; None for a URL or an unreadable file."""
    if _is_url(url):
        return None
    try:
        with tarfile.open(url, mode="r:") as tar:
            keys = {m.name.rsplit(".", 1)[0] for m in tar if m.isfile() and m.name.rsplit(".", 1)[-1].lower()
                    in IMAGE_KEYS}
        return len(keys)
    except (OSError, tarfile.TarError):
        return None


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


class _StopFlag:
    """SIGTERM/SIGINT set a flag (the current batch is finished and saved); the previous handlers come back."""

    def __init__(self) -> None:
        self.name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.name = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class CacheWriter:
    """Writes one cache directory from a composed cache.py config; `run()` returns the exit code (0 when complete).

    `on_shard` (tests, tools) is called after each file and its manifest entry are on disk.
    """

    def __init__(self, cfg: DictConfig, on_shard: Callable[[dict[str, Any]], None] | None = None):
        validate_cache_config(cfg)
        self.cfg = cfg
        self.directory = Path(str(cfg.cache.dir)).expanduser().resolve()
        self.sources = require_train_shards(cfg.data.train_shards)
        self.identity = cache_identity(cfg, self.sources)
        self.on_shard = on_shard
        self.dtype = DTYPES[cfg.cache.dtype]

    def run(self) -> int:
        with _StopFlag() as self.stop:  # from the start: a signal while the backbone loads stops at the first batch
            return self._run()

    def _run(self) -> int:
        cfg = self.cfg
        manifest = prepare_directory(self.directory, self.identity, overwrite=bool(cfg.get("overwrite")),
                                     verify=bool(cfg.cache.get("verify", True)))
        if manifest.get("complete"):
            log.info("%s already holds the complete cache (%d rows from %d images): nothing to do. Train on it: "
                     "%s", self.directory, manifest["total_rows"], manifest["images"], train_command(self.directory))
            return 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manifest = manifest
        self._save_manifest()

        device = _device(str(cfg.cache.get("device", "auto")))
        backbone = instantiate(cfg.backbone).to(device)
        self.backbone, self.device = backbone, device
        self.layer = backbone.resolve_layer(cfg.layer)
        self.tokens = cfg.tokens
        self.tokens_per_image = backbone.n_tokens_for(self.tokens)
        per_file = max(1, int(cfg.cache.rows_per_shard) // self.tokens_per_image)
        self.group = min(int(cfg.cache.batch_size), per_file)  # images per forward; a file holds whole groups
        self.images_per_shard = per_file - per_file % self.group
        manifest.update(model=backbone.name, pretrained=str(backbone.pretrained), layer=self.layer,
                        tokens_per_image=self.tokens_per_image, d_in=backbone.width,
                        rows_per_shard=self.images_per_shard * self.tokens_per_image,
                        images_per_shard=self.images_per_shard, image_batch_size=self.group)
        self._save_manifest()
        return self._stream()

    def _write_failed(self, what: str, path: Path, err: OSError) -> CacheWriteError:
        try:  # what the manifest on disk (the old one, when its rewrite is what failed) lists
            listed = len(read_manifest(self.directory, what="cache.dir")["shards"])
            kept = f"The manifest and the {listed} complete file(s) it lists are intact"
        except CacheError:
            kept = "No manifest was written yet"
        return CacheWriteError(err.errno, f"Could not write {what} {path} ({err.strerror or err}). Is the disk "
                                          f"full? {kept} and nothing half-written was kept; free space and rerun "
                                          f"the same command: the cache resumes where it stopped.")

    def _save_manifest(self) -> None:
        """Atomically rewrite the manifest (the old one stays whole if the write fails: CacheWriteError)."""
        try:
            write_manifest(self.directory, self.manifest)
        except OSError as err:
            raise self._write_failed("the manifest", self.directory / MANIFEST, err) from err

    def _resume_state(self) -> tuple[set[str], dict[str, set[str]], dict[str, _Source]]:
        """(finished source shards, {source: keys in its finished files}, the in-flight sources' state)."""
        done = {s["url"] for s in self.manifest["sources"] if s["done"]}
        states: dict[str, _Source] = {}
        skip_samples: dict[str, set[str]] = {}
        for entry in self.manifest["shards"]:
            url = self.manifest["sources"][entry["source"]]["url"]
            if url in done:
                continue
            state = states.setdefault(url, _Source(entry["source"], url))
            state.part = max(state.part, entry["part"] + 1)
            meta = shard_metadata(self.directory / entry["file"])
            skip_samples.setdefault(url, set()).update(meta["keys"] + meta["skipped_keys"])
        return done, skip_samples, states

    def _stream(self) -> int:
        cfg, manifest = self.cfg, self.manifest
        done, skip_samples, self.states = self._resume_state()
        todo = [url for url in self.sources if url not in done]
        if not todo:
            return self._finish()
        counts = [_count_images(url) for url in todo]
        total = None if None in counts else sum(counts) + sum(s["images"] for s in manifest["sources"] if s["done"])
        initial = manifest["images"]
        log.info("Caching %s layer %d (%s tokens, %d per image, d=%d) as %s from %d source shard(s) (%d already "
                 "done) into %s", self.backbone.name, self.layer, self.tokens, self.tokens_per_image,
                 self.backbone.width, cfg.cache.dtype, len(self.sources), len(done), self.directory)
        loader = image_loader(
            todo, self.backbone.pixel_transform, self.group, num_workers=int(cfg.data.get("num_workers", 0)),
            pin_memory=bool(cfg.data.get("pin_memory", False)) and self.device.type == "cuda", shuffle=0,
            shardshuffle=False, seed=0, resampled=False, partial=True, track=True,
            skip_samples={url: keys for url, keys in skip_samples.items()},
        )
        bar = tqdm(total=total, initial=initial, desc="Caching", unit="img", dynamic_ncols=True, smoothing=0.05)
        stop = self.stop
        with bar:
            iterator = iter(loader)
            try:
                for batch in iterator:
                    self._take(batch)
                    bar.update(len(batch["labels"]))
                    bar.set_postfix(rows=manifest["total_rows"], files=len(manifest["shards"]), refresh=False)
                    if stop.name:
                        break
            except CacheWriteError:
                raise  # a full disk is what the user must hear about, even when a stop signal came at once
            except Exception:
                if not stop.name:  # a worker killed by the same Ctrl-C: the stop is what matters
                    raise
            finally:
                del iterator
        if stop.name:
            n_done = sum(1 for s in manifest["sources"] if s["done"])
            log.warning("Stopped by %s. Saved in %s: %d complete file(s), %d rows from %d images (%d of %d source "
                        "shards finished). Rerun the same command to continue (exit code %d).", stop.name,
                        self.directory, len(manifest["shards"]), manifest["total_rows"], manifest["images"], n_done,
                        len(self.sources), STOP_EXIT_CODES[stop.name])
            return STOP_EXIT_CODES[stop.name]
        unfinished = [url for url in todo if not manifest["sources"][self.sources.index(url)]["done"]]
        if unfinished:
            raise RuntimeError(f"The pass over the shards ended with {len(unfinished)} source shard(s) unfinished "
                               f"({unfinished[:3]}): a DataLoader worker stopped early. Rerun to continue.")
        return self._finish()

    def _finish(self) -> int:
        manifest = self.manifest
        manifest["complete"] = True
        _recount(manifest)
        self._save_manifest()
        log.info("Cache complete: %d rows (%d images, %d undecodable samples skipped) in %d file(s) in %s. Train on "
                 "it: %s", manifest["total_rows"], manifest["images"], manifest["samples_skipped"],
                 len(manifest["shards"]), self.directory, train_command(self.directory))
        return 0

    def _state(self, url: str) -> _Source:
        if url not in self.states:
            self.states[url] = _Source(self.sources.index(url), url)
        return self.states[url]

    def _take(self, batch: dict[str, Any]) -> None:
        """One loader batch: images to their source's queue, forwards of full groups, files of full parts."""
        n = len(batch["labels"])
        delivered = batch["delivered"]
        for i in range(n):
            url, key = delivered[i]
            state = self._state(url)
            state.images.append(batch["images"][i])
            state.labels.append(int(batch["labels"][i]))
            state.keys.append(key)
            if len(state.images) == self.group:
                self._forward(state)
            if len(state.keys) == self.images_per_shard and not state.images:
                self._write_part(state)
        for url, key in delivered[n:]:
            self._state(url).skipped.append(key)
        for url in batch.get("shards_done", ()):
            state = self._state(url)
            if state.images:
                self._forward(state)
            if state.keys or state.skipped:
                self._write_part(state)
            entry = self.manifest["sources"][state.index]
            entry["done"] = True
            del self.states[url]
            self._save_manifest()

    @torch.no_grad()
    def _forward(self, state: _Source) -> None:
        images = torch.stack(state.images).to(self.device, non_blocking=True)
        state.images = []
        dtype = AUTOCAST_DTYPES[str(self.cfg.data.get("autocast", "32"))]
        ctx = torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            acts = self.backbone.activations(images, self.layer, self.tokens)
        state.rows.append(acts.reshape(-1, acts.shape[-1]).to(self.dtype).cpu())

    def _write_part(self, state: _Source) -> None:
        """Write the source's current part (atomically), list it in the manifest, start the next part."""
        n_images, per = len(state.keys), self.tokens_per_image
        source = self.manifest["sources"][state.index]
        entry = None  # only undecodable samples since the last file: no file, the source counts them
        if n_images:
            activations = torch.cat(state.rows).contiguous()
            labels = torch.tensor(state.labels, dtype=torch.int64).repeat_interleave(per)
            tensors = {"activations": activations, "labels": labels,
                       "image": torch.arange(n_images, dtype=torch.int32).repeat_interleave(per),
                       "token": torch.arange(per, dtype=torch.int16).repeat(n_images)}
            # one metadata entry: safetensors stores them in a hash map, whose order (bytes) varies per process
            metadata = {METADATA_KEY: json.dumps({
                "format": FORMAT, "version": FORMAT_VERSION, "source": Path(state.url).name,
                "source_index": state.index, "part": state.part, "keys": state.keys, "skipped_keys": state.skipped,
            }, sort_keys=True)}
            data = save_safetensors(tensors, metadata)
            name = shard_name(state.index, state.part)
            path = self.directory / name
            try:
                replace_file(path, lambda tmp: tmp.write_bytes(data))
            except OSError as err:  # the temporary is gone; a renamed file the manifest does not list goes too
                path.unlink(missing_ok=True)
                raise self._write_failed("cache file", path, err) from err
            entry = {"file": name, "source": state.index, "part": state.part, "rows": int(activations.shape[0]),
                     "images": n_images, "skipped": len(state.skipped), "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest(), "first_key": state.keys[0],
                     "last_key": state.keys[-1]}
            self.manifest["shards"].append(entry)
            state.part += 1
        source["images"] += n_images
        source["rows"] += n_images * per
        source["skipped"] += len(state.skipped)
        state.keys, state.labels, state.rows, state.skipped = [], [], [], []
        _recount(self.manifest)
        try:
            self._save_manifest()
        except CacheWriteError:
            if entry is not None:  # written but not listed: removed now (frees its space), redone on the rerun
                (self.directory / entry["file"]).unlink(missing_ok=True)
            raise
        if entry is not None and self.on_shard is not None:
            self.on_shard(entry)
