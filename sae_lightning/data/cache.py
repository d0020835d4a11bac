"""`data=cache`: SAE batches from an activation cache written by `python cache.py` (no backbone).

The cache's rows are cut into blocks of `block_rows` rows (never across files). Each epoch the blocks are
drawn in a seeded permutation; `window_blocks` consecutive blocks of it (from any files) are loaded together
and their rows permuted, and the epoch's stream is these permuted windows one after another. The stream of
SAE batches is every `sae_batch_size` rows of it, epoch after epoch, with nothing dropped (a batch may take
the end of one window and the start of the next). At most one window plus one batch of rows is in memory.

Why no on-device shuffle buffer here: the image path's buffer draws from a device RNG and holds 15,360
activations, so replaying it would mean checkpointing its contents. The cache path instead makes the whole
batch sequence a pure function of (seed, rank, world size, position in rows): the window permutation is the
shuffle, the checkpoint stores only the position, and a resumed run rebuilds exactly the batches the
interrupted one would have seen. Each DDP rank reads its own share of every epoch's blocks (rank r takes
blocks r, r + world_size, ... of the permutation).

With W > 1 DataLoader workers, each reads only its own part of every epoch: the rank's epoch row stream is
cut into W contiguous pieces of (nearly) equal rows, and worker w takes piece (w + epoch) mod W (the pieces
rotate, so over W epochs every worker serves the same number of rows). A worker loads only the windows its
piece overlaps (a window across a piece boundary is loaded by both neighbours: at most W - 1 extra windows
per epoch) and cuts its pieces, epoch after epoch, into batches. The DataLoader serves the workers' batches
round-robin, so batch k of the rank's sequence is batch k // W of worker k mod W: still a pure function of
(seed, settings, W, batch size, position), and a resume at batch K gives loader worker j the role of worker
(K + j) mod W. Format and knobs: docs/format-activations.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from safetensors import SafetensorError, safe_open
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sae_lightning.data.cache_format import CacheError, check_cache, read_manifest

log = logging.getLogger(__name__)

POSITION_VERSION = 1
# What makes two runs' batch streams the same: a resume that changes any of these is not exact (and, with more
# than one worker, the batch size). A checkpoint without "workers" was written when every worker count gave the
# one-worker stream, so it counts as workers=1.
STREAM_KEYS = ("seed", "shuffle", "block_rows", "window_blocks", "world_size", "workers", "config_hash",
               "total_rows")


def _generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from the parts (numpy's SeedSequence: stable across versions and platforms)."""
    seed = int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0])
    return torch.Generator().manual_seed(seed >> 1)


