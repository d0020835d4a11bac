"""Planted-feature recovery: train on data with a known dictionary through the real stack, score the result.

Every row is one `train_planted` run (SAETrainingModule + ActivationsDataModule + lightning.Trainer, CPU),
exported with its generator to outputs/benchmarks/planted/<row> so the scores can be recomputed from disk:
`python -m sae_lightning.planted outputs/benchmarks/planted/<row>`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace

from benchmarks.report import ROOT, Section, table
from sae_lightning.planted import PlantedRun, score_exported, train_planted

OUT = ROOT / "outputs" / "benchmarks" / "planted"
DEFAULT = PlantedRun()
VIT = replace(DEFAULT, variant="vit", l1_coefficient=5e-5)  # normalised mse / ||x||: ||x|| ~ 10 instead of 1.3

FULL = {
    "default": DEFAULT,
    "default-no-ghost": replace(DEFAULT, ghost_grads=False),
    "default-mean-init": replace(DEFAULT, b_dec_init="mean"),
    "default-plain-mse": replace(DEFAULT, mse="plain", l1_coefficient=6.5e-4),
    "default-seed-lr": replace(DEFAULT, lr=4e-4),
    "default-expansion-2": replace(DEFAULT, expansion=2),
    "vit": VIT,
    "vit-no-ghost": replace(VIT, ghost_grads=False),
    "vit-mean-init": replace(VIT, b_dec_init="mean"),
    "vit-plain-mse": replace(VIT, mse="plain", l1_coefficient=5e-4),
}
QUICK = {name: replace(FULL[name], steps=300, n_train=32_768, n_eval=4096) for name in ("default", "vit")}


def describe(run: PlantedRun) -> list:
    """The knobs a row differs in."""
    return [run.variant, "on" if run.ghost_grads else "off", run.b_dec_init.replace("geometric_median", "median"),
            run.mse, f"{run.l1_coefficient:g}", f"{run.lr:g}", f"{run.expansion}x ({run.expansion * run.d})",
            run.steps]


def run(quick: bool = False) -> Section:
    rows, reproduced = [], True
    out = OUT / "quick" if quick else OUT  # a smoke run never overwrites the exports BENCHMARKS.md describes
    for name, planted_run in (QUICK if quick else FULL).items():
        start = time.perf_counter()
        _, scores = train_planted(planted_run, out / name)
        elapsed = time.perf_counter() - start
        reproduced &= score_exported(out / name) == scores
        met = scores["mmcs"] >= 0.99 and scores["recovered_0.9"] >= 0.95
        mmcs_down = math.floor(scores["mmcs"] * 1e4) / 1e4  # so 0.98997 never reads as 0.9900
        rows.append([name, *describe(planted_run), f"{mmcs_down:.4f}", f"{100 * scores['recovered_0.9']:.1f}%",
                     f"{scores['l0']:.1f}", f"{scores['explained_variance']:.3f}",
                     f"{scores['explained_variance_uncentred']:.3f}", f"{100 * scores['dead_fraction']:.1f}%",
                     "yes" if met else "no", f"{elapsed:.0f}"])
    common = ", ".join(f"{k}={v}" for k, v in asdict(DEFAULT).items()
                       if k in ("d", "n_features", "active", "frequency_ratio", "n_train", "sae_batch_size",
                                "buffer_size", "lr_warmup_steps", "dead_feature_window", "seed"))
    body = f"""
Data (`sae_lightning/planted.py`): x = mean + scales * sum_i a_i d_i with {DEFAULT.n_features} random unit
d_i in d = {DEFAULT.d}, feature i active with probability decaying geometrically over a 10x range (about
{DEFAULT.active:g} active per sample), a_i ~ U(0, 1). "default": mean 0, unit scales. "vit": a shared mean of
norm 10 (about 7x a sample's feature part) and per-dimension scales exp(N(0, 0.5^2)); the true directions
are then scales * d_i, normalised. Scores on {DEFAULT.n_eval:,} held-out samples: MMCS = mean over true
features of the best cosine with a decoder row; recovered = fraction with such a cosine > 0.9; dead = SAE
features that never fire on them. Target: MMCS >= 0.99 and >= 95% recovered (MMCS shown rounded down).
Common settings: {common}.
Every run is the real training stack (module, activations DataModule and shuffle buffer, Lightning's
Trainer, CPU); re-scored from its exported files: {"identical" if reproduced else "DIFFERENT"}.

{table(["run", "data", "ghost grads", "b_dec init", "mse", "l1", "lr", "expansion (F)", "steps", "MMCS",
        "recovered", "l0", "EV", "EV uncentred", "dead", "target", "s"], rows)}

Reading it: with lr 3e-3 the seed's method reaches the target on both variants; the seed's own lr (4e-4)
has not converged in 2,000 steps of 128 (the rare features come last), and a dictionary only as large as
the true one (2x = 512) misses the rarest features. Ghost grads change how many SAE features stay dead
(surplus ones: F = 2K) but not recovery; mean vs geometric-median b_dec init makes no difference that
survives a change of seed here (the geometric median helps when the data has outliers, which these lack).
The normalised mse divides by ||x||, so the l1 coefficient that gives the same sparsity depends on the
activation norm: 4e-4 for the default data, 5e-5 for the "vit" data; plain mse needs its own value.
On the "vit" data the uncentred explained variance is about 0.999 whatever the SAE learns, because the
shared mean dominates ||x||: there only the centred EV says how much of the features' part is explained.
"""
    return Section("Planted-feature recovery", body)
