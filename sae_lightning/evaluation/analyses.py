"""The analyses run on the streaming pass's result: each one adds metrics, per-feature tensors and figures.

An analysis is a function `(ev: Evaluation) -> None` that reads `ev.inputs` / `ev.stream` and adds to
`ev.metrics` (metrics.json, report.md), `ev.features` (features.safetensors, one row per feature),
`ev.figures` (plots/<name>.png with a heading in words) and `ev.notes` (sentences for the report).
Adding an analysis is adding its function to `ANALYSES`; a streaming one also adds its consumer in
`make_consumers` (its result is `ev.stream.extra[name]`).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

import sae_lightning
from sae_lightning.evaluation import ground_truth, labels, plots
from sae_lightning.evaluation.alignment import neuron_alignment
from sae_lightning.evaluation.clusters import detect_cluster, encoder_cosine_stats
from sae_lightning.evaluation.fetch import fetch_images
from sae_lightning.evaluation.inputs import SEED_CONTRASTIVE_BATCH, EvalInputs, image_resolution_warning
from sae_lightning.evaluation.stream import ChunkConsumer, StreamResult
from sae_lightning.metrics import density_counts, log10_density

log = logging.getLogger(__name__)
GRID_SIZE = 16
FORMAT_VERSION = 2


@dataclass
class Evaluation:
    """Everything the writers need."""

    inputs: EvalInputs
    stream: StreamResult
    metrics: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Tensor] = field(default_factory=dict)  # name -> [F, ...] tensor
    figures: dict[str, tuple[str, Figure]] = field(default_factory=dict)  # file stem -> (heading, figure)
    notes: list[str] = field(default_factory=list)  # sentences for the report
    feature_names: dict[str, list[str]] = field(default_factory=dict)  # name tables for features.json


def make_consumers(inputs: EvalInputs) -> dict[str, ChunkConsumer]:
    """Streaming analyses beyond the built-in ones (name -> consumer; result in `ev.stream.extra[name]`)."""
    consumers: dict[str, ChunkConsumer] = {}
    truth = ground_truth.make_consumer(inputs)
    if truth is not None:
        consumers["ground_truth"] = truth
    return consumers


def provenance(ev: Evaluation) -> None:
    """Sizes and where everything came from."""
    i, s = ev.inputs, ev.stream.stats
    ev.metrics |= {
        "format_version": FORMAT_VERSION,
        "n_images": s.n_images,
        "n_tokens": s.n_tokens,
        "n_features": s.n_features,
        "top_k": s.k,
        "samples_skipped": ev.stream.n_skipped,
        "run_dir": str(i.run),
        "sae_path": str(i.sae_dir),
        "backbone": i.backbone.name,
        "pretrained": i.backbone.pretrained,
        "layer": i.layer,
        "tokens": i.tokens,
        "shards": i.urls,
        "classnames": i.classnames_source,
        "device": str(i.device),
        "seed": int(i.cfg.seed),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sae_lightning_version": sae_lightning.__version__,
    }


def reconstruction(ev: Evaluation) -> None:
    """l0, explained variance (centred and uncentred), mse, normalised mse."""
    ev.metrics |= ev.stream.reconstruction


def contrastive(ev: Evaluation) -> None:
    """The three contrastive losses and zero-shot accuracies, the score, the batch-free KL."""
    values = ev.stream.contrastive
    batch = int(ev.inputs.cfg.contrastive_batch_size)
    ev.metrics |= values | {"contrastive_batch_size": batch,
                            "contrastive_undefined_reason": ev.stream.contrastive_undefined_reason}
    if ev.stream.contrastive_undefined_reason:
        ev.notes.append(f"The contrastive loss is undefined: {ev.stream.contrastive_undefined_reason}")
    if batch != SEED_CONTRASTIVE_BATCH:
        ev.notes.append(f"The contrastive loss was scored in batches of {batch} images, the seed's in batches "
                        f"of {SEED_CONTRASTIVE_BATCH:,}: the loss grows with the batch size, so compare with "
                        f"runs at the same batch size (the KL divergences do not depend on it).")
    score = values.get("contrastive_loss_score", math.nan)
    if math.isfinite(score) and score < 0:
        ev.notes.append(
            f"`contrastive_loss_score` is negative ({score:.3g}): with the SAE spliced in, CLIP matched these "
            f"images to their own prompts better than the original model did (L_sae < L_original; the seed "
            f"saw this too: 1.775 against 1.895). The reconstruction moved the image features in a direction "
            f"that happens to help on this data, not a better model: with few batches "
            f"({values.get('contrastive_batches')}) or a small |score| it is noise, and when L_ablated is close "
            f"to L_original the ratio is large for a small difference. `zero_shot_kl_sae` says how far the class "
            f"distribution moved either way.")


def density(ev: Evaluation) -> None:
    """Dead / ultra-rare / dense counts, live features, the density histogram, the resolution warning."""
    s = ev.stream.stats
    dens = s.density.cpu()
    ev.metrics |= {**density_counts(dens), "live_features": int((dens > 0).sum())}
    warning = image_resolution_warning(s.n_images)
    if warning:
        ev.inputs.warn(warning)
    ev.features |= {"density": s.density, "image_density": s.image_density, "mean_activation": s.mean_activation,
                    "mean_top_activation": s.mean_top_activation, "top_values": s.top_values,
                    "top_indices": s.top_indices, "top_labels": s.top_labels}
    ev.figures["density_histogram"] = ("Feature density", plots.density_histogram(
        dens, f"Feature density over {s.n_images:,} images"))


def n_classes(ev: Evaluation) -> int:
    """Number of classes: the class names, else the largest label seen + 1 (at least 1)."""
    if ev.inputs.classnames:
        return len(ev.inputs.classnames)
    return max(1, int(ev.stream.stats.top_labels.max()) + 1)


def label_entropy(ev: Evaluation) -> None:
    """The seed's label entropy (with the images it used) and the strict top-k value beside it."""
    s = ev.stream.stats
    seed_value, strict = s.label_entropy.cpu(), s.label_entropy_top_k.cpu()
    used = s.label_entropy_images.cpu()
    defined = torch.isfinite(seed_value)
    ev.features |= {"label_entropy": s.label_entropy, "label_entropy_images": s.label_entropy_images,
                    "label_entropy_top_k": s.label_entropy_top_k}
    ev.metrics |= {
        "label_entropy_features": int(defined.sum()),
        "label_entropy_mean": seed_value[defined].double().mean().item() if defined.any() else math.nan,
        "label_entropy_mean_images": used[defined].double().mean().item() if defined.any() else math.nan,
        "label_entropy_fallback_features": int((defined & (used < s.k)).sum()),
        "label_entropy_top_k_features": int(torch.isfinite(strict).sum()),
        "label_entropy_top_k_mean": strict[torch.isfinite(strict)].double().mean().item()
        if torch.isfinite(strict).any() else math.nan,
        "label_entropy_max": math.log(n_classes(ev)),
    }