class CacheStream(IterableDataset):
    """An endless stream of `{"activations": [N, d]}` batches (storage dtype) from a cache's shard files.

    With `workers` = 1, batch k of rank `rank` holds rows [start_row + k N, start_row + (k + 1) N) of that
    rank's stream; with W = `workers` > 1 (the DataLoader's num_workers, which must then match), batch k is
    batch k // W of worker k mod W, each worker serving its own pieces of every epoch (module docstring), and
    `start_row` must be a whole number of batches. `batches()` is the rank's sequence in this process; in a
    DataLoader each worker yields its own batches and the loader's round-robin order is the same sequence.
    With `init_rows`, the first batch also carries `init_activations`, the rank stream's first `init_rows` rows
    (b_dec initialisation). `max_resident` records the most rows held at once (one window plus the part of a
    batch gathered so far) in the process that iterates; `rows_loaded` counts the rows it read from files.
    """

    def __init__(self, files: list[str], rows: list[int], batch_size: int, block_rows: int, window_blocks: int,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, start_row: int = 0,
                 init_rows: int = 0, workers: int = 1):
        self.files, self.batch_size, self.window_blocks = files, batch_size, window_blocks
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.start_row, self.init_rows, self.workers = start_row, init_rows, max(1, workers)
        self.blocks = [(f, a, min(a + block_rows, n)) for f, n in enumerate(rows) for a in range(0, n, block_rows)]
        if len(self.blocks) < world_size:
            raise CacheError(f"the cache has {len(self.blocks)} block(s) of data.block_rows={block_rows} rows for "
                             f"{world_size} processes: lower data.block_rows so every rank gets rows.")
        if self.workers > 1 and sum(rows) < world_size * self.workers * batch_size:
            raise CacheError(f"the cache's {sum(rows)} rows are less than one batch of {batch_size} per DataLoader "
                             f"worker ({self.workers}) and rank ({world_size}): lower data.num_workers.")
        if self.workers > 1 and start_row % batch_size:
            raise CacheError(f"resuming at row {start_row} of the cache stream, which is not a whole number of "
                             f"batches of sae_batch_size={batch_size}: with data.num_workers={self.workers} the "
                             f"batch sequence is cut per worker in batches, so this resume cannot continue it "
                             f"exactly. Resume with the sae_batch_size the run was trained with.")
        self.max_resident = 0
        self.rows_loaded = 0

    def epoch_blocks(self, epoch: int) -> list[int]:
        """This rank's blocks in epoch `epoch`, in the order they are read."""
        n = len(self.blocks)
        order = torch.randperm(n, generator=_generator(self.seed, epoch)) if self.shuffle else torch.arange(n)
        return order[self.rank::self.world_size].tolist()

    def windows(self, epoch: int) -> list[list[int]]:
        blocks = self.epoch_blocks(epoch)
        return [blocks[i: i + self.window_blocks] for i in range(0, len(blocks), self.window_blocks)]

    def window_rows(self, window: list[int]) -> int:
        return sum(self.blocks[b][2] - self.blocks[b][1] for b in window)

    def window_order(self, epoch: int, index: int, n: int) -> torch.Tensor:
        """The permutation [n] of window `index`'s rows (identity without shuffle)."""
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=_generator(self.seed, epoch, index, self.rank))

    def row_ids(self, window: list[int]) -> torch.Tensor:
        """[n, 2] (file index, row in file) of a window's rows before permutation (for tests and tools)."""
        return torch.cat([torch.stack([torch.full((b - a,), f), torch.arange(a, b)], 1)
                          for f, a, b in (self.blocks[i] for i in window)])

    def load(self, window: list[int]) -> torch.Tensor:
        """The [n, d] rows of a window's blocks, read from their files (only those rows are read)."""
        parts = []
        for file_index, start, stop in (self.blocks[b] for b in window):
            path = self.files[file_index]
            try:
                with safe_open(path, framework="pt") as handle:
                    parts.append(handle.get_slice("activations")[start:stop])
                self.rows_loaded += stop - start
            except (SafetensorError, OSError) as err:
                raise CacheError(f"cache shard {path} cannot be read ({err}). Rerun the `python cache.py ...` "
                                 f"command that wrote the cache: it verifies the files and rewrites bad ones.") from err
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def piece(self, epoch: int, worker: int) -> tuple[int, int]:
        """Rows [lo, hi) of the rank's epoch `epoch` (its windows one after another) served by worker `worker`."""
        total = sum(self.window_rows(w) for w in self.windows(epoch))
        i = (worker + epoch) % self.workers
        return i * total // self.workers, (i + 1) * total // self.workers

    def segments(self, start_row: int, worker: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(window rows [n, d], the order of the rows still to serve) of worker `worker`'s stream (its pieces
        of every epoch, one after another), from its row `start_row` on; windows outside its pieces are not read."""
        epoch, offset = 0, start_row
        while True:
            lo, hi = self.piece(epoch, worker)
            if offset >= hi - lo:
                offset -= hi - lo
                epoch += 1
                continue
            begin, offset, at = lo + offset, 0, 0
            for index, window in enumerate(self.windows(epoch)):
                n = self.window_rows(window)
                a, b = max(begin, at), min(hi, at + n)
                if a < b:
                    data = self.load(window)
                    order = self.window_order(epoch, index, n)[a - at: b - at]
                    yield data, order
                    del data, order  # freed before the next window is read
                at += n
            epoch += 1

    def worker_start(self, worker: int) -> int:
        """Worker `worker`'s position in its own stream (rows) when the rank's sequence starts at `start_row`."""
        done = self.start_row // self.batch_size  # batches k < done were served, worker k mod W served batch k
        return max(0, -(-(done - worker) // self.workers)) * self.batch_size

    def worker_batches(self, worker: int) -> Iterator[torch.Tensor]:
        """Worker `worker`'s batches [N, d] from its `worker_start` on (workers = 1: the rank's whole sequence)."""
        segments = self.segments(self.worker_start(worker) if self.workers > 1 else self.start_row, worker)
        data = order = None
        offset = 0
        while True:
            parts, need = [], self.batch_size
            while need:
                if order is None or offset == len(order):
                    data = order = None
                    data, order = next(segments)
                    offset = 0
                take = min(need, len(order) - offset)
                parts.append(data[order[offset: offset + take]])
                offset += take
                need -= take
                self.max_resident = max(self.max_resident, len(data) + sum(len(p) for p in parts))
            yield parts[0] if len(parts) == 1 else torch.cat(parts)

    def first_worker(self) -> int:
        """The worker that serves the first batch from `start_row` (DataLoader worker j plays worker first + j)."""
        return (self.start_row // self.batch_size) % self.workers

    def batches(self) -> Iterator[torch.Tensor]:
        """The rank's batches from `start_row` on, in this process: the workers' batches round-robin."""
        streams = [self.worker_batches((self.first_worker() + j) % self.workers) for j in range(self.workers)]
        while True:
            for stream in streams:
                yield next(stream)

    def first_rows(self, n: int) -> torch.Tensor:
        """The stream's first `n` rows [n, d], or its first epoch's rows if that holds fewer."""
        windows = self.windows(0)  # the rank's first epoch, whatever the workers
        out, need = [], min(n, sum(self.window_rows(w) for w in windows))
        for index, window in enumerate(windows):
            rows = self.window_rows(window)
            take = min(need, rows)
            out.append(self.load(window)[self.window_order(0, index, rows)[:take]])
            need -= take
            if not need:
                break
        return torch.cat(out)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        if info is None:  # in the training process: the whole sequence
            loader_worker, batches = 0, self.batches()
        else:
            if info.num_workers != self.workers:
                raise CacheError(f"a cache stream made for {self.workers} DataLoader worker(s) is read by "
                                 f"{info.num_workers}: make it with workers=num_workers (CacheDataModule does).")
            loader_worker = info.id
            batches = self.worker_batches((self.first_worker() + info.id) % self.workers)
        for k, rows in enumerate(batches):
            batch = {"activations": rows}
            if k == 0 and loader_worker == 0 and self.init_rows and self.start_row == 0:
                batch["init_activations"] = self.first_rows(self.init_rows)
            yield batch


class CacheDataModule(LightningDataModule):
    """An activation cache directory -> seeded cross-shard shuffle -> SAE batches `{"activations": [N, d]}`.

    `buffer_size` rows of the stream's start go to the module once, as `init_activations` (b_dec
    initialisation, as the image path's first full buffer). `verify` checks every file's sha256 at start
    (reads the whole cache); sizes are always checked. `state_dict` holds the position in rows, so a
    resumed run continues the same batch sequence exactly (module docstring).
    """

    def __init__(self, path: str | Path | None, sae_batch_size: int = 1024, buffer_size: int = 15360,
                 block_rows: int = 2048, window_blocks: int = 32, shuffle: bool | int = True, num_workers: int = 1,
                 pin_memory: bool = False, verify: bool = False, seed: int = 0):
        super().__init__()
        for name, value, low in (("sae_batch_size", sae_batch_size, 1), ("buffer_size", buffer_size, 0),
                                 ("block_rows", block_rows, 1), ("window_blocks", window_blocks, 1),
                                 ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{name}={value!r}: must be an integer >= {low}.")
        if not path:
            raise CacheError("data.path is not set: point it at a directory written by `python cache.py`, e.g. "
                             "python train.py data=cache data.path=data/cache (or export SAE_CACHE=...).")
        self.path = Path(str(path)).expanduser().resolve()
        self.manifest = read_manifest(self.path)
        check_cache(self.path, self.manifest, full=verify)
        self.sae_batch_size, self.buffer_size = sae_batch_size, buffer_size
        self.block_rows, self.window_blocks = block_rows, window_blocks
        self.shuffle, self.num_workers, self.pin_memory, self.seed = bool(shuffle), num_workers, pin_memory, seed
        self.files = [str(self.path / s["file"]) for s in self.manifest["shards"]]
        self.rows = [int(s["rows"]) for s in self.manifest["shards"]]
        self.rows_served = 0  # this rank's position in its stream: rows handed to training steps
        self.activations_seen = 0
        self.stream: CacheStream | None = None
        if buffer_size > self.manifest["total_rows"]:
            log.warning("data.buffer_size=%d is more than the cache's %d rows: b_dec is initialised from all of "
                        "them.", buffer_size, self.manifest["total_rows"])

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def tokens_per_image(self) -> int:
        return int(self.manifest["tokens_per_image"])

    @property
    def layer(self) -> int:
        return int(self.manifest["layer"])

    @property
    def tokens(self) -> str:
        return str(self.manifest["tokens"])

    @property
    def images_seen(self) -> int:
        """Activations seen, in images' worth (rows of one image are spread over many batches)."""
        return self.activations_seen // self.tokens_per_image

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def stream_settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "shuffle": self.shuffle, "block_rows": self.block_rows,
                "window_blocks": self.window_blocks, "world_size": self._world()[1],
                "workers": max(1, self.num_workers), "batch_size": self.sae_batch_size,
                "config_hash": self.manifest["config_hash"], "total_rows": self.manifest["total_rows"]}

    def make_stream(self, start_row: int = 0, rank: int = 0, world_size: int = 1) -> CacheStream:
        return CacheStream(self.files, self.rows, self.sae_batch_size, self.block_rows, self.window_blocks,
                           self.shuffle, self.seed, rank, world_size, start_row,
                           self.buffer_size if start_row == 0 else 0, workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._world()
        self.stream = self.make_stream(self.rows_served, rank, world_size)
        if self.rows_served:
            log.info("Resuming the cache stream at row %d of rank %d (%d epochs of its rows).", self.rows_served,
                     rank, self.rows_served // max(1, self.manifest["total_rows"] // world_size))
        return DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=False)

    def on_after_batch_transfer(self, batch: dict[str, torch.Tensor], dataloader_idx: int) -> dict[str, torch.Tensor]:
        """Rows to fp32 on the device they landed on; count them (this batch is the one trained next)."""
        x = batch["activations"].float()
        self.rows_served += x.shape[0]
        self.activations_seen += x.shape[0]
        out = {"activations": x}
        if "init_activations" in batch:
            out["init_activations"] = batch["init_activations"].float()
        return out

    def sae_metadata(self) -> dict[str, Any]:
        """Where the SAE's inputs came from, for its cfg.json (as the image path writes it, from the manifest)."""
        m = self.manifest
        return {"backbone": m["model"], "pretrained": m["pretrained"], "layer": m["layer"], "tokens": m["tokens"],
                "tokens_per_image": m["tokens_per_image"], "dataset": str(self.path), "cache_hash": m["config_hash"]}

    def cache_identity(self) -> dict[str, Any]:
        keys = ("model", "pretrained", "layer", "tokens", "d_in", "config_hash")
        return {k: self.manifest.get(k) for k in keys}

    def state_dict(self) -> dict[str, Any]:
        return {"version": POSITION_VERSION, "rows_served": self.rows_served,
                "activations_seen": self.activations_seen, "stream": self.stream_settings(),
                "cache": self.cache_identity()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != POSITION_VERSION:
            raise ValueError(f"checkpoint cache position version {state_dict.get('version')!r} is not "
                             f"{POSITION_VERSION}: written by another version of sae_lightning.")
        self.rows_served = int(state_dict["rows_served"])
        self.activations_seen = int(state_dict.get("activations_seen", self.rows_served))
        old, new = dict(state_dict.get("stream", {})), self.stream_settings()
        old.setdefault("workers", 1)  # written before workers split the epoch: every count gave this stream
        keys = STREAM_KEYS + (("batch_size",) if new["workers"] > 1 else ())
        changed = {k: (old.get(k), new[k]) for k in keys if old.get(k) != new[k]}
        if changed:
            log.warning("Resuming at row %d with a different stream (%s): the batches from here differ from the "
                        "ones the interrupted run would have seen (not an exact resume).", self.rows_served,
                        ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))

    def check_resume(self, ckpt_path: str | Path) -> None:
        """Refuse a checkpoint whose SAE was trained on other activations than this cache's (CacheError)."""
        problem = resume_problem(self.path, self.manifest, ckpt_path)
        if problem:
            raise CacheError(problem)


def resume_problem(path: Path, manifest: dict[str, Any], ckpt_path: str | Path, workers: int = 1,
                   batch_size: int = 1) -> str | None:
    """What makes `ckpt_path`'s SAE unfit to continue on the cache at `path` (another d_in, model or layer), or
    its position unfit for `workers` > 1 DataLoader workers (not a whole number of `batch_size` batches)."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    saved = state.get(CacheDataModule.__qualname__) or {}
    position = saved.get("rows_served")
    # each of W workers reads its own piece of every epoch: resumed mid-stream with another W, the rest of the
    # epoch would serve some rows twice and others never (a checkpoint without "workers" read as one worker)
    old_workers = int((saved.get("stream") or {}).get("workers", 1))
    if position and old_workers != max(1, workers):
        return (f"ckpt_path={str(ckpt_path)!r} stopped at row {int(position)} of the cache stream as read by "
                f"data.num_workers={old_workers} (0 and 1 read alike); each worker reads its own part of every "
                f"epoch, so with data.num_workers={workers} the rest of this epoch would repeat some rows and skip "
                f"others. Resume with data.num_workers={old_workers}.")
    if workers > 1 and position is not None and int(position) % batch_size:
        return (f"ckpt_path={str(ckpt_path)!r} stopped at row {int(position)} of the cache stream, which is not a "
                f"whole number of batches of sae_batch_size={batch_size}: with data.num_workers={workers} the "
                f"batch sequence is cut per worker in batches, so it cannot be continued exactly. Resume with the "
                f"sae_batch_size the run was trained with.")
    d_ins = {int(v.shape[0]) for k, v in state.get("state_dict", {}).items() if k.endswith("W_enc")}
    if d_ins and d_ins != {manifest["d_in"]}:
        return (f"ckpt_path={str(ckpt_path)!r} holds an SAE trained on d_in={sorted(d_ins)[0]} activations, but "
                f"data.path={str(path)!r} holds d={manifest['d_in']} ({manifest['model']} layer {manifest['layer']}, "
                f"{manifest['tokens']} tokens). Resume with the cache the run was trained on, or start a new run.")
    old = (state.get(CacheDataModule.__qualname__) or {}).get("cache")
    if old:
        changed = [f"{k}: {old.get(k)!r} in the checkpoint, {manifest.get(k)!r} now"
                   for k in ("model", "pretrained", "layer", "tokens") if old.get(k) != manifest.get(k)]
        if changed:
            return (f"data.path={str(path)!r} holds activations of another model or layer than the run in "
                    f"{ckpt_path} was trained on ({'; '.join(changed)}). Resume with the cache the run was trained "
                    f"on, or start a new run.")
    return None


def cache_problems(cfg: Any) -> list[str]:
    """`validate_train_config`'s checks for data=cache, before any work: the backbone is dropped, the cache is
    complete and matches its manifest (sizes), and a resumed checkpoint was trained on the same activations."""
    from omegaconf import OmegaConf

    problems = []
    for key, low in (("block_rows", 1), ("window_blocks", 1), ("num_workers", 0)):
        value = OmegaConf.select(cfg, f"data.{key}", default=None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            problems.append(f"data.{key}={value!r}: must be an integer >= {low}")
    if cfg.get("backbone") is not None:
        problems.append("data=cache trains from stored activations without a backbone, but a backbone is selected "
                        "(experiment=demo picks one): add '~backbone' to the command")
    path = OmegaConf.select(cfg, "data.path", default=None)
    if not path:
        return [*problems, "data.path=None: point it at a directory written by `python cache.py` (data.path=<dir>)"]
    try:
        manifest = read_manifest(path)
        check_cache(path, manifest, full=bool(OmegaConf.select(cfg, "data.verify", default=False)))
    except CacheError as err:
        return [*problems, str(err)]
    if cfg.get("ckpt_path"):
        from sae_lightning.training import resolve_checkpoint

        try:
            ckpt = resolve_checkpoint(cfg, Path(cfg.paths.output_dir))
        except FileNotFoundError:
            ckpt = None  # train() names the missing checkpoint
        workers = OmegaConf.select(cfg, "data.num_workers", default=1)
        batch_size = OmegaConf.select(cfg, "data.sae_batch_size", default=None) or cfg.get("sae_batch_size") or 1
        problem = resume_problem(Path(path).expanduser().resolve(), manifest, ckpt, workers=int(workers or 1),
                                 batch_size=int(batch_size)) if ckpt else None
        if problem:
            problems.append(problem)
    return problems
