"""`evaluate.py`'s work: one streaming pass over held-out shards, the analyses, and <run>/eval/.

Per batch the backbone runs up to `layer` once; the SAE encodes the hooked tokens (in chunks of at most
`max_tokens` rows, so patch runs with 65,536 features fit), feeding the feature statistics and the
reconstruction metrics, and the remaining blocks run three times for the contrastive loss / zero-shot.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import sae_lightning
from sae_lightning.backbone import select_tokens
from sae_lightning.data.shards import expand_shards, image_loader, load_classnames
from sae_lightning.evaluation import plots
from sae_lightning.evaluation.alignment import neuron_alignment
from sae_lightning.evaluation.clusters import detect_cluster, encoder_cosine_stats
from sae_lightning.evaluation.contrastive import (
    ContrastiveAccumulator,
    class_text_features,
    three_way_features,
)
from sae_lightning.evaluation.feature_stats import FeatureStats, FeatureStatsAccumulator, KeyTable
from sae_lightning.evaluation.fetch import fetch_images
from sae_lightning.evaluation.reconstruction import ReconstructionAccumulator
from sae_lightning.evaluation.report import write_features, write_json, write_report
from sae_lightning.metrics import density_counts, log10_density
from sae_lightning.sae import SparseAutoencoder

log = logging.getLogger(__name__)
GRID_SIZE = 16


def resolve_device(spec: str) -> torch.device:
    """auto -> cuda when available, else cpu; asking for cuda without one is an error, not a fallback."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but CUDA is not available; use device=cpu or auto")
    return device


def load_run_config(run_dir: str | Path | None) -> tuple[Path, DictConfig]:
    """The run directory and its composed, resolved training config; clear errors for a wrong `run`."""
    if not run_dir:
        raise ValueError("evaluate.py needs the training run directory: python evaluate.py run=<run dir>")
    run = Path(run_dir).expanduser().resolve()
    if not run.is_dir():
        raise FileNotFoundError(f"run={run_dir!r}: no such directory")
    if not (run / "sae" / "cfg.json").is_file():
        raise FileNotFoundError(
            f"run={run_dir!r} has no exported SAE ({run / 'sae'}/cfg.json): is it a training run directory, "
            f"and did training reach its first checkpoint/export?")
    for name in ("resolved.yaml", "config.yaml"):
        path = run / ".hydra" / name
        if path.is_file():
            return run, OmegaConf.load(path)
    raise FileNotFoundError(f"run={run_dir!r} has no .hydra/resolved.yaml: not a train.py run directory")


@dataclass
class StreamResult:
    stats: FeatureStats
    keys: dict[int, str]
    reconstruction: dict[str, float]
    contrastive: dict[str, float]
    n_skipped: int