def cluster_and_alignment(ev: Evaluation) -> None:
    """The ultra-low-density cluster, encoder cosines inside / outside it, neuron alignment outside it."""
    s, sae, inputs = ev.stream.stats, ev.inputs.sae, ev.inputs
    live = (s.density > 0).cpu()
    log_mean_top = torch.log10(s.mean_top_activation.clamp_min(1e-30)).cpu()
    cluster = detect_cluster(log_mean_top, live)
    w_enc = sae.W_enc.detach()
    cosines = encoder_cosine_stats(w_enc.cpu(), cluster.in_cluster, live)
    analysed = live & ~cluster.in_cluster
    neurons = inputs.backbone.mlp_out_vectors(inputs.layer)
    align = neuron_alignment(w_enc.T[analysed.to(w_enc.device)], neurons.to(w_enc.device), seed=int(inputs.cfg.seed))
    max_cos = torch.full((s.n_features,), math.nan)
    max_cos[analysed] = align.max_cosine.float()
    counts = torch.full((s.n_features,), -1, dtype=torch.long)
    counts[analysed] = align.aligned_counts.long()
    n_analysed, aligned = int(analysed.sum()), int((align.aligned_counts > 0).sum())
    ev.metrics |= {
        "cluster_found": cluster.found,
        "cluster_size": int(cluster.in_cluster.sum()),
        "cluster_fraction": int(cluster.in_cluster.sum()) / s.n_features,
        "cluster_threshold_log10_mean_top_activation": cluster.threshold,
        "cluster_separation": cluster.separation,
        "cluster_component_means_log10": list(cluster.means),
        "cluster_component_stds_log10": list(cluster.stds),
        "cluster_component_weights": list(cluster.weights),
        **cosines,
        "alignment_n_features": n_analysed,
        "alignment_n_neurons": int(neurons.shape[0]),
        "alignment_threshold": align.threshold,
        "alignment_aligned_features": aligned,
        "alignment_fraction_aligned": aligned / (n_analysed or math.nan),
        "alignment_mean_max_cosine": align.max_cosine.double().mean().item(),
        "alignment_baseline_mean_max_cosine": align.baseline_max_cosine.double().mean().item(),
        "alignment_mean_aligned_neurons": align.aligned_counts.double().mean().item(),
    }
    ev.features |= {"in_cluster": cluster.in_cluster, "max_mlp_cosine": max_cos, "aligned_neurons": counts}
    ev.figures["cluster_scatter"] = ("Feature density against mean top activation", plots.cluster_scatter(
        log10_density(s.density.cpu()), log_mean_top, s.label_entropy.cpu(), cluster.in_cluster, s.k,
        max_entropy=math.log(n_classes(ev)), threshold=cluster.threshold))
    ev.figures["alignment_max_cosine"] = ("Neuron alignment: largest cosine to an MLP neuron",
                                          plots.alignment_histograms(align.max_cosine, align.baseline_max_cosine,
                                                                     align.threshold))
    ev.figures["alignment_counts"] = ("Neuron alignment: aligned neurons per feature",
                                      plots.aligned_counts_histogram(align.aligned_counts))


