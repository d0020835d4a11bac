"""report.md: the metrics grouped (reconstruction, sparsity, model loss, cluster, alignment), each with a
one-line definition and the seed's value where the seed reported one, then every plot under a heading in
words. The exact definitions are in docs/metrics.md."""

from __future__ import annotations

import math
from typing import Any

# (key, one-line definition, the seed's value or None). Grouped as the report shows them.
METRIC_GROUPS: dict[str, list[tuple[str, str, Any]]] = {
    "Reconstruction": [
        ("mse_normalised", "mean over elements of (x̂ - x)² / ‖x‖, the training loss's mse", 0.0027),
        ("mse", "mean over elements of (x̂ - x)²", None),
        ("explained_variance_uncentred", "mean over tokens of 1 - ‖x - x̂‖² / ‖x‖²", 0.86),
        ("explained_variance", "1 - Σ‖x - x̂‖² / Σ‖x - mean(x)‖² (centred)", None),
    ],
    "Sparsity": [
        ("l0", "mean number of features with f > 0 per hooked token", 13.9),
        ("live_features", "features with density > 0", None),
        ("dead_features", "features that never fired (density 0)", None),
        ("ultra_rare_features", "features with density < 1e-5 (dead ones included)", None),
        ("dense_features", "features with density > 0.1", None),
    ],
    "Model loss": [
        ("contrastive_loss_original", "CLIP's contrastive loss, images against their own prompts", 1.895),
        ("contrastive_loss_sae", "the same with the hooked tokens replaced by the SAE reconstruction", 1.775),
        ("contrastive_loss_ablated", "the same with the hooked tokens set to zero", None),
        ("contrastive_loss_score", "(L_sae - L_original) / (L_ablated - L_original): 0 = nothing lost", None),
        ("contrastive_batch_size", "images per contrastive batch (the loss grows with it)", 1024),
        ("contrastive_batches", "full batches the losses average over", None),
        ("contrastive_unlabelled_images", "images without a label, left out of the loss", None),
        ("zero_shot_kl_sae", "mean KL(p_original ‖ p_sae) of the zero-shot class distributions (nats)", None),
        ("zero_shot_kl_ablated", "mean KL(p_original ‖ p_ablated) (nats)", None),
        ("zero_shot_accuracy_original", "zero-shot top-1 over all classes", None),
        ("zero_shot_accuracy_sae", "the same, SAE spliced in", None),
        ("zero_shot_accuracy_ablated", "the same, tokens zeroed", None),
    ],
    "Cluster": [
        ("cluster_found", "two bands in log10 mean top activation, separated (Ashman's D > 2)", None),
        ("cluster_size", "live features below the threshold: the ultra-low-density cluster", None),
        ("cluster_fraction", "cluster_size / all features", None),
        ("cluster_threshold_log10_mean_top_activation", "the mixture's decision boundary between the bands",
         None),
        ("cluster_separation", "Ashman's D of the two mixture components", None),
        ("cluster_encoder_cosine_inside", "mean pairwise cosine of encoder vectors in the cluster", None),
        ("cluster_encoder_cosine_outside", "the same for live features outside it", None),
        ("cluster_encoder_cosine_between", "mean cosine between one inside and one outside", None),
        ("label_entropy_features", "features with the seed's label entropy defined (fired at least once)",
         None),
        ("label_entropy_mean", "their mean label entropy (nats), the seed's way", None),
        ("label_entropy_mean_images", "mean number of images that entropy used (top-k, or all that fired)",
         None),
        ("label_entropy_fallback_features", "features that fired on fewer than k images (seed's fallback)",
         None),
        ("label_entropy_top_k_features", "features with the strict top-k entropy defined (>= k images)", None),
        ("label_entropy_top_k_mean", "their mean strict top-k label entropy (nats)", None),
        ("label_entropy_max", "ln(number of classes): the top of the scatter's colour scale", None),
    ],
    "Alignment": [
        ("alignment_n_features", "live features outside the cluster, analysed", None),
        ("alignment_n_neurons", "MLP neurons of the hooked block", None),
        ("alignment_threshold", "largest max-cosine any random Gaussian vector reaches", None),
        ("alignment_aligned_features", "features aligned to at least one neuron (cosine above it)", None),
        ("alignment_fraction_aligned", "that count / features analysed", None),
        ("alignment_mean_max_cosine", "mean over features of the max cosine to a neuron", None),
        ("alignment_baseline_mean_max_cosine", "the same for the random vectors", None),
        ("alignment_mean_aligned_neurons", "mean number of neurons each feature is aligned to", None),
    ],
    "Ground truth": [
        ("ground_truth_images", "held-out images with attribute records scored (the first of the pass)", None),
        ("ground_truth_values", "attribute values (colour, shape, size, count, background, effect, object)",
         None),
        ("ground_truth_min_images", "a value is scored when at least this many images have it and lack it", None),
        ("ground_truth_scorable_values", "values scored (enough images with and without them)", None),
        ("ground_truth_threshold", "AUROC at which one value explains a unit (monosemantic)", None),
        ("interpretability_sae_units", "live SAE features scored", None),
        ("interpretability_sae_monosemantic", "live SAE features with some value at AUROC >= threshold", None),
        ("interpretability_sae_covered", "values some live SAE feature explains at AUROC >= threshold", None),
        *[(f"interpretability_sae_covered_{g}", f"the same, {g} values only", None)
          for g in ("colour", "shape", "size", "count", "background", "effect", "object")],
        ("interpretability_neurons_units", "MLP neurons of the hooked block scored (non-constant)", None),
        ("interpretability_neurons_monosemantic", "the same fraction for the MLP neurons", None),
        ("interpretability_neurons_covered", "values some MLP neuron explains", None),
        ("ground_truth_random_directions", "random unit residual directions (as many as SAE features)", None),
        ("interpretability_random_units", "random directions scored (non-constant)", None),
        ("interpretability_random_monosemantic", "the same fraction for the random directions", None),
        ("interpretability_random_covered", "values some random direction explains", None),
        ("ground_truth_purity_top_k", "top images per unit that purity looks at", None),
        ("ground_truth_purity_threshold", "precision of those top images at which a unit is pure", None),
        ("ground_truth_purity_values", "values purity is scored on (scorable, in at most half of the images)", None),
        *[(f"interpretability_{family}_pure", f"live {what} whose top images nearly all share one value", None)
          for family, what in (("sae", "SAE features"), ("neurons", "MLP neurons"), ("random", "random directions"))],
        *[(f"interpretability_{family}_pure_covered", f"purity-scored values some {what} is pure for", None)
          for family, what in (("sae", "SAE feature"), ("neurons", "MLP neuron"), ("random", "random direction"))],
    ],
    "Feature labels": [
        ("label_method", "the method of the `label` column (the best on the scene world)", None),
        ("label_best_method", "the method with the best top-1 accuracy in this evaluation", None),
        ("label_vocabulary_size", "words in the label vocabulary", None),
        ("label_monosemantic_features", "monosemantic features the labels are scored on", None),
        *[(f"label_{m}_{k}", f"{m}: label{'s' if k == 'top5' else ''} naming the feature's best value, "
           f"{'top-1' if k == 'top1' else 'in the top 5'}", None)
          for m in ("encoder_lens", "decoder_lens", "intervention", "top_images") for k in ("top1", "top5")],
        *[(f"label_{m}_top1_related", f"{m}: first label names the best value, a part of it or a whole it is "
           f"part of (\"red\" / \"red star\")", None)
          for m in ("encoder_lens", "decoder_lens", "intervention", "top_images")],
    ],
    "Guess the image": [
        ("game_machine_accuracy", "a machine player picks the held-out image among 8 candidates from its top-5 "
         "features' top images alone (chance 12.5%)", None),
        ("game_baseline_accuracy", "the same player given 5 random live features instead", None),
        ("game_rounds", "rounds played (one per game image)", None),
    ],
    "Sizes": [
        ("n_images", "images evaluated", 524288),
        ("n_tokens", "hooked tokens the SAE saw", None),
        ("n_features", "SAE features", None),
        ("top_k", "top images kept per feature", 20),
        ("samples_skipped", "unreadable samples skipped", None),
    ],
}
PERCENT = {"explained_variance_uncentred", "explained_variance", "zero_shot_accuracy_original",
           "zero_shot_accuracy_sae", "zero_shot_accuracy_ablated", "cluster_fraction",
           "alignment_fraction_aligned", "game_machine_accuracy", "game_baseline_accuracy"}
