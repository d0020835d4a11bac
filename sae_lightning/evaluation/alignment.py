"""Neuron alignment: true cosines between SAE encoder vectors and the hooked block's MLP out vectors.

Every vector is normalised (the seed normalised the encoder along the wrong axis). The baseline is as many
standard Gaussian vectors as features analysed; a feature is aligned to a neuron when their cosine exceeds
the largest max-cosine any baseline vector reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.functional import normalize


@dataclass
class AlignmentResult:
    max_cosine: Tensor  # [n] per analysed feature: max cosine over MLP neurons
    aligned_counts: Tensor  # [n] number of neurons with cosine > threshold
    baseline_max_cosine: Tensor  # [n] the same max for each random vector
    threshold: float  # max of baseline_max_cosine


def max_cosine(vectors: Tensor, neurons: Tensor, threshold: float | None = None, chunk: int = 4096):
    """Per row of `vectors` [n, d]: max cosine to the rows of `neurons` [H, d] and, given a threshold,
    the count of neurons above it. Chunked over rows so n x H is never materialised at once."""
    m = normalize(neurons.float(), dim=1)
    maxes, counts = [], []
    for start in range(0, vectors.shape[0], chunk):
        cos = normalize(vectors[start : start + chunk].float().to(m.device), dim=1) @ m.T
        maxes.append(cos.amax(1))
        if threshold is not None:
            counts.append((cos > threshold).sum(1))
    empty = torch.empty(0, device=m.device)
    max_out = torch.cat(maxes) if maxes else empty
    if threshold is None:
        return max_out, None
    return max_out, torch.cat(counts) if counts else empty.long()


def neuron_alignment(encoder_vectors: Tensor, neurons: Tensor, seed: int = 0) -> AlignmentResult:
    """encoder_vectors: [n, d] (the analysed features' W_enc columns); neurons: [H, d] MLP out vectors."""
    n, d = encoder_vectors.shape
    gen = torch.Generator().manual_seed(seed)
    random = torch.randn(n, d, generator=gen)
    baseline, _ = max_cosine(random, neurons)
    threshold = baseline.max().item() if n else float("nan")
    feature_max, counts = max_cosine(encoder_vectors, neurons, threshold)
    return AlignmentResult(feature_max.cpu(), counts.cpu(), baseline.cpu(), threshold)
