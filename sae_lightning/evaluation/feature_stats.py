"""Streaming per-feature statistics over an image stream (one pass, memory O(F * k), not O(N)).

Per feature: token density, image density, mean activation when firing, the top-k images (by the image's
activation: the max over its hooked tokens, so cls runs use the token itself) with their stream indices and
labels, the mean of those top activations, and the activation-weighted label entropy of the top images.

Label entropy, the seed's way: over the top-k images when at least k fired, else over all images that
fired (which are then exactly the filled top-k slots), so it is undefined only for a feature that never
fired; `label_entropy_images` is the number of images it used. `label_entropy_top_k` is the strict value,
defined only when at least k images fired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FeatureStats:
    """Final per-feature table; padding is -inf (values) / -1 (indices, labels), undefined floats are NaN."""

    density: Tensor  # [F] fraction of hooked tokens with f > 0
    image_density: Tensor  # [F] fraction of images with f > 0 on at least one hooked token
    mean_activation: Tensor  # [F] mean of f over tokens where f > 0 (NaN if it never fires)
    top_values: Tensor  # [F, k] per-image activations, descending
    top_indices: Tensor  # [F, k] stream index of the image (0 .. n_images-1)
    top_labels: Tensor  # [F, k] label of the image
    mean_top_activation: Tensor  # [F] mean over the (at most k) top images that fired (NaN if none)
    label_entropy: Tensor  # [F] nats, the seed's: top-k images, or all that fired if fewer; NaN if none
    label_entropy_images: Tensor  # [F] int64: images label_entropy used, min(k, images that fired)
    label_entropy_top_k: Tensor  # [F] nats, strict: NaN where fewer than k images fired
    n_images: int
    n_tokens: int

    @property
    def k(self) -> int:
        return self.top_values.shape[1]

    @property
    def n_features(self) -> int:
        return self.density.shape[0]

    @property
    def entropy_defined(self) -> Tensor:
        """[F] bool: the seed's label entropy is defined (the feature fired on at least one image)."""
        return self.label_entropy_images > 0


def label_entropy(values: Tensor, labels: Tensor, chunk: int = 8192) -> Tensor:
    """Entropy (nats) of p(label) proportional to the summed activation of that label's images, per row.

    values, labels: [F, k]. Entries with value <= 0 (padding) carry no mass. Computed without a class axis:
    with V the row total and m_j the mass of entry j's label, H = -sum_j (v_j / V) log(m_j / V), O(F k^2).
    Rows with no mass give NaN.
    """
    out = torch.empty(values.shape[0], dtype=torch.float32, device=values.device)
    for start in range(0, values.shape[0], chunk):
        v = values[start : start + chunk].float().clamp_min(0.0)
        lab = labels[start : start + chunk]
        same = lab.unsqueeze(2) == lab.unsqueeze(1)  # [c, k, k]
        mass = (same * v.unsqueeze(1)).sum(2)  # [c, k]: mass of entry j's label
        total = v.sum(1, keepdim=True)
        p_entry = v / total
        p_label = mass / total
        terms = torch.where(v > 0, p_entry * torch.log(p_label.clamp_min(1e-30)), torch.zeros_like(v))
        h = -terms.sum(1)
        out[start : start + chunk] = torch.where(total.squeeze(1) > 0, h.clamp_min(0.0), math.nan)
    return out


