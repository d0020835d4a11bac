"""Ultra-low-density cluster detection and encoder-direction similarity inside / outside it.

The seed's features split most clearly on log10(mean top-k activation) (its marginal histogram is bimodal;
the lower band holds almost all features and is the "ultra-low density" cluster). We fit a two-component
1D Gaussian mixture by EM on that axis over live features, initialised at Otsu's threshold, and call the
lower-mean component the cluster. Bimodality is required: Ashman's D = sqrt(2)|mu1 - mu2| / sqrt(s1^2 + s2^2)
must exceed `min_separation` (2 = clean separation), else no cluster is reported.

Membership is a threshold, monotone in the activation: the cluster is every live feature below the mixture's
decision boundary between the two component means (where the weighted densities are equal). A posterior
"> 0.5" is not monotone: when the low component is the wider one it wins again far above the high band and
would send the strongest features into the low cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ClusterResult:
    in_cluster: Tensor  # [F] bool, False for dead / undefined features
    found: bool
    threshold: float  # decision boundary on log10 mean top activation; members lie below it (NaN: not found)
    means: tuple[float, float]  # component means (low, high)
    stds: tuple[float, float]
    weights: tuple[float, float]
    separation: float  # Ashman's D


def otsu_threshold(x: Tensor, bins: int = 256) -> float:
    """Threshold maximising the between-class variance of a 1D sample (histogram-based)."""
    x = x.double()
    lo, hi = x.min().item(), x.max().item()
    if hi <= lo:
        return lo
    hist = torch.histc(x, bins=bins, min=lo, max=hi)
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centres).cumsum(0)
    mu0 = m0 / w0.clamp_min(1e-12)
    mu1 = (m0[-1] - m0) / w1.clamp_min(1e-12)
    between = w0 * w1 * (mu0 - mu1).pow(2)
    i = int(between[:-1].argmax())
    return lo + (i + 1) * (hi - lo) / bins


def gaussian_mixture_1d(x: Tensor, init_threshold: float, iters: int = 200, tol: float = 1e-8):
    """Two-component 1D GMM by EM. Returns (means, stds, weights, responsibility of component 0)."""
    x = x.double()
    low = x <= init_threshold
    if low.all() or not low.any():
        low = x <= x.median()
    r = low.double()
    prev = -math.inf
    for _ in range(iters):
        w = torch.stack([r, 1 - r])  # [2, n]
        nk = w.sum(1).clamp_min(1e-12)
        mu = (w * x).sum(1) / nk
        var = ((w * (x - mu[:, None]) ** 2).sum(1) / nk).clamp_min(1e-12)
        pi = nk / x.numel()
        logp = -0.5 * ((x - mu[:, None]) ** 2 / var[:, None] + torch.log(2 * math.pi * var[:, None]))
        logp = logp + torch.log(pi[:, None])
        ll = torch.logsumexp(logp, 0)
        r = torch.exp(logp[0] - ll)
        total = ll.sum().item()
        if abs(total - prev) <= tol * abs(total):
            break
        prev = total
    return mu, var.sqrt(), pi, r


def decision_boundary(means: Tensor, stds: Tensor, weights: Tensor) -> float:
    """The point between the two component means where pi_0 N(x; mu_0, s_0) = pi_1 N(x; mu_1, s_1).

    means, stds, weights: [2] with means[0] <= means[1]. The log ratio of the weighted densities is a
    quadratic a x^2 + b x + c; of its roots in [mu_0, mu_1] the lowest is taken (the first point going up
    where the high component takes over). Without a root there (one component dominates the whole
    interval) the boundary is the end of the interval the low component does not reach: mu_1 if the low
    component dominates, mu_0 if the high one does.
    """
    mu0, mu1 = float(means[0]), float(means[1])
    v0, v1 = float(stds[0]) ** 2, float(stds[1]) ** 2
    lw0, lw1 = math.log(float(weights[0])), math.log(float(weights[1]))

    def log_ratio(x: float) -> float:  # log(pi_0 N_0(x)) - log(pi_1 N_1(x))
        return (lw0 - 0.5 * math.log(v0) - (x - mu0) ** 2 / (2 * v0)) - (
            lw1 - 0.5 * math.log(v1) - (x - mu1) ** 2 / (2 * v1))

    a = 1 / (2 * v1) - 1 / (2 * v0)
    b = mu0 / v0 - mu1 / v1
    c = mu1**2 / (2 * v1) - mu0**2 / (2 * v0) + lw0 - lw1 - 0.5 * math.log(v0 / v1)
    if abs(a) < 1e-12:
        roots = [-c / b] if b != 0 else []
    else:
        disc = b * b - 4 * a * c
        roots = [] if disc < 0 else [(-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)]
    inside = sorted(r for r in roots if mu0 <= r <= mu1)
    if inside:
        return inside[0]
    return mu1 if log_ratio(0.5 * (mu0 + mu1)) > 0 else mu0


def detect_cluster(log_mean_top: Tensor, live: Tensor, min_separation: float = 2.0) -> ClusterResult:
    """Find the low-activation cluster among live features. log_mean_top: [F] log10 mean top-k activation."""
    mask = live & torch.isfinite(log_mean_top)
    in_cluster = torch.zeros_like(mask)
    nan2 = (math.nan, math.nan)
    if mask.sum() < 4:
        return ClusterResult(in_cluster, False, math.nan, nan2, nan2, nan2, math.nan)
    x = log_mean_top[mask].double().cpu()
    mu, sd, pi, r0 = gaussian_mixture_1d(x, otsu_threshold(x))
    lo, hi = (0, 1) if mu[0] <= mu[1] else (1, 0)
    sep = (math.sqrt(2) * abs(mu[0] - mu[1]) / torch.sqrt(sd[0] ** 2 + sd[1] ** 2)).item()
    found = sep > min_separation
    order = torch.tensor([lo, hi])
    threshold = decision_boundary(mu[order], sd[order], pi[order]) if found else math.nan
    if found:
        in_cluster[mask] = (x < threshold).to(in_cluster.device)
    return ClusterResult(
        in_cluster=in_cluster,
        found=found,
        threshold=threshold,
        means=(mu[lo].item(), mu[hi].item()),
        stds=(sd[lo].item(), sd[hi].item()),
        weights=(pi[lo].item(), pi[hi].item()),
        separation=sep,
    )


def mean_pairwise_cosine(vectors: Tensor) -> float:
    """Exact mean cosine similarity over all distinct pairs of rows, in O(n d): (|sum u|^2 - n) / (n(n-1))."""
    n = vectors.shape[0]
    if n < 2:
        return math.nan
    u = torch.nn.functional.normalize(vectors.double(), dim=1)
    s = u.sum(0)
    return ((s @ s).item() - n) / (n * (n - 1))


def mean_cross_cosine(a: Tensor, b: Tensor) -> float:
    """Exact mean cosine similarity between every row of a and every row of b."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return math.nan
    ua = torch.nn.functional.normalize(a.double(), dim=1).sum(0)
    ub = torch.nn.functional.normalize(b.double(), dim=1).sum(0)
    return (ua @ ub).item() / (a.shape[0] * b.shape[0])


def encoder_cosine_stats(w_enc: Tensor, in_cluster: Tensor, live: Tensor) -> dict[str, float]:
    """Mean pairwise cosine of encoder vectors (columns of W_enc [d, F]) inside vs outside the cluster.

    "Outside" means live features not in the cluster; dead features are left out of both.
    """
    enc = w_enc.detach().T
    inside = enc[in_cluster.to(enc.device)]
    outside = enc[(live & ~in_cluster).to(enc.device)]
    return {
        "cluster_encoder_cosine_inside": mean_pairwise_cosine(inside),
        "cluster_encoder_cosine_outside": mean_pairwise_cosine(outside),
        "cluster_encoder_cosine_between": mean_cross_cosine(inside, outside),
    }
