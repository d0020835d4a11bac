"""Webdataset image pipeline: shard lists, robust decoding with skip counting, batching, class names.

Shards are tar files of samples (`<key>.jpg|jpeg|png|webp` + `<key>.cls`), see docs/format-shards.md.
Everything that can fail on bad data (a corrupt image, a sample without an image) is skipped with a warning
and counted, so a long run never dies on one bad file and the count is still visible in the logs. Repeated
warnings are rate-limited (`RateLimitedWarning`): the first few are shown, then one summary per interval.

For training (`track=True`) every batch also reports which shards its worker has now *fully* delivered
(`shards_done`: every sample handed over in a batch or counted as skipped), the (shard, key) of each sample
it delivers, which shards were empty or unreadable, and the worker's (rank, worker) id; the DataModule
records them so a resumed pass skips the finished shards and the delivered samples of the others
(docs/format-shards.md, "Resuming mid-pass"). A tracked stream also ends each worker's pass with a record
that carries no image, so skips and finished shards at the very end still reach the main process.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import PIL.Image
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from sae_lightning.data.buffer import TokenPacer

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CLASSNAMES_FILE = "classnames.txt"
_MISSING_SHOWN = 3


def _is_url(name: str) -> bool:
    return "://" in name or name.startswith("pipe:")


def _expand_local(pattern: str, names: list[str]) -> list[str]:
    found, missing = [], []
    for name in names:
        name = os.path.expanduser(name)
        if glob.has_magic(name):
            matches = sorted(glob.glob(name))
        else:
            matches = [name] if os.path.exists(name) else []
        folders = [m for m in matches if os.path.isdir(m)]
        if folders:
            folder = folders[0].rstrip("/")
            raise ValueError(
                f"shard pattern {pattern!r}: {folder!r} is a directory, not a shard (a shard is a .tar file). "
                f"Point at the shards inside it, e.g. '{folder}/*.tar'."
            )
        found.extend(os.path.abspath(m) for m in matches)
        if not matches:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:_MISSING_SHOWN]) + (", ..." if len(missing) > _MISSING_SHOWN else "")
        raise FileNotFoundError(
            f"shard pattern {pattern!r}: {len(missing)} of {len(names)} expanded name(s) do not exist "
            f"({shown}). Check data.train_shards / data.val_shards, or run `make demo` to generate the "
            "demo shards."
        )
    return found


def expand_shards(patterns: str | Sequence[str]) -> list[str]:
    """Turn brace/glob patterns (a list, or one string, '::'-separated) into a list of shard paths/URLs.

    Local shards are checked here, before any DataLoader worker starts, so a typo fails with a clear
    message instead of an empty epoch. URLs (http, s3, gs, pipe:, ...) are passed through unchecked.
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for part in str(pattern).split("::"):
            if not part:
                continue
            names = list(braceexpand.braceexpand(part))
            urls.extend(names if _is_url(part) else _expand_local(part, names))
    if not urls:
        raise FileNotFoundError(
            f"no shards in {patterns!r}. Set data.train_shards / data.val_shards, or run `make demo`."
        )
    return urls