class FeatureStatsAccumulator:
    """Accumulates feature statistics batch by batch on the device of the activations.

    The top-k buffers are stored [k, F] so each merge is one `torch.topk` along dim 0 of the concat of the
    running buffer and the batch's [B, F] image activations: no transposes, linear in F (65,536 is fine).
    """

    def __init__(self, n_features: int, k: int, device: torch.device | str = "cpu") -> None:
        self.n_features, self.k = n_features, k
        dev = torch.device(device)
        self.fire_count = torch.zeros(n_features, dtype=torch.long, device=dev)
        self.image_fire_count = torch.zeros(n_features, dtype=torch.long, device=dev)
        self.act_sum = torch.zeros(n_features, dtype=torch.float64, device=dev)
        self.top_values = torch.full((k, n_features), -math.inf, device=dev)
        self.top_indices = torch.full((k, n_features), -1, dtype=torch.long, device=dev)
        self.top_labels = torch.full((k, n_features), -1, dtype=torch.long, device=dev)
        self.n_images = 0
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, acts: Tensor, labels: Tensor, indices: Tensor) -> None:
        """Add images. acts: [B, F] (one token per image) or [B, T, F]; labels, indices: [B]."""
        if acts.dim() == 2:
            acts = acts.unsqueeze(1)
        b, t, f = acts.shape
        if f != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {f}")
        dev = self.top_values.device
        acts = acts.to(dev)
        fired = acts > 0
        self.fire_count += fired.sum((0, 1))
        self.act_sum += acts.sum((0, 1)).double()  # float64 across batches, no float64 copy of acts
        per_image = acts.amax(1).float()  # [B, F]: image activation = max over its tokens
        image_fired = per_image > 0
        self.image_fire_count += image_fired.sum(0)
        self.n_images += b
        self.n_tokens += b * t

        cand = torch.where(image_fired, per_image, -math.inf)
        values, pos = torch.topk(torch.cat([self.top_values, cand]), self.k, dim=0)
        idx = torch.cat([self.top_indices, indices.to(dev, torch.long).unsqueeze(1).expand(b, f)])
        lab = torch.cat([self.top_labels, labels.to(dev, torch.long).unsqueeze(1).expand(b, f)])
        empty = values == -math.inf
        self.top_values = values
        self.top_indices = idx.gather(0, pos).masked_fill(empty, -1)
        self.top_labels = lab.gather(0, pos).masked_fill(empty, -1)

    def referenced_indices(self) -> Tensor:
        """Stream indices still present in some feature's top-k (at most min(N, F * k))."""
        idx = torch.unique(self.top_indices)
        return idx[idx >= 0]

    def compute(self) -> FeatureStats:
        """Final table (on the accumulator's device, top-k transposed to [F, k])."""
        top_values = self.top_values.T.contiguous()
        fired_top = top_values > -math.inf
        n_top = fired_top.sum(1)
        top_sum = torch.where(fired_top, top_values, 0.0).sum(1)
        entropy = label_entropy(torch.where(fired_top, top_values, 0.0), self.top_labels.T)
        strict = self.image_fire_count >= self.k
        return FeatureStats(
            density=self.fire_count.double().div(max(self.n_tokens, 1)).float(),
            image_density=self.image_fire_count.double().div(max(self.n_images, 1)).float(),
            mean_activation=(self.act_sum / self.fire_count).float(),  # 0/0 -> NaN for never-firing
            top_values=top_values,
            top_indices=self.top_indices.T.contiguous(),
            top_labels=self.top_labels.T.contiguous(),
            mean_top_activation=torch.where(n_top > 0, top_sum / n_top.clamp_min(1), math.nan),
            label_entropy=torch.where(n_top > 0, entropy, math.nan),
            label_entropy_images=n_top.long(),
            label_entropy_top_k=torch.where(strict, entropy, math.nan),
            n_images=self.n_images,
            n_tokens=self.n_tokens,
        )


class KeyTable:
    """Maps stream index -> sample key for the images still referenced by some top-k list.

    Keys are strings, so they live beside the tensors; the table is pruned to the referenced indices
    whenever it doubles, which keeps it within min(N, F * k) entries (amortised cost per image O(1)).
    """

    def __init__(self) -> None:
        self.keys: dict[int, str] = {}
        self._prune_at = 1 << 16

    def add(self, start: int, keys: list[str], stats: FeatureStatsAccumulator) -> None:
        self.keys.update(zip(range(start, start + len(keys)), keys))
        if len(self.keys) > self._prune_at:
            self.prune(stats)
            self._prune_at = max(1 << 16, 2 * len(self.keys))

    def prune(self, stats: FeatureStatsAccumulator) -> None:
        keep = stats.referenced_indices().tolist()
        self.keys = {i: self.keys[i] for i in keep}
