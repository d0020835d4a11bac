"""On-device shuffle buffer that mixes activations from many image batches into SAE batches.

Consecutive images from a shard are correlated (and a class token batch holds one vector per image), so
the SAE never sees a raw backbone batch. The buffer holds `capacity` activations (seed: 15,360). While it
fills, nothing comes out. Once full, each call serves at most one SAE batch of N activations: the N oldest
*pending* activations (those pushed beyond the capacity, kept in arrival order) take the places of N
activations drawn uniformly at random from the buffer, and those N come out. Every activation therefore
leaves the buffer after a geometric number of steps with mean capacity / N, mixed with everything around it.

Nothing is dropped: whatever was pushed and not yet served stays pending, whole images included (an image's
257 tokens with N = 128 come out over two or three SAE batches). `TokenPacer` sizes the producer's batches
so that, on average, exactly N activations arrive per served batch and the pending queue stays below
N + one batch of images; a push may therefore carry zero images, which serves from the pending queue.
"""

from __future__ import annotations

import torch


class TokenPacer:
    """How many whole items (images, or row chunks) the next producer batch carries, so SAE batches never starve.

    Each item yields `tokens_per_item` activations; the consumer takes `batch_size` per step. The k-th call
    returns the smallest count that brings the running total to at least k * batch_size activations (so it
    can be 0 when the surplus of earlier items already covers a batch). E.g. 257 tokens, batch 128:
    1, 0, 1, 0, ... with one extra 1 every 128 calls. Totals never fall behind and lead by < one item.
    """

    def __init__(self, tokens_per_item: int, batch_size: int):
        if tokens_per_item <= 0 or batch_size <= 0:
            raise ValueError(f"tokens_per_item ({tokens_per_item}) and batch_size ({batch_size}) must be positive.")
        self.tokens_per_item, self.batch_size = tokens_per_item, batch_size
        self.calls = 0
        self.tokens = 0

    def next_count(self) -> int:
        self.calls += 1
        need = self.calls * self.batch_size - self.tokens
        count = max(0, -(-need // self.tokens_per_item))
        self.tokens += count * self.tokens_per_item
        return count


class ShuffleBuffer:
    """Random-replacement buffer: push image-batch activations, pop uniformly mixed SAE batches. Loses nothing."""

    def __init__(self, capacity: int, batch_size: int, seed: int = 0):
        if capacity < batch_size:
            raise ValueError(f"buffer capacity ({capacity}) must be at least the SAE batch size ({batch_size}).")
        self.capacity = capacity
        self.batch_size = batch_size
        self.seed = seed
        self._store: torch.Tensor | None = None
        self._filled = 0
        self._pending: list[torch.Tensor] = []
        self._n_pending = 0  # host-side count: no device sync to know whether a batch can be served
        self._generator: torch.Generator | None = None

    @property
    def full(self) -> bool:
        return self._filled >= self.capacity

    @property
    def n_pending(self) -> int:
        """Activations pushed beyond the capacity and not yet served."""
        return self._n_pending

    @property
    def n_held(self) -> int:
        """Every activation pushed and not yet served (the buffer and the pending queue)."""
        return self._filled + self._n_pending

    def contents(self) -> torch.Tensor:
        """The [filled, d] activations in the buffer (for b_dec initialisation from the first full buffer)."""
        if self._store is None:
            raise RuntimeError("The buffer is empty.")
        return self._store[: self._filled]

    def pending(self) -> torch.Tensor:
        """The [n_pending, d] activations waiting to enter the buffer, oldest first."""
        if not self._pending:
            width = self._store.shape[-1] if self._store is not None else 0
            return torch.empty(0, width)
        return torch.cat(self._pending)

    def _randperm(self, n: int, device: torch.device) -> torch.Tensor:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return torch.randperm(n, device=device, generator=self._generator)

    def _take_pending(self, n: int) -> torch.Tensor:
        taken, need = [], n
        while need:
            head = self._pending[0]
            if head.shape[0] <= need:
                taken.append(self._pending.pop(0))
                need -= head.shape[0]
            else:
                taken.append(head[:need])
                self._pending[0] = head[need:]
                need = 0
        self._n_pending -= n
        return taken[0] if len(taken) == 1 else torch.cat(taken)

    def push(self, activations: torch.Tensor) -> torch.Tensor | None:
        """Add [M, d] activations (M may be 0); returns an [N, d] SAE batch when one can be served, else None."""
        activations = activations.detach()
        if self._store is None:
            if activations.shape[0] == 0 and activations.ndim < 2:
                return None
            self._store = activations.new_empty(self.capacity, activations.shape[-1])
        if not self.full:
            take = min(self.capacity - self._filled, activations.shape[0])
            self._store[self._filled: self._filled + take] = activations[:take]
            self._filled += take
            activations = activations[take:]
        if activations.shape[0]:
            self._pending.append(activations)
            self._n_pending += activations.shape[0]
        if not self.full or self._n_pending < self.batch_size:
            return None
        incoming = self._take_pending(self.batch_size).to(self._store.device)
        slots = self._randperm(self.capacity, self._store.device)[: self.batch_size]
        out = self._store[slots].clone()
        self._store[slots] = incoming
        return out

    def reset(self) -> None:
        """Forget everything (a new stream, e.g. after resuming)."""
        self._store, self._filled, self._generator = None, 0, None
        self._pending, self._n_pending = [], 0
