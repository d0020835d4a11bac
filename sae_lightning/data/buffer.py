"""On-device shuffle buffer that mixes activations from many image batches into SAE batches.

Consecutive images from a shard are correlated (and a class token batch holds one vector per image), so
the SAE never sees a raw backbone batch. The buffer holds `capacity` activations (seed: 15,360). While it
fills, nothing comes out. Once full, each push of M >= N new activations returns N activations drawn
uniformly at random from the buffer, and the new ones take their places (the M - N surplus, fewer than one
image's tokens by construction, is dropped at random). Every activation therefore leaves the buffer after
a geometric number of steps with mean capacity / N, mixed with everything around it.
"""

from __future__ import annotations

import torch


class ShuffleBuffer:
    """Random-replacement buffer: push image-batch activations, pop uniformly mixed SAE batches."""

    def __init__(self, capacity: int, batch_size: int, seed: int = 0):
        if capacity < batch_size:
            raise ValueError(f"buffer capacity ({capacity}) must be at least the SAE batch size ({batch_size}).")
        self.capacity = capacity
        self.batch_size = batch_size
        self.seed = seed
        self._store: torch.Tensor | None = None
        self._filled = 0
        self._generator: torch.Generator | None = None

    @property
    def full(self) -> bool:
        return self._filled >= self.capacity

    def contents(self) -> torch.Tensor:
        """The activations currently held (for b_dec initialisation from the first full buffer)."""
        if self._store is None:
            raise RuntimeError("The buffer is empty.")
        return self._store[: self._filled]

    def _randperm(self, n: int, device: torch.device) -> torch.Tensor:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return torch.randperm(n, device=device, generator=self._generator)

    def push(self, activations: torch.Tensor) -> torch.Tensor | None:
        """Add [M, d] activations; returns an [N, d] SAE batch once the buffer is full, else None."""
        activations = activations.detach()
        if self._store is None:
            self._store = activations.new_empty(self.capacity, activations.shape[-1])
        if not self.full:
            take = min(self.capacity - self._filled, activations.shape[0])
            self._store[self._filled: self._filled + take] = activations[:take]
            self._filled += take
            activations = activations[take:]
            if not self.full or activations.shape[0] < self.batch_size:
                return None
        if activations.shape[0] < self.batch_size:
            raise ValueError(
                f"pushed {activations.shape[0]} activations into a full buffer that serves batches of "
                f"{self.batch_size}: each image batch must yield at least one SAE batch."
            )
        if activations.shape[0] > self.batch_size:
            keep = self._randperm(activations.shape[0], activations.device)[: self.batch_size]
            activations = activations[keep]
        slots = self._randperm(self.capacity, activations.device)[: activations.shape[0]]
        out = self._store[slots].clone()
        self._store[slots] = activations
        return out

    def reset(self) -> None:
        """Forget everything (a new stream, e.g. after resuming)."""
        self._store, self._filled, self._generator = None, 0, None