@torch.no_grad()
def stream_pass(backbone, sae: SparseAutoencoder, loader, *, layer: int, tokens: str, n_images: int, k: int,
                classnames: list[str] | None, batch_size: int, max_tokens: int, device: torch.device
                ) -> StreamResult:
    """The single pass: feature statistics, reconstruction metrics, contrastive loss and zero-shot."""
    stats = FeatureStatsAccumulator(sae.d_sae, k, device)
    keys = KeyTable()
    recon = ReconstructionAccumulator(sae.d_in, device)
    contrastive = None
    if classnames:
        text = class_text_features(backbone, classnames)
        contrastive = ContrastiveAccumulator(text, backbone.logit_scale(), batch_size)
    else:
        log.warning("no class names: contrastive loss and zero-shot accuracy are undefined (null)")
    per_chunk = max(1, max_tokens // backbone.n_tokens_for(tokens))
    seen, skipped = 0, 0
    bar = tqdm(total=n_images, desc="evaluating", unit="img", dynamic_ncols=True)
    for batch in loader:
        skipped += int(batch["n_skipped"])
        take = min(len(batch["labels"]), n_images - seen)
        images = batch["images"][:take].to(device, non_blocking=True)
        labels = batch["labels"][:take].to(device)
        if classnames and int(labels.max()) >= len(classnames):
            raise ValueError(f"label {int(labels.max())} but only {len(classnames)} class names: wrong "
                             f"classnames for these shards?")
        residual = backbone.residual(images, layer)
        x_all = select_tokens(residual, tokens)
        recons = []
        for start in range(0, take, per_chunk):
            x = x_all[start : start + per_chunk].float()
            acts = sae.encode(x)
            x_hat = sae.decode(acts)
            index = torch.arange(seen + start, seen + start + x.shape[0], device=device)
            stats.update(acts, labels[start : start + per_chunk], index)
            recon.update(x, x_hat, acts)
            recons.append(x_hat)
        keys.add(seen, batch["keys"][:take], stats)
        if contrastive is not None:
            features = three_way_features(backbone, residual, layer, tokens, torch.cat(recons))
            contrastive.update(features, labels)
        seen += take
        bar.update(take)
        if seen >= n_images:
            break
    bar.total = seen  # the shards may hold fewer than n_images
    bar.refresh()
    bar.close()
    if seen == 0:
        raise RuntimeError("the evaluation shards yielded no image")
    keys.prune(stats)
    return StreamResult(
        stats=stats.compute(),
        keys=keys.keys,
        reconstruction=recon.compute(),
        contrastive=contrastive.compute() if contrastive is not None else ContrastiveAccumulator.undefined(),
        n_skipped=skipped,
    )


def analyse(stats: FeatureStats, sae: SparseAutoencoder, neurons: torch.Tensor, seed: int
            ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Density counts, the ultra-low-density cluster and neuron alignment.

    Returns (metrics, extra per-feature tensors, plot data). Alignment covers live features outside the
    cluster (dead features have no meaningful direction).
    """
    live = stats.density > 0
    log_mean_top = torch.log10(stats.mean_top_activation.clamp_min(1e-30))
    cluster = detect_cluster(log_mean_top.cpu(), live.cpu())
    w_enc = sae.W_enc.detach()
    cosines = encoder_cosine_stats(w_enc.cpu(), cluster.in_cluster, live.cpu())
    analysed = live.cpu() & ~cluster.in_cluster
    align = neuron_alignment(w_enc.T[analysed.to(w_enc.device)], neurons.to(w_enc.device), seed=seed)
    n_features = stats.n_features
    max_cos = torch.full((n_features,), math.nan)
    max_cos[analysed] = align.max_cosine.float()
    counts = torch.full((n_features,), -1, dtype=torch.long)
    counts[analysed] = align.aligned_counts.long()
    n_analysed = int(analysed.sum())
    aligned = int((align.aligned_counts > 0).sum())
    metrics = {
        **density_counts(stats.density.cpu()),
        "live_features": int(live.sum()),
        "entropy_defined_features": int(stats.entropy_defined.sum()),
        "cluster_found": cluster.found,
        "cluster_size": int(cluster.in_cluster.sum()),
        "cluster_fraction": int(cluster.in_cluster.sum()) / n_features,
        "cluster_threshold_log10_mean_top_activation": cluster.threshold,
        "cluster_separation": cluster.separation,
        "cluster_component_means_log10": list(cluster.means),
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
    extra = {"in_cluster": cluster.in_cluster, "max_mlp_cosine": max_cos, "aligned_neurons": counts}
    plot_data = {"log_mean_top": log_mean_top.cpu(), "cluster": cluster, "alignment": align}
    return metrics, extra, plot_data


def grid_features(stats: FeatureStats, n: int, named: list[int]) -> dict[str, int]:
    """Grid title -> feature id: the n most and n least entropic features (entropy defined), then `named`.

    Ties in entropy (many features have entropy 0) go to the larger mean top activation.
    """
    defined = torch.nonzero(stats.entropy_defined.cpu()).squeeze(1)
    by_act = defined[torch.argsort(-stats.mean_top_activation.cpu()[defined], stable=True)]
    ent = stats.label_entropy.cpu()[by_act]
    low = by_act[torch.argsort(ent, stable=True)][:n].tolist()
    high = by_act[torch.argsort(-ent, stable=True)][:n].tolist()
    chosen = {f"least entropic #{i + 1}: feature {f}": f for i, f in enumerate(low)}
    chosen |= {f"most entropic #{i + 1}: feature {f}": f for i, f in enumerate(high)}
    chosen |= {f"feature {f}": f for f in named}
    return chosen


def draw_grids(stats: FeatureStats, keys: dict[int, str], urls: list[str], chosen: dict[str, int],
               classnames: list[str] | None) -> dict[str, Any]:
    """One 4x4 figure of top-16 images per chosen feature (fetched by key in a second pass)."""
    top_idx, top_val, top_lab = (t.cpu() for t in (stats.top_indices, stats.top_values, stats.top_labels))
    wanted = {keys[i] for f in chosen.values() for i in top_idx[f, :GRID_SIZE].tolist() if i >= 0}
    thumbs = fetch_images(urls, wanted)
    figures = {}
    for title, f in chosen.items():
        images, captions = [], []
        for i, value, label in zip(top_idx[f, :GRID_SIZE].tolist(), top_val[f, :GRID_SIZE].tolist(),
                                   top_lab[f, :GRID_SIZE].tolist()):
            if i < 0:
                break
            name = classnames[label] if classnames and 0 <= label < len(classnames) else f"label {label}"
            images.append(thumbs.get(keys[i]))
            captions.append(f"{name}\n{value:.3g}")
        entropy = stats.label_entropy[f].item()
        subtitle = f"density {stats.density[f].item():.3g}, label entropy " + (
            f"{entropy:.3f}" if math.isfinite(entropy) else "undefined")
        figures[f"top_images_feature_{f}"] = plots.image_grid(images, captions, f"{title} ({subtitle})")
    return figures


def evaluate_run(cfg: DictConfig) -> dict[str, Any]:
    """Everything `python evaluate.py run=...` does; returns the metrics written to metrics.json."""
    run, run_cfg = load_run_config(cfg.run)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir).expanduser() if cfg.get("out_dir") else run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    for old in (out / "plots").glob("*.png"):  # grids of an earlier evaluation's features
        old.unlink()
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))

    sae = SparseAutoencoder.load(run / "sae", device=device).eval()
    named = [int(f) for f in cfg.features]
    if any(not 0 <= f < sae.d_sae for f in named):
        raise ValueError(f"features={named}: feature ids must be in 0..{sae.d_sae - 1}")
    backbone = hydra.utils.instantiate(run_cfg.backbone, device=str(device))
    if backbone.width != sae.d_in:
        raise ValueError(f"the SAE's d_in {sae.d_in} != the backbone's width {backbone.width}")
    layer = backbone.resolve_layer(int(run_cfg.layer))
    tokens = str(run_cfg.tokens)
    if sae.metadata.get("layer") not in (None, layer) or sae.metadata.get("tokens") not in (None, tokens):
        log.warning("the SAE's metadata (layer %s, tokens %s) disagrees with the run config (layer %s, "
                    "tokens %s)", sae.metadata.get("layer"), sae.metadata.get("tokens"), layer, tokens)
    shard_spec = cfg.val_shards or OmegaConf.select(run_cfg, "data.val_shards")
    if not shard_spec:
        raise ValueError("no held-out shards: the run has no data.val_shards; pass val_shards=<pattern>")
    urls = expand_shards(OmegaConf.to_container(shard_spec) if OmegaConf.is_list(shard_spec) else shard_spec)
    names_spec = cfg.classnames or OmegaConf.select(run_cfg, "data.classnames")
    classnames = load_classnames(names_spec, urls)
    loader = image_loader(urls, backbone.preprocess, cfg.batch_size, num_workers=cfg.num_workers,
                          pin_memory=device.type == "cuda", shuffle=cfg.shuffle, shardshuffle=True,
                          seed=cfg.seed, partial=True)
    log.info("evaluating %s on up to %d images from %d shard(s) on %s", run, cfg.n_images, len(urls), device)
    result = stream_pass(backbone, sae, loader, layer=layer, tokens=tokens, n_images=cfg.n_images,
                         k=cfg.top_k, classnames=classnames, batch_size=cfg.batch_size,
                         max_tokens=cfg.max_tokens, device=device)
    stats = result.stats
    analysis, extra, plot_data = analyse(stats, sae, backbone.mlp_out_vectors(layer), cfg.seed)

    metrics: dict[str, Any] = {
        **result.reconstruction,
        **analysis,
        **result.contrastive,
        "n_images": stats.n_images,
        "n_tokens": stats.n_tokens,
        "n_features": stats.n_features,
        "top_k": stats.k,
        "contrastive_batch_size": cfg.batch_size,
        "samples_skipped": result.n_skipped,
        "run_dir": str(run),
        "sae_path": str(run / "sae"),
        "backbone": backbone.name,
        "pretrained": backbone.pretrained,
        "layer": layer,
        "tokens": tokens,
        "shards": urls,
        "classnames": names_spec or ("classnames.txt beside the shards" if classnames else None),
        "device": str(device),
        "seed": cfg.seed,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sae_lightning_version": sae_lightning.__version__,
    }
    write_json(out / "metrics.json", metrics)
    write_features(out, stats, extra, result.keys, {
        "tokens": tokens, "layer": layer, "backbone": backbone.name, "run_dir": str(run), "shards": urls,
        "classnames": classnames, "top_image_activation": "max over the image's hooked tokens",
    })
    figures = make_figures(stats, extra["in_cluster"], plot_data)
    chosen = grid_features(stats, cfg.n_grid_features, named)
    figures |= draw_grids(stats, result.keys, urls, chosen, classnames)
    paths = {name: plots.save_figure(fig, out / "plots" / f"{name}.png") for name, fig in figures.items()}
    if cfg.tensorboard:
        log_to_tensorboard(run / "tensorboard" / "eval", metrics, figures)
    for fig in figures.values():
        plots.plt.close(fig)
    write_report(out / "report.md", metrics, paths)
    log.info("wrote %s (metrics.json, features.safetensors/json, %d plots, report.md)", out, len(paths))
    return metrics


def make_figures(stats: FeatureStats, in_cluster: torch.Tensor, plot_data: dict[str, Any]) -> dict[str, Any]:
    """The density histogram, the cluster scatter and the two alignment histograms."""
    align = plot_data["alignment"]
    density = stats.density.cpu()
    return {
        "density_histogram": plots.density_histogram(density, f"Feature density, {stats.n_images} images"),
        "cluster_scatter": plots.cluster_scatter(log10_density(density), plot_data["log_mean_top"],
                                                 stats.label_entropy.cpu(), in_cluster, stats.k),
        "alignment_max_cosine": plots.alignment_histograms(align.max_cosine, align.baseline_max_cosine,
                                                           align.threshold),
        "alignment_counts": plots.aligned_counts_histogram(align.aligned_counts),
    }


def log_to_tensorboard(directory: Path, metrics: dict[str, Any], figures: dict[str, Any]) -> None:
    """The numeric metrics as scalars and every figure, in an `eval` run beside the training logs.

    Event files of an earlier evaluation are removed first, so TensorBoard shows only the latest one.
    """
    from torch.utils.tensorboard import SummaryWriter

    for old in directory.glob("events.out.tfevents.*"):
        old.unlink()
    with SummaryWriter(str(directory)) as writer:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                writer.add_scalar(f"eval/{key}", value, 0)
        for name, fig in figures.items():
            writer.add_figure(f"eval/{name}", fig, 0, close=False)
