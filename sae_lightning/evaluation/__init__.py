"""Measuring a trained SAE: contrastive loss / zero-shot with the SAE spliced in, per-feature statistics,
the ultra-low-density cluster, neuron alignment, plots and reports (see docs/format-eval.md)."""

from sae_lightning.evaluation.callback import ContrastiveEvalCallback
from sae_lightning.evaluation.contrastive import clip_contrastive_loss, contrastive_loss_score, evaluate_batch
from sae_lightning.evaluation.feature_stats import FeatureStats, FeatureStatsAccumulator, label_entropy
from sae_lightning.evaluation.run import evaluate_run

__all__ = [
    "ContrastiveEvalCallback",
    "FeatureStats",
    "FeatureStatsAccumulator",
    "clip_contrastive_loss",
    "contrastive_loss_score",
    "evaluate_batch",
    "evaluate_run",
    "label_entropy",
]