PERCENT |= {f"interpretability_{f}_{k}" for f in ("sae", "neurons", "random") for k in ("monosemantic", "covered")}
PERCENT |= {f"interpretability_sae_covered_{g}" for g in ("colour", "shape", "size", "count", "background", "effect",
                                                           "object")}
PERCENT |= {f"label_{m}_{k}" for m in ("encoder_lens", "decoder_lens", "intervention", "top_images")
            for k in ("top1", "top5", "top1_related")}


def _fmt(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "undefined"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key in PERCENT and isinstance(value, (int, float)):
        return f"{100 * value:.3g}%"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_report(metrics: dict[str, Any], notes: list[str], plots: dict[str, tuple[str, str]]) -> str:
    """The markdown text. metrics: as in metrics.json; plots: file stem -> (heading, relative path)."""
    m = metrics
    lines = [
        "# SAE evaluation",
        "",
        f"Run `{m.get('run_dir')}`; SAE `{m.get('sae_path')}`; backbone {m.get('backbone')} "
        f"({m.get('pretrained')}), layer {m.get('layer')}, tokens {m.get('tokens')}; "
        f"{_fmt('n_images', m.get('n_images'))} images from {len(m.get('shards') or [])} shard(s); {m.get('date')}.",
        "The seed's values are from the seed post (CLIP ViT-L/14, cls token of layer 22, 524,288 held-out "
        "ImageNet images); every definition is in docs/metrics.md.",
        "",
    ]
    if m.get("warnings"):
        lines += ["**Warnings**", "", *[f"- {w}" for w in m["warnings"]], ""]
    for group, rows in METRIC_GROUPS.items():
        lines += [f"## {group}", "", "| metric | value | seed | definition |", "| --- | --- | --- | --- |"]
        for key, definition, seed in rows:
            if key in m:
                seed_text = _fmt(key, seed) if seed is not None else ""
                lines.append(f"| `{key}` | {_fmt(key, m[key])} | {seed_text} | {definition} |")
        lines.append("")
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]
    lines += ["Undefined values are `null` in metrics.json.", ""]
    for heading, path in plots.values():
        lines += [f"## {heading}", "", f"![{heading}]({path})", ""]
    return "\n".join(lines)
