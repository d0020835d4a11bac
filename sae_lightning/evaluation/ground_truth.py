"""Ground-truth interpretability on shards that carry attribute records (the scene world, docs/format-scenes.md).

For every unit (an SAE feature, an MLP neuron of the hooked block, a random residual direction) and every
attribute value ("colour=red", "shape=star", "count=2", "object=red star", ...), the AUROC of the unit's
image-level activation (max over the hooked tokens, as everywhere in the evaluation) for "the value is
present in the image", on the first `ground_truth_images` held-out images of the pass. A unit is
*monosemantic* when some value reaches AUROC >= 0.9; a value is *covered* when some live unit does.

Memory: only those images are kept. SAE activations are stored sparse (the non-zero image-level values,
12 bytes each), neurons and random directions dense float32 ([N, H] and [N, R], 4 bytes each), image
embeddings [N, embed_dim], and the full residual of the first `label_images` images for the intervention
labels (labels.py). With N = 4,096, ViT-L/14 (H = 4,096) and 65,536 random directions the random block is
the largest: 1 GiB.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from sae_lightning.backbone import select_tokens  # noqa: E402
from sae_lightning.world.scenes import BACKGROUNDS, COLOURS, COUNTS, EFFECTS, SHAPES, SIZES  # noqa: E402

log = logging.getLogger(__name__)

MONOSEMANTIC_AUROC = 0.9
# A value is scored only where at least this many images have it and this many lack it: the AUROC of a unit
# unrelated to the value has standard deviation ~ 1 / sqrt(12 n_pos), so with 20 positives 0.9 lies 6 standard
# deviations above chance, and the maximum over thousands of units and ~76 values stays well below it.
MIN_IMAGES_PER_SIDE = 20
DEFAULT_IMAGES = 4096
DEFAULT_LABEL_IMAGES = 16
# Purity: precision of a unit's top PURITY_TOP_K images for its best value (among values in at most
# PURITY_MAX_BASE_RATE of the images); pure at >= PURE_THRESHOLD. With base rate <= 1/2 a unit unrelated to a value
# has 18 or more of 20 top images with it with probability <= 2e-4 (binomial), so chance rarely makes a unit pure.
PURITY_TOP_K = 20
PURITY_MAX_BASE_RATE = 0.5
PURE_THRESHOLD = 0.9
GROUPS = ("colour", "shape", "size", "count", "background", "effect", "object")


def attribute_vocabulary() -> list[str]:
    """Every attribute value of the scene world, "<group>=<value>", grouped as GROUPS (76 values)."""
    values = [f"colour={c}" for c in COLOURS] + [f"shape={s}" for s in SHAPES] + [f"size={z}" for z in SIZES]
    values += [f"count={n}" for n in COUNTS] + [f"background={b}" for b in BACKGROUNDS]
    values += [f"effect={e}" for e in EFFECTS] + [f"object={c} {s}" for c in COLOURS for s in SHAPES]
    return values


def present_values(record: dict[str, Any]) -> set[str]:
    """The attribute values present in one scene: any object's colour / shape / size / "colour shape", the
    object count, the background and the effect."""
    objects = record["objects"]
    out = {f"count={record['count']}", f"background={record['background']}", f"effect={record['effect']}"}
    for o in objects:
        out |= {f"colour={o['colour']}", f"shape={o['shape']}", f"size={o['size']}",
                f"object={o['colour']} {o['shape']}"}
    return out


def is_scene_record(sample: dict[str, Any]) -> bool:
    """A webdataset sample carries a scene attribute record (json with `objects` and `version`)."""
    import json

    raw = sample.get("json")
    if raw is None:
        return False
    try:
        record = json.loads(raw)
    except ValueError:
        return False
    return isinstance(record, dict) and "objects" in record and "version" in record


def shards_have_records(urls: list[str]) -> bool:
    """Whether the first sample of the first shard carries a scene attribute record (reads one sample)."""
    if not urls:
        return False
    try:
        first = next(iter(wds.WebDataset(urls[0], shardshuffle=False, empty_check=False)), None)
    except Exception as exn:  # noqa: BLE001 - an unreadable shard: the pass reports it; no ground truth here
        log.warning("cannot read %s to look for attribute records: %s", urls[0], exn)
        return False
    return first is not None and is_scene_record(first)


def auroc(scores: Tensor, labels: Tensor, chunk: int = 512) -> Tensor:
    """Exact AUROC of every column of `scores` [N, C] for every column of `labels` [N, V] (bool) -> [C, V]
    float64: the Mann-Whitney statistic with mid-ranks for ties (a tie between a positive and a negative
    counts 1/2). NaN for a value with no positive or no negative image. Chunked over C: memory O(chunk N)."""
    n = scores.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"scores have {n} rows, labels {labels.shape[0]}")
    y = labels.to(torch.float64, copy=False).to(scores.device)
    n_pos = y.sum(0)
    n_neg = n - n_pos
    out = []
    for start in range(0, scores.shape[1], chunk):
        s = scores[:, start : start + chunk].T.contiguous()  # [c, N]
        ranks = midranks(s)
        rank_sum = ranks @ y  # [c, V]
        out.append((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    result = torch.cat(out) if out else torch.empty(0, labels.shape[1], dtype=torch.float64)
    result[:, (n_pos == 0) | (n_neg == 0)] = math.nan
    return result


def scorable_values(labels: Tensor, min_images: int = MIN_IMAGES_PER_SIDE) -> Tensor:
    """[N, V] bool -> [V] bool: values present in at least `min_images` images and absent from as many."""
    n_pos = labels.sum(0)
    return (n_pos >= min_images) & (labels.shape[0] - n_pos >= min_images)


def midranks(s: Tensor) -> Tensor:
    """1-based ranks within each row of `s` [c, N], ties getting the mean of their positions -> [c, N] float64."""
    ordered = s.sort(dim=1).values
    left = torch.searchsorted(ordered, s, side="left")
    right = torch.searchsorted(ordered, s, side="right")
    return (left + right + 1).to(torch.float64) / 2


@dataclass
class Interpretability:
    """Monosemanticity of one family of units against the attribute values."""

    best_value: Tensor  # [C] int64: index of the value with the largest AUROC; -1 if not live / none scorable
    best_auroc: Tensor  # [C] float32: that AUROC (NaN if not live)
    monosemantic: Tensor  # [C] bool: live and best_auroc >= 0.9
    value_best_auroc: Tensor  # [V] float32: max AUROC any live unit reaches for the value (NaN: not scorable)
    fraction_monosemantic: float  # monosemantic / live units
    fraction_covered: float  # values with value_best_auroc >= 0.9 / scorable values
    n_live: int
    n_scorable: int


def interpretability(table: Tensor, live: Tensor, threshold: float = MONOSEMANTIC_AUROC) -> Interpretability:
    """From an AUROC table [C, V] (NaN = value not scorable) and a live mask [C]."""
    table = table.float().cpu()
    live = live.bool().cpu()
    scorable = torch.isfinite(table).any(0) if table.shape[0] else torch.zeros(table.shape[1], dtype=torch.bool)
    filled = table.nan_to_num(-math.inf)
    best_auroc, best_value = filled.max(1) if table.shape[1] else (torch.full((table.shape[0],), -math.inf),
                                                                   torch.zeros(table.shape[0], dtype=torch.long))
    ok = live & torch.isfinite(best_auroc)
    best_value = torch.where(ok, best_value, torch.full_like(best_value, -1))
    best_auroc = torch.where(ok, best_auroc, torch.full_like(best_auroc, math.nan))
    mono = ok & (best_auroc >= threshold)
    value_best = filled[live].max(0).values if live.any() else torch.full((table.shape[1],), -math.inf)
    value_best = torch.where(scorable & torch.isfinite(value_best), value_best, torch.full_like(value_best, math.nan))
    n_live, n_scorable = int(live.sum()), int(scorable.sum())
    return Interpretability(
        best_value=best_value, best_auroc=best_auroc, monosemantic=mono, value_best_auroc=value_best,
        fraction_monosemantic=int(mono.sum()) / n_live if n_live else math.nan,
        fraction_covered=int((value_best[scorable] >= threshold).sum()) / n_scorable if n_scorable else math.nan,
        n_live=n_live, n_scorable=n_scorable)


@dataclass
class Purity:
    """Purity of one family of units: how well one attribute value explains a unit's top images.

    precision(u, v) = fraction of u's top-k images that have v (top k = the k largest activations among the
    images where u exceeds its own minimum, so a sparse feature's silent images never count; a unit with fewer
    than k such images is not scored). A unit's purity is its largest precision over the scorable values present
    in at most PURITY_MAX_BASE_RATE of the images (a commoner value, e.g. "some object is large" in ~70% of
    scenes, fills a top-k by chance), ties going to the rarer value (a feature whose top images are all red stars
    is a "red star" feature rather than a "red" one). Unlike AUROC it needs no recall: a feature that fires on
    a few of the red images, and only on red ones, is pure.
    """

    best_value: Tensor  # [C] int64: value with the largest precision; -1 if not live or not scored
    purity: Tensor  # [C] float32: that precision (NaN if not live or fewer than k images above its minimum)
    pure: Tensor  # [C] bool: live and purity >= threshold
    value_best_precision: Tensor  # [V] float32: max precision any live unit reaches (NaN: value not scored)
    fraction_pure: float  # pure / live units
    fraction_covered: float  # values with value_best_precision >= threshold / values scored
    n_live: int
    n_scorable: int


def top_k_precision(acts: Tensor, labels: Tensor, k: int = PURITY_TOP_K) -> Tensor:
    """Precision of each unit's top-k images for each value: acts [N, C], labels [N, V] bool -> [C, V] float32.

    Only images where the unit exceeds its own minimum over the N images are candidates; rows of units with
    fewer than k candidates are NaN. Ties at the k-th place go to whichever image torch.topk returns.
    """
    if acts.shape[0] != labels.shape[0]:
        raise ValueError(f"activations have {acts.shape[0]} rows, labels {labels.shape[0]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n, c = acts.shape
    out = torch.full((c, labels.shape[1]), math.nan)
    if n < k or c == 0:
        return out
    acts = acts.float()
    enough = (acts > acts.amin(0, keepdim=True)).sum(0) >= k  # [C]
    top = acts[:, enough].topk(k, dim=0).indices  # [k, c']
    out[enough] = labels.float()[top].mean(0).to(out.device)  # [k, c', V] -> [c', V]
    return out


def purity(precision: Tensor, base_rate: Tensor, live: Tensor, threshold: float = PURE_THRESHOLD,
           max_base_rate: float = PURITY_MAX_BASE_RATE) -> Purity:
    """From a top-k precision table [C, V] (NaN: unit not scored), the values' base rates [V] (fraction of the
    images with the value; NaN: value not scorable) and a live mask [C]."""
    precision = precision.float().cpu()
    base = base_rate.float().cpu()
    live = live.bool().cpu()
    scorable = torch.isfinite(base) & (base > 0) & (base <= max_base_rate)
    table = precision.clone()
    table[:, ~scorable] = math.nan
    filled = table.nan_to_num(-math.inf)
    c, v = table.shape
    if v and c:
        best = filled.max(1, keepdim=True).values  # [C, 1]
        rarity = torch.where(filled >= best - 1e-6, base.expand(c, v), torch.full((c, v), math.inf))
        best_value, best_precision = rarity.argmin(1), best.squeeze(1)
    else:
        best_value, best_precision = torch.zeros(c, dtype=torch.long), torch.full((c,), -math.inf)
    ok = live & torch.isfinite(best_precision)
    best_value = torch.where(ok, best_value, torch.full_like(best_value, -1))
    best_precision = torch.where(ok, best_precision, torch.full_like(best_precision, math.nan))
    pure = ok & (best_precision >= threshold)
    value_best = filled[live].max(0).values if live.any() else torch.full((v,), -math.inf)
    value_best = torch.where(scorable & torch.isfinite(value_best), value_best, torch.full_like(value_best, math.nan))
    n_live, n_scorable = int(live.sum()), int(scorable.sum())
    return Purity(best_value=best_value, purity=best_precision, pure=pure, value_best_precision=value_best,
                  fraction_pure=int(pure.sum()) / n_live if n_live else math.nan,
                  fraction_covered=int((value_best[scorable] >= threshold).sum()) / n_scorable
                  if n_scorable else math.nan, n_live=n_live, n_scorable=n_scorable)


@dataclass
class GroundTruthData:
    """What the streaming consumer kept for the first N held-out images."""

    n_images: int
    n_features: int
    sae_rows: Tensor  # [nnz] int64 image index of each non-zero image-level SAE activation
    sae_cols: Tensor  # [nnz] int64 its feature
    sae_values: Tensor  # [nnz] float32 its value (max over the hooked tokens)
    neurons: Tensor  # [N, H] float32 MLP hidden units of the hooked block, max over the hooked tokens
    random: Tensor  # [N, R] float32 random unit residual directions' projections, max over the hooked tokens
    embeddings: Tensor  # [N, E] float32 unit image embeddings of the untouched model
    residuals: Tensor  # [M, T, d] float32 full residual stream at the hook of the first M images
    values: list[str] | None  # the attribute vocabulary (None: the shards carry no records)
    labels: Tensor | None  # [N, V] bool: value present in image
    keys: list[str]  # [N] image keys

    def sae_dense(self, start: int, stop: int) -> Tensor:
        """Image-level activations of features start..stop-1: [N, stop - start] float32 (zeros elsewhere)."""
        out = torch.zeros(self.n_images, stop - start)
        mask = (self.sae_cols >= start) & (self.sae_cols < stop)
        out[self.sae_rows[mask], self.sae_cols[mask] - start] = self.sae_values[mask]
        return out

    def sae_top_k_precision(self, k: int = PURITY_TOP_K, chunk: int = 512) -> Tensor:
        """[F, V] top-k precision table of the SAE features (chunked like sae_auroc)."""
        assert self.labels is not None
        parts = [top_k_precision(self.sae_dense(s, min(s + chunk, self.n_features)), self.labels, k)
                 for s in range(0, self.n_features, chunk)]
        return torch.cat(parts) if parts else torch.empty(0, self.labels.shape[1])

    def sae_auroc(self, chunk: int = 512) -> Tensor:
        """[F, V] AUROC table of the SAE features (chunked: one dense [N, chunk] block at a time)."""
        assert self.labels is not None
        parts = [auroc(self.sae_dense(s, min(s + chunk, self.n_features)), self.labels, chunk)
                 for s in range(0, self.n_features, chunk)]
        return torch.cat(parts) if parts else torch.empty(0, self.labels.shape[1], dtype=torch.float64)


class GroundTruthConsumer:
    """Streaming consumer: keeps the first `max_images` images' image-level SAE activations (sparse), the hooked
    block's MLP hidden units and random directions (dense), unit image embeddings and attribute labels.

    Two forward hooks on block `layer` (its output: the residual; `mlp.gelu`'s output: the hidden units) fire
    in `backbone.residual` once per batch, before the chunks of that batch reach `update`; they are removed
    once enough images are kept and in `compute`.
    """

    def __init__(self, backbone, sae, *, layer: int, tokens: str, records: dict[str, dict] | None,
                 max_images: int = DEFAULT_IMAGES, n_random: int | None = None,
                 label_images: int = DEFAULT_LABEL_IMAGES, seed: int = 0):
        self.backbone, self.layer, self.tokens, self.records = backbone, layer, tokens, records
        self.max_images, self.label_images = max_images, label_images
        self.n_features = sae.d_sae
        gen = torch.Generator().manual_seed(seed)
        # without records only the labels' inputs are kept: no neurons, no random directions
        n_random = (sae.d_sae if records is not None else 0) if n_random is None else n_random
        directions = torch.randn(n_random, backbone.width, generator=gen)
        self.directions = torch.nn.functional.normalize(directions, dim=1).T.contiguous()  # [d, R]
        self.values = attribute_vocabulary() if records is not None else None
        self.value_index = {v: i for i, v in enumerate(self.values or [])}
        self.batch_first = bool(getattr(backbone.visual.transformer, "batch_first", True))
        block = backbone.visual.transformer.resblocks[layer]
        self._handles = [block.register_forward_hook(self._on_block)]
        activation = getattr(getattr(block, "mlp", None), "gelu", None)  # open_clip's c_fc -> gelu -> c_proj
        self.has_neurons = activation is not None
        if self.has_neurons:
            self._handles.append(activation.register_forward_hook(self._on_hidden))
        else:
            log.warning("block %d has no mlp.gelu: MLP neurons are not scored", layer)
        self._residual: Tensor | None = None
        self._hidden: Tensor | None = None
        self._embeddings: Tensor | None = None
        self._ptr = 0
        self.n = 0
        self.parts: dict[str, list[Tensor]] = {k: [] for k in ("rows", "cols", "vals", "neurons", "random", "emb",
                                                               "res", "labels")}
        self.keys: list[str] = []
        self.n_residuals = 0

    def _batch_first(self, t: Tensor) -> Tensor:
        return t if self.batch_first else t.transpose(0, 1)

    def _on_block(self, module, args, output) -> None:
        self._residual = self._batch_first(output).detach()
        self._embeddings = None
        self._ptr = 0

    def _on_hidden(self, module, args, output) -> None:
        self._hidden = self._batch_first(output).detach()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def update(self, chunk) -> None:
        n_chunk = chunk.x.shape[0]
        start, self._ptr = self._ptr, self._ptr + n_chunk
        if self.n >= self.max_images or self._residual is None:
            return
        rows = slice(start, start + n_chunk)
        keys = list(chunk.keys)
        keep = torch.ones(n_chunk, dtype=torch.bool)
        if self.records is not None:
            keep = torch.tensor([k in self.records for k in keys], dtype=torch.bool)
        idx = torch.nonzero(keep).squeeze(1)[: self.max_images - self.n]
        if not len(idx):
            return
        dev = chunk.acts.device
        acts = chunk.acts[idx.to(dev)].float()
        acts = acts.amax(1) if acts.ndim == 3 else acts  # [n, F] image-level
        nz = torch.nonzero(acts > 0)
        self.parts["rows"].append((nz[:, 0] + self.n).cpu())
        self.parts["cols"].append(nz[:, 1].cpu())
        self.parts["vals"].append(acts[nz[:, 0], nz[:, 1]].cpu())
        x = chunk.x[idx.to(dev)].float()
        if self.directions.device != x.device:
            self.directions = self.directions.to(x.device)  # once: [d, R] can be 256 MiB
        proj = x @ self.directions
        self.parts["random"].append((proj.amax(1) if proj.ndim == 3 else proj).cpu())
        if self.records is not None and self.has_neurons:
            hidden = select_tokens(self._hidden[rows], self.tokens)[idx.to(dev)].float()
            self.parts["neurons"].append((hidden.amax(1) if hidden.ndim == 3 else hidden).cpu())
        if self._embeddings is None:
            emb = self.backbone.forward_from(self._residual.to(self.backbone.visual.conv1.weight.dtype), self.layer)
            self._embeddings = torch.nn.functional.normalize(emb.float(), dim=-1)
        self.parts["emb"].append(self._embeddings[rows][idx.to(dev)].cpu())
        if self.n_residuals < self.label_images:
            res = self._residual[rows][idx.to(dev)][: self.label_images - self.n_residuals].float().cpu()
            self.parts["res"].append(res)
            self.n_residuals += res.shape[0]
        if self.records is not None:
            y = torch.zeros(len(idx), len(self.values), dtype=torch.bool)
            for r, i in enumerate(idx.tolist()):
                for value in present_values(self.records[keys[i]]):
                    y[r, self.value_index[value]] = True
            self.parts["labels"].append(y)
        self.keys += [keys[i] for i in idx.tolist()]
        self.n += len(idx)
        if self.n >= self.max_images:
            self.remove_hooks()

    def compute(self) -> GroundTruthData:
        self.remove_hooks()
        p = self.parts

        def cat(name: str, empty: Tensor) -> Tensor:
            return torch.cat(p[name]) if p[name] else empty

        return GroundTruthData(
            n_images=self.n, n_features=self.n_features,
            sae_rows=cat("rows", torch.empty(0, dtype=torch.long)),
            sae_cols=cat("cols", torch.empty(0, dtype=torch.long)),
            sae_values=cat("vals", torch.empty(0)), neurons=cat("neurons", torch.empty(0, 0)),
            random=cat("random", torch.empty(0, self.directions.shape[1])), embeddings=cat("emb", torch.empty(0, 0)),
            residuals=cat("res", torch.empty(0)), values=self.values,
            labels=cat("labels", torch.empty(0, len(self.values or []), dtype=torch.bool))
            if self.values is not None else None, keys=self.keys)


def varying(acts: Tensor) -> Tensor:
    """[N, C] -> [C] bool: columns that are not constant over the images (a constant unit cannot rank)."""
    if acts.shape[0] == 0:
        return torch.zeros(acts.shape[1], dtype=torch.bool)
    return (acts.amax(0) > acts.amin(0))


def best_auroc_plot(values: list[str], series: dict[str, Tensor], threshold: float = MONOSEMANTIC_AUROC) -> Figure:
    """Best AUROC any unit of each family reaches, per attribute value (x), families as markers."""
    fig, ax = plt.subplots(figsize=(max(8.0, 0.16 * len(values) + 2), 4.5))
    x = np.arange(len(values))
    markers = {"SAE features": ("o", "tab:blue"), "MLP neurons": ("s", "tab:orange"),
               "random directions": ("^", "tab:grey")}
    for name, best in series.items():
        marker, colour = markers.get(name, ("x", None))
        ax.scatter(x, best.double().cpu().numpy(), marker=marker, color=colour, s=18, label=name, alpha=0.85)
    ax.axhline(threshold, color="black", linestyle="--", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([v.split("=", 1)[1] for v in values], rotation=90, fontsize=6)
    groups = [v.split("=", 1)[0] for v in values]
    for i in range(1, len(groups)):
        if groups[i] != groups[i - 1]:
            ax.axvline(i - 0.5, color="lightgrey", linewidth=0.8)
    ax.set(ylabel="best AUROC over units", ylim=(0.4, 1.02),
           title=f"Best AUROC per attribute value (dashed: monosemantic threshold {threshold})")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def make_consumer(inputs) -> GroundTruthConsumer | None:
    """The consumer for an evaluation (`ground_truth=false` turns it off): attribute records are read when the
    first sample of the shards carries one; without records it still keeps what the labels need."""
    cfg = inputs.cfg
    check_config(cfg)
    if not cfg.get("ground_truth", True):
        return None
    records = None
    if shards_have_records(inputs.urls):
        from sae_lightning.data.synthetic import read_attribute_records

        records = read_attribute_records(inputs.urls)
        log.info("ground truth: %d attribute records in the held-out shards", len(records))
    return GroundTruthConsumer(inputs.backbone, inputs.sae, layer=inputs.layer, tokens=inputs.tokens, records=records,
                               max_images=int(cfg.get("ground_truth_images", DEFAULT_IMAGES)),
                               label_images=int(cfg.get("label_images", DEFAULT_LABEL_IMAGES)), seed=int(cfg.seed))


def check_config(cfg) -> None:
    """`ground_truth_images` >= 1, `label_images` >= 0, `label_methods` null or a list of known methods."""
    from sae_lightning.evaluation.labels import METHODS

    for key, lowest, default in (("ground_truth_images", 1, DEFAULT_IMAGES), ("label_images", 0, DEFAULT_LABEL_IMAGES)):
        value = cfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"{key}={value!r}: must be an integer >= {lowest}")
    methods = cfg.get("label_methods")
    if methods is not None:
        if isinstance(methods, str) or not all(isinstance(m, str) for m in methods) or \
                any(m not in METHODS for m in methods) or not len(methods):
            raise ValueError(f"label_methods={methods!r}: must be null or a non-empty list of {list(METHODS)}, "
                             f"e.g. label_methods=[top_images]")


FAMILIES = {"sae": "SAE features", "neurons": "MLP neurons", "random": "random directions"}


def ground_truth_analysis(ev) -> None:
    """Item 4: per-feature AUROC table and monosemanticity; the same for MLP neurons and random directions."""
    data: GroundTruthData | None = ev.stream.extra.get("ground_truth")
    if data is None or data.labels is None or data.n_images == 0:
        return
    if data.neurons.shape[0] != data.n_images:  # not captured (no mlp.gelu): no neuron is scored
        data.neurons = torch.zeros(data.n_images, 0)
    tables = {"sae": data.sae_auroc(), "neurons": auroc(data.neurons, data.labels),
              "random": auroc(data.random, data.labels)}
    rare = ~scorable_values(data.labels)
    for table in tables.values():
        table[:, rare] = math.nan  # too few images with (or without) the value to tell a unit from chance
    live = {"sae": (ev.stream.stats.density > 0).cpu(), "neurons": varying(data.neurons),
            "random": varying(data.random)}
    results = {name: interpretability(tables[name], live[name]) for name in FAMILIES}
    sae = results["sae"]
    values = data.values
    base = data.labels.float().mean(0)
    base[rare] = math.nan
    precisions = {"sae": data.sae_top_k_precision(), "neurons": top_k_precision(data.neurons, data.labels),
                  "random": top_k_precision(data.random, data.labels)}
    purities = {name: purity(precisions[name], base, live[name]) for name in FAMILIES}
    ev.metrics |= {"ground_truth_images": data.n_images, "ground_truth_values": len(values),
                   "ground_truth_min_images": MIN_IMAGES_PER_SIDE,
                   "ground_truth_scorable_values": sae.n_scorable, "ground_truth_threshold": MONOSEMANTIC_AUROC,
                   "ground_truth_random_directions": int(data.random.shape[1])}
    for name, r in results.items():
        ev.metrics |= {f"interpretability_{name}_units": r.n_live,
                       f"interpretability_{name}_monosemantic": r.fraction_monosemantic,
                       f"interpretability_{name}_covered": r.fraction_covered,
                       f"interpretability_{name}_pure": purities[name].fraction_pure,
                       f"interpretability_{name}_pure_covered": purities[name].fraction_covered}
    ev.metrics |= {"ground_truth_purity_top_k": PURITY_TOP_K, "ground_truth_purity_threshold": PURE_THRESHOLD,
                   "ground_truth_purity_values": purities["sae"].n_scorable}
    groups = sorted({v.split("=", 1)[0] for v in values}, key=lambda g: GROUPS.index(g) if g in GROUPS else 99)
    for group in groups:
        member = torch.tensor([v.split("=", 1)[0] == group for v in values])
        best = sae.value_best_auroc[member]
        ok = torch.isfinite(best)
        ev.metrics[f"interpretability_sae_covered_{group}"] = \
            (int((best[ok] >= MONOSEMANTIC_AUROC).sum()) / int(ok.sum())) if ok.any() else math.nan
    ev.features |= {"gt_auroc": tables["sae"].float(), "gt_best_value": sae.best_value, "gt_best_auroc": sae.best_auroc,
                    "gt_monosemantic": sae.monosemantic, "gt_purity": purities["sae"].purity,
                    "gt_purity_value": purities["sae"].best_value, "gt_pure": purities["sae"].pure}
    if hasattr(ev, "feature_names"):
        ev.feature_names["gt_values"] = list(values)
        ev.feature_names["gt_image_keys"] = list(data.keys)  # the images scored, in order
    ev.figures["ground_truth_best_auroc"] = (
        "Ground truth: best AUROC per attribute value, SAE features vs MLP neurons vs random directions",
        best_auroc_plot(values, {FAMILIES[name]: r.value_best_auroc for name, r in results.items()}))
    ev.notes.append(
        f"Ground truth ({data.n_images:,} held-out images, {sae.n_scorable} attribute values): "
        f"{_pct(sae.fraction_monosemantic)} of {sae.n_live:,} live SAE features are monosemantic (one value "
        f"with AUROC >= {MONOSEMANTIC_AUROC}) and they cover {_pct(sae.fraction_covered)} of the values; MLP neurons "
        f"{_pct(results['neurons'].fraction_monosemantic)} / {_pct(results['neurons'].fraction_covered)}; "
        f"{results['random'].n_live:,} random directions {_pct(results['random'].fraction_monosemantic)} / "
        f"{_pct(results['random'].fraction_covered)}. Purity (one value in >= {PURE_THRESHOLD:.0%} of the top "
        f"{PURITY_TOP_K} images; pure / values covered): SAE features "
        f"{_pct(purities['sae'].fraction_pure)} / {_pct(purities['sae'].fraction_covered)}, MLP neurons "
        f"{_pct(purities['neurons'].fraction_pure)} / {_pct(purities['neurons'].fraction_covered)}, random "
        f"directions {_pct(purities['random'].fraction_pure)} / {_pct(purities['random'].fraction_covered)}.")


def _pct(x: float) -> str:
    return "undefined" if not math.isfinite(x) else f"{100 * x:.1f}%"