def grid_features(ev: Evaluation, n: int, named: list[int]) -> dict[str, int]:
    """Grid title -> feature id: the n most and n least entropic features, then `named`.

    Entropy is the strict top-k value where any feature has one (a feature seen on one image has entropy 0
    by the seed's fallback and says little), else the seed's. Ties go to the larger mean top activation.
    """
    s = ev.stream.stats
    entropy = s.label_entropy_top_k.cpu()
    if not torch.isfinite(entropy).any():
        entropy = s.label_entropy.cpu()
    defined = torch.nonzero(torch.isfinite(entropy)).squeeze(1)
    by_act = defined[torch.argsort(-s.mean_top_activation.cpu()[defined], stable=True)]
    ent = entropy[by_act]
    low = by_act[torch.argsort(ent, stable=True)][:n].tolist()
    high = by_act[torch.argsort(-ent, stable=True)][:n].tolist()
    chosen = {f"least entropic #{i + 1}: feature {f}": f for i, f in enumerate(low)}
    chosen |= {f"most entropic #{i + 1}: feature {f}": f for i, f in enumerate(high)}
    chosen |= {f"feature {f}": f for f in named}
    return chosen


def top_image_grids(ev: Evaluation) -> None:
    """One 4x4 figure of top-16 images per chosen feature (fetched by key in a second pass)."""
    s, keys, classnames = ev.stream.stats, ev.stream.keys, ev.inputs.classnames
    chosen = grid_features(ev, int(ev.inputs.cfg.n_grid_features), ev.inputs.features)
    top_idx, top_val, top_lab = (t.cpu() for t in (s.top_indices, s.top_values, s.top_labels))
    wanted = {keys[i] for f in chosen.values() for i in top_idx[f, :GRID_SIZE].tolist() if i >= 0}
    thumbs = fetch_images(ev.inputs.urls, wanted)
    for title, f in chosen.items():
        images, captions = [], []
        for i, value, label in zip(top_idx[f, :GRID_SIZE].tolist(), top_val[f, :GRID_SIZE].tolist(),
                                   top_lab[f, :GRID_SIZE].tolist()):
            if i < 0:
                break
            name = classnames[label] if classnames and 0 <= label < len(classnames) else f"label {label}"
            images.append(thumbs.get(keys[i]))
            captions.append(f"{name}\n{value:.3g}")
        entropy, used = s.label_entropy[f].item(), int(s.label_entropy_images[f])
        subtitle = f"density {s.density[f].item():.3g}, label entropy " + (
            f"{entropy:.3f} over {used} image(s)" if math.isfinite(entropy) else "undefined (never fired)")
        ev.figures[f"top_images_feature_{f}"] = (f"Top images of {title}",
                                                 plots.image_grid(images, captions, f"{title} ({subtitle})"))


def warnings(ev: Evaluation) -> None:
    """Every warning of this evaluation (already logged) into metrics.json (last, after the other analyses)."""
    ev.metrics["warnings"] = list(ev.inputs.warnings)


ANALYSES: tuple[Callable[[Evaluation], None], ...] = (
    provenance,
    reconstruction,
    density,
    contrastive,
    label_entropy,
    cluster_and_alignment,
    top_image_grids,
    ground_truth.ground_truth_analysis,
    labels.feature_labels,
    warnings,
)


def analyse(inputs: EvalInputs, stream: StreamResult) -> Evaluation:
    """Run every analysis of `ANALYSES` in order."""
    ev = Evaluation(inputs, stream)
    for analysis in ANALYSES:
        analysis(ev)
    return ev
