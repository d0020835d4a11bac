"""Issue 7 items 7, 8, 15: report.md grouped with definitions and the seed's values, a sentence for a negative
score, plot headings in words, integer ticks on count histograms, the scatter's fixed entropy scale."""

import math
from types import SimpleNamespace

import torch

from sae_lightning.evaluation import plots
from sae_lightning.evaluation.analyses import contrastive
from sae_lightning.evaluation.report import METRIC_GROUPS, render_report


def _metrics() -> dict:
    m = {key: 0.5 for rows in METRIC_GROUPS.values() for key, _, _ in rows}
    return m | {"run_dir": "/r", "n_images": 524288, "cluster_found": True, "contrastive_batch_size": 1024}


def test_report_groups_in_order_with_definitions_and_seed_values():
    text = render_report(_metrics(), [], {"density_histogram": ("Feature density", "plots/density_histogram.png")})
    heads = [text.index(f"## {g}\n") for g in ("Reconstruction", "Sparsity", "Model loss", "Cluster", "Alignment")]
    assert heads == sorted(heads)
    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines() if line.startswith("| `")}
    assert "| 0.0027 |" in rows["mse_normalised"] and "/ ‖x‖" in rows["mse_normalised"]
    assert "| 13.9 |" in rows["l0"]
    assert "| 86% |" in rows["explained_variance_uncentred"]
    assert "| 1.775 |" in rows["contrastive_loss_sae"] and "| 1.895 |" in rows["contrastive_loss_original"]
    for line in rows.values():
        assert len([c for c in line.split("|")[4].strip()]) > 5  # every metric has its definition
    assert "## Feature density\n\n![Feature density](plots/density_histogram.png)" in text
    assert "## density_histogram" not in text


def _ev(score: float, batch: int = 1024):
    values = {"contrastive_loss_score": score, "contrastive_batches": 3}
    stream = SimpleNamespace(contrastive=values, contrastive_undefined_reason=None)
    inputs = SimpleNamespace(cfg=SimpleNamespace(contrastive_batch_size=batch))
    return SimpleNamespace(stream=stream, inputs=inputs, metrics={}, notes=[])


def test_negative_score_gets_an_explanation():
    ev = _ev(-0.2)
    contrastive(ev)
    assert len(ev.notes) == 1 and "negative (-0.2)" in ev.notes[0] and "noise" in ev.notes[0]
    assert "negative" in render_report(ev.metrics, ev.notes, {})
    positive = _ev(0.3)
    contrastive(positive)
    assert positive.notes == [] and positive.metrics["contrastive_batch_size"] == 1024
    small = _ev(0.3, batch=64)
    contrastive(small)
    assert "batches of 64 images" in small.notes[0]


def test_count_histograms_have_integer_ticks():
    fig = plots.aligned_counts_histogram(torch.tensor([0, 1, 1, 2, 0, 0]))
    ticks = [t for t in fig.axes[0].get_xticks() if -0.5 <= t <= 2.5]
    assert ticks and all(float(t).is_integer() for t in ticks)
    fig = plots.density_histogram(torch.tensor([0.1, 0.2, 0.01]))
    assert all(float(t).is_integer() for t in fig.axes[0].get_yticks())
    plots.plt.close("all")


def test_scatter_colours_the_seeds_entropy_on_a_fixed_scale():
    n = 50
    entropy = torch.linspace(0, 1, n)
    entropy[0] = math.nan  # never fired
    fig = plots.cluster_scatter(torch.linspace(-4, -1, n), torch.linspace(-1, 1, n), entropy,
                                torch.zeros(n, dtype=torch.bool), 20, max_entropy=math.log(10), threshold=0.0)
    coloured = [c for c in fig.axes[0].collections if c.get_array() is not None]
    assert len(coloured) == 1 and coloured[0].get_clim() == (0.0, math.log(10))
    plots.plt.close(fig)
