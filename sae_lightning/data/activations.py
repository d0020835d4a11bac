"""A DataModule that serves SAE batches from activations already in memory or on disk (no backbone).

It lets an SAE train on a cache of activations, or on synthetic ones with a known answer
(`sae_lightning.planted`), through the same LightningModule and the same shuffle buffer as the image
pipeline: the DataLoader yields chunks of rows, and `on_after_batch_transfer` pushes each chunk through
`ActivationStreamMixin._serve` on the training device, so batches (empty while the buffer fills, then
`{"activations": [N, d]}` plus one `init_activations`) are exactly what `ImageActivationDataModule` makes.
The rows repeat epoch after epoch, in a new order each epoch when `shuffle` is on.
File formats: docs/format-activations.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, Sampler

from sae_lightning.data.buffer import TokenPacer
from sae_lightning.data.datamodule import ActivationStreamMixin

ACTIVATIONS_KEY = "activations"
Rows = torch.Tensor | np.ndarray


def load_activations(path: str | Path) -> Rows:
    """[M, d] activations from .safetensors (key "activations"), .npy (memory-mapped) or .pt (weights_only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"activations file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors = load_file(str(path))
        if ACTIVATIONS_KEY not in tensors:
            raise KeyError(f"{path} has no {ACTIVATIONS_KEY!r} tensor; found {sorted(tensors)}.")
        rows: Rows = tensors[ACTIVATIONS_KEY]
    elif suffix == ".npy":
        rows = np.load(path, mmap_mode="r")  # rows are read on demand: the cache may exceed RAM
    elif suffix in (".pt", ".pth"):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        rows = loaded[ACTIVATIONS_KEY] if isinstance(loaded, dict) else loaded
    else:
        raise ValueError(f"{path}: unknown activations format {suffix!r}; use .safetensors, .npy or .pt.")
    return rows


class ChunkSampler(Sampler[torch.Tensor]):
    """Yields row-index chunks: a new seeded permutation each pass (or in order); a partial last chunk is dropped.

    With `batch_size` (the SAE batch) smaller than `chunk_size`, chunks are paced by a `TokenPacer`: after a
    chunk, empty index tensors follow until its surplus rows have been served, one SAE batch per item, so
    the buffer never holds more than a chunk beyond its capacity and nothing is dropped.
    """

    def __init__(self, n_rows: int, chunk_size: int, shuffle: bool = True, seed: int = 0,
                 batch_size: int | None = None):
        self.n_rows, self.chunk_size, self.shuffle, self.seed = n_rows, chunk_size, shuffle, seed
        self.batch_size = batch_size or chunk_size
        self.epoch = 0
        self._pacer = TokenPacer(chunk_size, self.batch_size)  # carries the surplus across passes

    @property
    def n_chunks(self) -> int:
        return self.n_rows // self.chunk_size

    def __len__(self) -> int:  # about: empty items depend on the surplus carried from the previous pass
        return -(-self.n_chunks * self.chunk_size // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.shuffle:
            order = torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.n_rows)
        self.epoch += 1
        chunks = order[: self.n_chunks * self.chunk_size].view(self.n_chunks, self.chunk_size)
        empty = torch.empty(0, dtype=torch.long)
        i = 0
        while i < self.n_chunks:
            if self._pacer.next_count():
                yield chunks[i]
                i += 1
            else:
                yield empty


class RowChunks(Dataset):
    """Fancy-indexes a chunk of rows in one call (a tensor, or a memory-mapped array read in row order)."""

    def __init__(self, rows: Rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        if index.numel() == 0:
            return torch.empty(0, self.rows.shape[1], dtype=torch.float32)
        if isinstance(self.rows, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(self.rows[np.sort(index.numpy())]))
        return self.rows[index]


class ActivationsDataModule(ActivationStreamMixin, LightningDataModule):
    """[M, d] activations (a tensor or a file) -> chunks -> shuffle buffer on the device -> SAE batches.

    `chunk_size` (default: `sae_batch_size`) is how many rows one DataLoader item carries; the buffer
    serves one SAE batch per item and keeps the surplus of a larger chunk for the next items (which then
    carry no rows), as it does for the tokens of an image batch: no row is dropped.
    """

    def __init__(self, activations: torch.Tensor | np.ndarray | str | Path, sae_batch_size: int = 1024,
                 buffer_size: int = 15360, chunk_size: int | None = None, shuffle: bool = True,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        rows = activations if isinstance(activations, (torch.Tensor, np.ndarray)) else load_activations(activations)
        if rows.ndim != 2:
            raise ValueError(f"activations must be a 2-D [M, d] array, got shape {tuple(rows.shape)}.")
        self.chunk_size = chunk_size or sae_batch_size
        if self.chunk_size < sae_batch_size:
            raise ValueError(f"chunk_size ({self.chunk_size}) must be at least sae_batch_size ({sae_batch_size}).")
        if rows.shape[0] < self.chunk_size:
            raise ValueError(f"{rows.shape[0]} activations are fewer than one chunk ({self.chunk_size}).")
        self.rows = rows
        self.shuffle, self.num_workers, self.seed = shuffle, num_workers, seed
        self._init_stream(sae_batch_size, buffer_size, seed)

    @property
    def d_in(self) -> int:
        return int(self.rows.shape[1])

    def train_dataloader(self) -> DataLoader:
        # A new order per epoch and per resume point, still reproducible from `seed`.
        offset = 7919 * self.trainer.current_epoch + self.trainer.global_step if self.trainer is not None else 0
        sampler = ChunkSampler(len(self.rows), self.chunk_size, self.shuffle, self.seed + offset, self.sae_batch_size)
        return DataLoader(RowChunks(self.rows), sampler=sampler, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> dict[str, torch.Tensor]:
        """Serve an SAE batch from the buffer, on the device the chunk landed on."""
        return self._serve(batch.float())

    def state_dict(self) -> dict[str, Any]:
        return {"activations_seen": self.activations_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.activations_seen = state_dict.get("activations_seen", 0)
