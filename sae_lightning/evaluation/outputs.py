"""Writing an evaluation: every output goes to a temporary sibling of the output directory, which then
replaces the previous evaluation whole, so a failure (or a full disk) leaves the previous one intact.

A writer is a function `(ev: Evaluation, directory: Path) -> None`; adding an output is adding its
function to `WRITERS` (see docs/format-eval.md for what each writes).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from sae_lightning.atomic import exchange_paths, fsync_dir
from sae_lightning.evaluation import plots
from sae_lightning.evaluation.analyses import FORMAT_VERSION, Evaluation
from sae_lightning.evaluation.report import render_report

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
TENSORBOARD_DIR = "tensorboard"
# A few headline numbers for TensorBoard's HParams tab (each is also one scalar there: TensorBoard reads
# hparams metrics from scalars); everything else is in the text card.
HEADLINE_METRICS = ("mse_normalised", "explained_variance_uncentred", "l0", "dead_features",
                    "contrastive_loss_score", "zero_shot_kl_sae", "zero_shot_accuracy_sae", "cluster_fraction",
                    "alignment_fraction_aligned")


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON null: 'undefined'), tensors/numpy scalars -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def write_config(ev: Evaluation, directory: Path) -> None:
    """config.yaml: the evaluation's own config, overrides included."""
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(ev.inputs.cfg), encoding="utf-8")


def write_metrics(ev: Evaluation, directory: Path) -> None:
    """metrics.json: one flat object."""
    write_json(directory / "metrics.json", ev.metrics)


def write_feature_table(ev: Evaluation, directory: Path) -> None:
    """features.safetensors (per-feature tensors, row i = feature i) + features.json (keys, provenance)."""
    s, i = ev.stream.stats, ev.inputs
    tensors = {k: v.detach().cpu().contiguous() for k, v in ev.features.items()}
    table = directory / "features.safetensors"
    save_file(tensors, str(table), metadata={"format_version": str(FORMAT_VERSION)})
    table.chmod(0o644)  # safetensors writes 0600; the table is as readable as the json beside it
    write_json(directory / "features.json", {
        "format_version": FORMAT_VERSION,
        "n_features": s.n_features,
        "k": s.k,
        "n_images": s.n_images,
        "n_tokens": s.n_tokens,
        "tokens": i.tokens,
        "layer": i.layer,
        "backbone": i.backbone.name,
        "run_dir": str(i.run),
        "shards": i.urls,
        "classnames": i.classnames,
        "top_image_activation": "max over the image's hooked tokens",
        "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                    for k, v in tensors.items()},
        "image_keys": {str(n): key for n, key in sorted(ev.stream.keys.items())},
        "names": ev.feature_names,  # name tables that per-feature index tensors point into
    })


def plot_paths(ev: Evaluation) -> dict[str, tuple[str, str]]:
    """file stem -> (heading, path relative to the evaluation directory)."""
    return {name: (heading, f"{PLOTS_DIR}/{name}.png") for name, (heading, _) in ev.figures.items()}


def write_plots(ev: Evaluation, directory: Path) -> None:
    """plots/<name>.png for every figure."""
    for name, (_, fig) in ev.figures.items():
        plots.save_figure(fig, directory / PLOTS_DIR / f"{name}.png")


def write_report(ev: Evaluation, directory: Path) -> None:
    """report.md."""
    text = render_report(json_safe(ev.metrics), ev.notes, plot_paths(ev))
    (directory / "report.md").write_text(text, encoding="utf-8")


def write_tensorboard(ev: Evaluation, directory: Path) -> None:
    """tensorboard/: one text card (the report's tables and notes) and the HParams entry of this evaluation
    (the evaluation config and the run's layer/tokens/expansion as hparams, the headline metrics)."""
    if not ev.inputs.cfg.tensorboard:
        return
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    metrics = json_safe(ev.metrics)
    text = render_report(metrics, ev.notes, {}).split("Undefined values are")[0]
    cfg, run_cfg = ev.inputs.cfg, ev.inputs.run_cfg
    params: dict[str, Any] = {"run": str(ev.inputs.run), "layer": ev.inputs.layer, "tokens": ev.inputs.tokens,
                              "backbone": str(ev.inputs.backbone.name),
                              "expansion": OmegaConf.select(run_cfg, "expansion", default=None),
                              "n_images": metrics["n_images"], "top_k": int(cfg.top_k),
                              "contrastive_batch_size": int(cfg.contrastive_batch_size), "seed": int(cfg.seed)}
    params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
    headline = {f"eval/{k}": float(metrics[k]) for k in HEADLINE_METRICS
                if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)}
    with SummaryWriter(str(directory / TENSORBOARD_DIR)) as writer:
        writer.add_text("evaluation", text, 0)
        experiment, session_start, session_end = hparams(params, headline)
        for summary in (experiment, session_start, session_end):
            writer.file_writer.add_summary(summary)
        for key, value in headline.items():
            writer.add_scalar(key, value, 0)


def write_explorer(ev: Evaluation, directory: Path) -> None:
    """explorer/: the SAE Explorer's data (docs/explorer.md), and the guessing game's machine-player accuracy
    added to the metrics (so it must run before write_metrics and write_report)."""
    cfg = ev.inputs.cfg
    if not cfg.get("explorer", True):
        return
    from sae_lightning.explorer.bundle import write_explorer_bundle
    from sae_lightning.explorer.game import metrics_entries

    i = ev.inputs
    game = write_explorer_bundle(directory, i.sae, i.backbone, layer=i.layer, tokens=i.tokens, shards=i.urls,
                                 n_game=int(cfg.get("n_game", 1000)), device=i.device, batch_size=int(cfg.batch_size),
                                 seed=int(cfg.seed), max_tokens=int(cfg.get("max_tokens", 4096)))
    ev.metrics |= metrics_entries(game)
    if game.get("accuracy") is not None:
        ev.notes.append(
            f"Guess the image (machine player): from an image's top-5 features alone it picks the image among 8 "
            f"candidates {100 * game['accuracy']:.1f}% of the time over {game['n_rounds']} rounds, against "
            f"{100 * game['baseline_accuracy']:.1f}% with 5 random live features (chance 12.5%).")


WRITERS: tuple[Callable[[Evaluation, Path], None], ...] = (
    write_config,
    write_feature_table,
    write_explorer,
    write_metrics,
    write_plots,
    write_report,
    write_tensorboard,
)


def swap_in(new: Path, out: Path) -> None:
    """Replace `out` by the complete directory `new` (a sibling of it).

    Where Linux allows, the two are exchanged in one atomic step; elsewhere the old one is renamed aside
    first (a crash between the two renames leaves it complete under `.<name>.old-*` beside `out`).
    """
    fsync_dir(new)
    if not out.exists():
        new.rename(out)
    elif exchange_paths(new, out):
        shutil.rmtree(new, ignore_errors=True)  # now the old evaluation
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)


def remove_leftovers(out: Path) -> None:
    """Temporary siblings a killed evaluation left (`.<name>.tmp-*`, `.<name>.old-*`): incomplete, or the
    evaluation the one being written replaces."""
    for leftover in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        log.info("removing %s, left by an interrupted evaluation", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def write_evaluation(ev: Evaluation, out: Path) -> Path:
    """Every writer into a temporary sibling of `out`, then swap it in; on any failure nothing changes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for writer in WRITERS:
            writer(ev, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the evaluation is as readable as the run
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for _, fig in ev.figures.values():
            plots.plt.close(fig)
    return out
