"""The evaluation figures (matplotlib, Agg backend); each returns a Figure: PNG + TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import Tensor  # noqa: E402

DENSITY_EPS = 1e-10


def density_histogram(density: Tensor, title: str = "Feature density") -> Figure:
    """Histogram of log10(density + 1e-10); dead features pile up at -10."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(np.log10(density.double().cpu().numpy() + DENSITY_EPS), bins=100, color="tab:blue")
    ax.set(xlabel="log10(feature density + 1e-10)", ylabel="features", title=title)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def cluster_scatter(log_density: Tensor, log_mean_top: Tensor, entropy: Tensor, in_cluster: Tensor,
                    k: int, max_entropy: float, threshold: float = math.nan) -> Figure:
    """The seed's scatter: x = log10 density, y = log10 mean top-k activation, colour = the seed's label
    entropy on the fixed scale 0..max_entropy (ln of the number of classes, so runs compare), with marginal
    histograms. Features with undefined entropy are grey; the cluster's members are ringed and its
    threshold is a dashed line. All inputs [F]."""
    x, y = log_density.double().cpu().numpy(), log_mean_top.double().cpu().numpy()
    ent, member = entropy.double().cpu().numpy(), in_cluster.cpu().numpy()
    ok = np.isfinite(x) & np.isfinite(y)
    defined = ok & np.isfinite(ent)
    fig = plt.figure(figsize=(8, 7))
    grid = fig.add_gridspec(2, 3, width_ratios=(4, 1, 0.15), height_ratios=(1, 4), wspace=0.05, hspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    right = fig.add_subplot(grid[1, 1], sharey=ax)
    if (ok & ~defined).any():
        ax.scatter(x[ok & ~defined], y[ok & ~defined], s=4, c="lightgrey", label="entropy undefined")
    points = ax.scatter(x[defined], y[defined], s=4, c=ent[defined], cmap="viridis", vmin=0.0,
                        vmax=max(max_entropy, 1e-9))
    if (ok & member).any():
        ax.scatter(x[ok & member], y[ok & member], s=14, facecolors="none", edgecolors="red", linewidths=0.4,
                   label="ultra-low-density cluster")
    if math.isfinite(threshold):
        ax.axhline(threshold, color="red", ls="--", lw=0.8, label="cluster threshold")
        right.axhline(threshold, color="red", ls="--", lw=0.8)
    ax.set(xlabel="log10 feature density", ylabel=f"log10 mean top-{k} activation")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=7, markerscale=2)
    top.hist(x[ok], bins=80, color="tab:blue")
    right.hist(y[ok], bins=80, orientation="horizontal", color="tab:blue")
    top.tick_params(labelbottom=False)
    right.tick_params(labelleft=False)
    top.yaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
    right.xaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
    fig.colorbar(points, cax=fig.add_subplot(grid[1, 2]),
                 label=f"label entropy (nats, 0 to ln {round(math.exp(max_entropy))} classes)")
    fig.suptitle("SAE features: density against mean top activation")
    return fig


def alignment_histograms(feature_max: Tensor, baseline_max: Tensor, threshold: float) -> Figure:
    """Max cosine to any MLP out vector, SAE features vs random vectors, with the aligned threshold."""
    fig, ax = plt.subplots(figsize=(6, 4))
    f, b = feature_max.double().cpu().numpy(), baseline_max.double().cpu().numpy()
    data = np.concatenate([f, b]) if f.size + b.size else np.zeros(1)
    bins = np.linspace(min(data.min(), 0.0), max(data.max(), 0.0) + 1e-9, 80)
    ax.hist(f, bins=bins, alpha=0.6, label="SAE encoder vectors")
    ax.hist(b, bins=bins, alpha=0.6, label="random Gaussian vectors")
    if math.isfinite(threshold):
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"aligned threshold {threshold:.3f}")
    ax.set(xlabel="max cosine similarity to an MLP out vector", ylabel="vectors", title="Neuron alignment")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def aligned_counts_histogram(counts: Tensor) -> Figure:
    """Number of MLP neurons each feature (outside the cluster) is aligned to."""
    fig, ax = plt.subplots(figsize=(6, 4))
    c = counts.cpu().numpy()
    top = int(c.max()) if c.size else 0
    ax.hist(c, bins=np.arange(top + 2) - 0.5, color="tab:green")
    ax.set(xlabel="aligned MLP neurons per feature", ylabel="features", title="Neuron alignment counts")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def image_grid(images: list[np.ndarray | None], captions: list[str], title: str, ncols: int = 4) -> Figure:
    """A 4x4 (by default) grid of HxWx3 uint8 images with a caption each; None leaves a blank cell."""
    nrows = max(1, math.ceil(len(images) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.4 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images) and images[i] is not None:
            ax.imshow(images[i])
            ax.set_title(captions[i], fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write a PNG (the figure stays open for TensorBoard; close it after)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