class RateLimitedWarning:
    """Log the first `first` warnings of a kind, then at most one summary per `interval` seconds.

    A stream of bad data (every sample of a corrupt shard) would otherwise write one line per sample: tens of
    megabytes of log per minute. The summary says how many were suppressed and shows the latest one.
    """

    def __init__(self, logger: logging.Logger, what: str, first: int = 5, interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger, self.what, self.first, self.interval, self.clock = logger, what, first, interval, clock
        self.total = 0
        self.suppressed = 0
        self.last_summary = clock()

    def warn(self, msg: str, *args) -> None:
        self.total += 1
        if self.total <= self.first:
            self.logger.warning(msg, *args)
            if self.total == self.first:
                self.logger.warning("further %s warnings are summarised every %.0f s", self.what, self.interval)
            self.last_summary = self.clock()
            return
        self.suppressed += 1
        now = self.clock()
        if now - self.last_summary >= self.interval:
            self.logger.warning("%d more %s warning(s) in the last %.0f s (%d in total); latest: " + msg,
                                self.suppressed, self.what, now - self.last_summary, self.total, *args)
            self.suppressed, self.last_summary = 0, now


class _LogAndContinue:
    """Webdataset handler for unreadable shards: log (rate-limited) and go on (wds.warn_and_continue sleeps)."""

    def __init__(self) -> None:
        self.warnings = RateLimitedWarning(log, "unreadable-shard")

    def __call__(self, exn: Exception) -> bool:
        self.warnings.warn("skipping unreadable shard data: %r", exn)
        return True


class ShardProgress:
    """Per worker: how many samples each shard held and how many have been delivered; which are done.

    A shard is done once it has been read to its end and every sample read from it has been delivered (in a
    batch, or counted in a batch's `n_skipped`). Shards that yield no sample at all are also listed as empty.
    """

    def __init__(self) -> None:
        self.read: dict[str, int] = {}
        self.delivered: dict[str, int] = {}
        self.empty: list[str] = []

    def read_complete(self, url: str, n_samples: int) -> None:
        self.read[url] = n_samples
        if n_samples == 0:
            self.empty.append(url)

    def deliver(self, url: str) -> None:
        self.delivered[url] = self.delivered.get(url, 0) + 1

    def pop_done(self, everything: bool = False) -> tuple[list[str], list[str]]:
        """(newly done shards, newly seen empty shards); `everything` at the end of the worker's stream."""
        done = [u for u, n in self.read.items() if everything or self.delivered.get(u, 0) >= n]
        for url in done:
            del self.read[url]
            self.delivered.pop(url, None)
        empty, self.empty = self.empty, []
        return done, empty


class _ShardReader:
    """tarfile_to_samples one shard at a time, telling `progress` how many samples each shard held.

    `skip_samples` ({shard url: sample keys}) are left out of the first pass: the samples of shards that were
    in flight at the checkpoint a run resumed from, already delivered before it.
    """

    def __init__(self, progress: ShardProgress | None, handler: Callable,
                 skip_samples: dict[str, Iterable[str]] | None = None) -> None:
        self.progress, self.handler = progress, handler
        self.skip_samples = {url: frozenset(keys) for url, keys in (skip_samples or {}).items()}
        self.passes = 0

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        skip = self.skip_samples if self.passes == 0 else {}
        self.passes += 1
        expand = wds.tarfile_to_samples(handler=self.handler)
        for source in src:
            n, done_before = 0, skip.get(source["url"], frozenset())
            for sample in expand(iter([source])):
                if sample.get("__key__") in done_before:
                    continue
                n += 1
                yield sample
            if self.progress is not None:
                self.progress.read_complete(source["url"], n)


class _ResumeFilter:
    """Drops `skip` (shards already consumed before a resume) from the first pass only; later passes read all."""

    def __init__(self, skip: Iterable[str]) -> None:
        self.skip = frozenset(skip)
        self.passes = 0

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        first, self.passes = self.passes == 0, self.passes + 1
        for source in src:
            if not (first and source["url"] in self.skip):
                yield source


class _EpochStage:
    """A pipeline stage that knows which pass over the data it is on (per process, as webdataset's own)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch = -1

    def _next_rng(self, *extra: int) -> random.Random:
        self.epoch += 1
        return random.Random(wds.utils.make_seed(self.seed, self.epoch, *extra))


class _ShardPermutation(_EpochStage):
    """Permute the whole shard list identically on every rank and worker, before splitting.

    Shuffling before the split (same seed everywhere) changes which worker reads which shard each epoch,
    which mixes better than webdataset's shard shuffle after the split.
    """

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        shards = list(src)
        self._next_rng().shuffle(shards)
        yield from shards


class _SampleShuffle(_EpochStage):
    """Buffer shuffle seeded by (seed, epoch, rank, worker): reproducible, yet different per worker."""

    def __init__(self, bufsize: int, seed: int) -> None:
        super().__init__(seed)
        self.bufsize = bufsize

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = self._next_rng(rank, worker)
        return wds.filters.shuffle(self.bufsize, rng=rng)(iter(src))


@dataclass
class _Decoded:
    image: torch.Tensor
    label: int
    key: str
    url: str = ""


@dataclass
class _Skipped:
    url: str
    key: str = ""


def _open_sample(sample: dict) -> tuple[PIL.Image.Image, int]:
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise ValueError(f"no image under any of {IMAGE_KEYS}; keys: {sorted(sample)}")
    with PIL.Image.open(io.BytesIO(sample[image_key])) as raw:
        image = raw.convert("RGB")  # forces the full decode, so truncated files fail here
    label = int(sample["cls"]) if "cls" in sample else -1
    return image, label


def decode_samples(
    samples: Iterable[dict], transform: Callable[[PIL.Image.Image], torch.Tensor],
    warnings: RateLimitedWarning | None = None,
) -> Iterator[_Decoded | _Skipped]:
    """Decode raw webdataset samples; yield _Skipped for a sample that cannot be decoded, so it is counted.

    The transform runs outside the try block: an error there is a bug, not bad data, and must surface.
    """
    warnings = warnings or RateLimitedWarning(log, "skipped-sample")
    for sample in samples:
        url = sample.get("__url__", "")
        try:
            image, label = _open_sample(sample)
        except Exception as exn:  # noqa: BLE001 - PIL raises many types on bad bytes; none may stop a run
            key, kind = sample.get("__key__"), type(exn).__name__
            warnings.warn("skipping sample %r from %s: %s: %s", key, url, kind, exn)
            yield _Skipped(url, str(key))
            continue
        yield _Decoded(transform(image), label, f"{os.path.basename(url)}/{sample['__key__']}", url)


def _collate(samples: list[_Decoded], n_skipped: int, empty_like: torch.Tensor | None = None) -> dict:
    if samples:
        images = torch.stack([s.image for s in samples])
    elif empty_like is not None:
        images = empty_like.new_empty(0, *empty_like.shape)
    else:
        images = torch.empty(0, dtype=torch.uint8)
    return {
        "images": images,
        "labels": torch.tensor([s.label for s in samples], dtype=torch.long),
        "keys": [s.key for s in samples],
        "n_skipped": torch.tensor(n_skipped, dtype=torch.long),
    }


def _tracked_batches(samples: Iterable[_Decoded | _Skipped], sizes: Callable[[], int], partial: bool,
                     progress: ShardProgress) -> Iterator[dict]:
    """Batches of `sizes()` images (possibly 0), each reporting shards done; a final image-less record."""
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    batch: list[_Decoded] = []
    skipped: list[_Skipped] = []
    like: torch.Tensor | None = None

    def emit(items: list[_Decoded], last: bool = False) -> dict:
        nonlocal skipped
        delivered = [(item.url, item.key.split("/", 1)[1]) for item in items] + [(s.url, s.key) for s in skipped]
        for url, _ in delivered:
            progress.deliver(url)
        out = _collate(items, len(skipped), like)
        done, empty = progress.pop_done(everything=last)
        out.update(delivered=delivered, shards_done=done, shards_empty=empty,
                   skipped_shards=sorted({s.url for s in skipped}), worker=(rank, worker), end_of_pass=last)
        skipped = []
        return out

    want = sizes()
    it = iter(samples)
    while True:
        while want == 0:
            yield emit([])
            want = sizes()
        sample = next(it, None)
        if sample is None:
            break
        if isinstance(sample, _Skipped):
            skipped.append(sample)
            continue
        like = sample.image
        batch.append(sample)
        if len(batch) == want:
            yield emit(batch)
            batch, want = [], sizes()
    if batch and partial:
        yield emit(batch)
        batch = []
    if batch:
        log.debug("dropping a final incomplete batch of %d image(s) at the end of the pass", len(batch))
    yield emit([], last=True)


def batch_with_skips(samples: Iterable[_Decoded | _Skipped], batch_size: int, partial: bool,
                     pacer: TokenPacer | None = None, progress: ShardProgress | None = None) -> Iterator[dict]:
    """Batch decoded samples; each batch carries the number of skipped samples since the previous one.

    A full batch is held until the next good sample (or the end) arrives, so skips at the very end of the
    stream are still attached to a batch. The sum is exact whenever the worker yields a batch, except for
    skips among a final incomplete batch dropped with partial=False, which are logged instead.
    With `progress` (training), batches hold `pacer.next_count()` images (or `batch_size`), report the shards
    done and the pass ends with an image-less record instead (see `_tracked_batches`).
    """
    if progress is not None:
        yield from _tracked_batches(samples, pacer.next_count if pacer else (lambda: batch_size), partial,
                                    progress)
        return
    held: tuple[list[_Decoded], int] | None = None
    batch: list[_Decoded] = []
    skipped = 0
    for sample in samples:
        if isinstance(sample, _Skipped):
            skipped += 1
            continue
        if held is not None:
            yield _collate(held[0], held[1] + skipped)
            held, skipped = None, 0
        batch.append(sample)
        if len(batch) == batch_size:
            held, batch, skipped = (batch, skipped), [], 0
    if held is not None:
        yield _collate(held[0], held[1] + skipped)
    elif batch and partial:
        yield _collate(batch, skipped)
    elif skipped:
        log.warning("%d skipped sample(s) at the end of the stream are in no batch's n_skipped", skipped)


def image_batches(
    urls: Sequence[str],
    transform: Callable[[PIL.Image.Image], torch.Tensor],
    batch_size: int,
    *,
    shuffle: int = 1000,
    shardshuffle: bool = True,
    seed: int = 0,
    resampled: bool = False,
    partial: bool = False,
    track: bool = False,
    pace: tuple[int, int] | None = None,
    skip_shards: Iterable[str] = (),
    skip_samples: dict[str, Iterable[str]] | None = None,
) -> wds.DataPipeline:
    """Build the per-worker pipeline: shards -> samples -> shuffle -> decode + transform -> batches.

    Batching happens inside the worker (use the result with DataLoader(batch_size=None)). Yields dicts
    {"images": [B,3,H,W], "labels": [B] (-1 without cls), "keys": ["shard.tar/key"], "n_skipped": scalar}.
    resampled=True samples shards with replacement forever (no split: each worker has its own seed).
    A worker that gets no shard yields nothing instead of raising.

    track=True (training) adds "shards_done", "shards_empty", "skipped_shards", "worker" and "end_of_pass" to
    every batch and ends each worker's pass with an image-less record. pace=(tokens_per_image,
    sae_batch_size) sizes batches with a `TokenPacer` (whole images; a batch may hold none) instead of
    `batch_size`. skip_shards are left out of the first pass, and so are skip_samples ({shard url: sample
    keys}) of the shards they name (a resume; not with resampled). Tracked batches also carry "delivered",
    the (shard url, sample key) of each image and each skipped sample.
    """
    urls = expand_shards(urls) if isinstance(urls, str) else list(urls)
    if resampled:
        stages: list = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls)]
        if shardshuffle:
            stages.append(_ShardPermutation(seed))
        skip = frozenset(skip_shards)
        if skip:
            stages.append(_ResumeFilter(skip))
        stages += [wds.split_by_node, wds.split_by_worker]
    progress = ShardProgress() if track else None
    stages.append(_ShardReader(progress, _LogAndContinue(), None if resampled else skip_samples))
    if shuffle > 0:
        stages.append(_SampleShuffle(shuffle, seed))
    stages.append(wds.pipelinefilter(decode_samples)(transform, RateLimitedWarning(log, "skipped-sample")))
    pacer = TokenPacer(*pace) if pace is not None else None
    stages.append(wds.pipelinefilter(batch_with_skips)(batch_size, partial, pacer, progress))
    return wds.DataPipeline(*stages)


def image_loader(
    urls: Sequence[str],
    transform: Callable[[PIL.Image.Image], torch.Tensor],
    batch_size: int,
    *,
    num_workers: int = 4,
    pin_memory: bool = False,
    **pipeline_kwargs,
) -> DataLoader:
    """DataLoader over image_batches; batches are already formed in the workers (batch_size=None)."""
    urls = expand_shards(urls) if isinstance(urls, str) else list(urls)
    _, world_size, _, _ = wds.utils.pytorch_worker_info()
    readers = max(num_workers, 1) * world_size
    if not pipeline_kwargs.get("resampled") and len(urls) < readers:
        log.warning(
            "%d shard(s) for %d reader(s) (%d rank(s) x %d worker(s)): some workers get no shard and "
            "sit idle; write more, smaller shards or lower data.num_workers",
            len(urls), readers, world_size, max(num_workers, 1),
        )
    dataset = image_batches(urls, transform, batch_size, **pipeline_kwargs)
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )


def _read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def load_classnames(spec: str | None, shards: Sequence[str] | None = None) -> list[str] | None:
    """Class names indexed by label: "imagenet" (open_clip's), a text file, or the shards' classnames.txt.

    With spec None, only the directory of the first local shard is searched; None means "no names known".
    """
    if spec == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    if spec is not None:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"class-name file {spec!r} not found (expected 'imagenet' or a file)")
        return _read_lines(path)
    if isinstance(shards, str):
        shards = expand_shards(shards)
    local = [s for s in shards or [] if not _is_url(s)]
    if not local:
        return None
    candidate = Path(local[0]).parent / CLASSNAMES_FILE
    return _read_lines(candidate) if candidate.is_file() else None
