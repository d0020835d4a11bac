"""Ground-truth interpretability: exact AUROC with ties, monosemanticity of hand-built units, the streaming
consumer's captures (MLP hidden units, random directions, embeddings) against direct computations."""

import math
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from sae_lightning.backbone import load_tiny_backbone, select_tokens
from sae_lightning.evaluation.ground_truth import (
    GroundTruthConsumer,
    attribute_vocabulary,
    auroc,
    interpretability,
    present_values,
    purity,
    scorable_values,
    top_k_precision,
)
from sae_lightning.evaluation.stream import TokenChunk
from sae_lightning.sae import SparseAutoencoder
from sae_lightning.world.scenes import sample_scene


def pairwise_auroc(scores, labels):
    """The definition: P(score of a positive > score of a negative), ties counting 1/2."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_matches_a_hand_computation_with_ties():
    scores = torch.tensor([[0.1], [0.4], [0.4], [0.8], [0.4]])
    labels = torch.tensor([[0], [1], [0], [1], [1]], dtype=torch.bool)
    # positives 0.4, 0.8, 0.4; negatives 0.1, 0.4: (1 + 1/2) + (1 + 1) + (1 + 1/2) = 5 of 6 pairs
    assert auroc(scores, labels)[0, 0].item() == pytest.approx(5 / 6, abs=1e-12)
    # all tied: exactly 1/2; a value never present (or always present): undefined
    flat = auroc(torch.zeros(5, 1), torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1], [0, 0, 1]]).bool())
    assert flat[0, 0].item() == 0.5 and math.isnan(flat[0, 1]) and math.isnan(flat[0, 2])


def test_auroc_matches_the_definition_and_torchmetrics_on_many_columns():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (200, 37), generator=gen).float()  # many ties
    scores[:, 5] = torch.randn(200, generator=gen)  # none
    labels = torch.rand(200, 4, generator=gen) < torch.tensor([0.1, 0.5, 0.9, 0.3])
    table = auroc(scores, labels, chunk=8)  # several chunks
    assert table.shape == (37, 4) and table.dtype == torch.float64
    for c in (0, 5, 36):
        for v in range(4):
            expected = pairwise_auroc(scores[:, c].tolist(), labels[:, v].tolist())
            assert table[c, v].item() == pytest.approx(expected, abs=1e-12)
            assert table[c, v].item() == pytest.approx(binary_auroc(scores[:, c], labels[:, v].long()).item(),
                                                       abs=1e-6)


def scene_labels(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    records = [sample_scene(rng) for _ in range(n)]
    values = attribute_vocabulary()
    y = torch.zeros(n, len(values), dtype=torch.bool)
    for i, record in enumerate(records):
        for v in present_values(record):
            y[i, values.index(v)] = True
    return records, values, y


def test_a_feature_firing_exactly_on_one_attribute_scores_1_and_a_random_one_about_one_half():
    records, values, y = scene_labels(600)
    red = values.index("colour=red")
    gen = torch.Generator().manual_seed(1)
    exact = y[:, red].float() * (1 + torch.rand(600, generator=gen))  # fires (any strength) iff a red object
    random = torch.rand(600, generator=gen)
    dead = torch.zeros(600)
    table = auroc(torch.stack([exact, random, dead], 1), y)
    assert table[0, red].item() == 1.0
    assert abs(table[1, red].item() - 0.5) < 0.1
    result = interpretability(table, torch.tensor([True, True, False]))
    assert result.best_value[0].item() == red and result.best_auroc[0].item() == 1.0
    assert result.monosemantic.tolist() == [True, False, False]
    assert result.best_value[2].item() == -1  # not live: never counted
    assert 0.5 <= result.best_auroc[1].item() < 0.75  # the best over 76 values of a random unit stays far from 0.9
    assert result.fraction_monosemantic == 0.5  # of the two live units
    # covered: "red", and the red objects (every red star fires it; few images without one do)
    covered = {values[v] for v in torch.nonzero(result.value_best_auroc >= 0.9).squeeze(1).tolist()}
    assert "colour=red" in covered and all(v.startswith("object=red ") for v in covered - {"colour=red"})
    scored = torch.isfinite(table).any(0)
    assert result.fraction_covered == pytest.approx(len(covered) / int(scored.sum()))
    assert result.value_best_auroc[red].item() == 1.0


def test_top_k_precision_and_purity_match_a_hand_computation():
    # 6 images, 3 values: v0 in images 0, 1, 2 (base 1/2), v1 in image 5 only (base 1/6), v2 in 0-4 (base 5/6)
    labels = torch.zeros(6, 3, dtype=torch.bool)
    labels[[0, 1, 2], 0] = True
    labels[5, 1] = True
    labels[:5, 2] = True
    acts = torch.tensor([[5.0, 0.0, 1.0, 0.0],
                         [4.0, 0.0, 2.0, 0.0],
                         [0.0, 0.0, 3.0, 0.0],
                         [3.0, 0.0, 4.0, 0.0],
                         [0.0, 0.0, 5.0, 0.0],
                         [2.0, 7.0, 6.0, 0.0]])
    # unit 0: top 4 of the images above its minimum (0) = 0, 1, 3, 5: v0 in 2 of 4, v1 in 1, v2 in 3
    # unit 1: only one image above its minimum: fewer than k, not scored; unit 3: constant, not scored
    # unit 2 (dense): top 4 = images 5, 4, 3, 2: v0 in 1 of 4, v1 in 1, v2 in 3
    precision = top_k_precision(acts, labels, k=4)
    torch.testing.assert_close(precision[[0, 2]], torch.tensor([[0.5, 0.25, 0.75], [0.25, 0.25, 0.75]]))
    assert torch.isnan(precision[[1, 3]]).all()
    result = purity(precision, labels.float().mean(0), torch.tensor([True, True, True, False]), threshold=0.5)
    # v2 (in 5/6 of the images) is not scored; unit 2's tie between v0 and v1 goes to the rarer v1
    torch.testing.assert_close(result.purity[[0, 2]], torch.tensor([0.5, 0.25]))
    assert result.best_value.tolist() == [0, -1, 1, -1]
    assert result.pure.tolist() == [True, False, False, False]
    assert result.fraction_pure == pytest.approx(1 / 3)  # of three live units, the unscored one counts as not pure
    torch.testing.assert_close(result.value_best_precision, torch.tensor([0.5, 0.25, math.nan]), equal_nan=True)
    assert result.fraction_covered == 0.5 and result.n_scorable == 2
    with pytest.raises(ValueError, match="rows"):
        top_k_precision(acts, labels[:5], k=4)


def test_purity_credits_a_sparse_pure_feature_that_auroc_misses():
    """A feature firing on a quarter of the red images only: AUROC about 0.62 on "red", purity 1."""
    records, values, y = scene_labels(1200)
    red = values.index("colour=red")
    gen = torch.Generator().manual_seed(2)
    sparse = y[:, red].float() * (torch.rand(1200, generator=gen) < 0.25) * (1 + torch.rand(1200, generator=gen))
    random = torch.randn(1200, generator=gen)
    acts = torch.stack([sparse, random], 1)
    live = torch.tensor([True, True])
    table = auroc(acts, y)
    assert table[0, red].item() < 0.7 and not interpretability(table, live).monosemantic[0]
    result = purity(top_k_precision(acts, y), y.float().mean(0), live)
    assert result.best_value[0].item() == red and result.purity[0].item() == pytest.approx(1.0)
    assert result.pure.tolist() == [True, False] and result.purity[1].item() < 0.7
    # ties go to the rarer value: a feature on red stars only is a "red star" feature, though all its images are red
    star = values.index("object=red star")
    red_star = y[:, star].float() * (1 + torch.rand(1200, generator=gen))
    both = purity(top_k_precision(red_star[:, None], y), y.float().mean(0), torch.tensor([True]))
    assert both.best_value[0].item() == star


def test_presence_of_values_follows_the_record():
    record = {"count": 2, "background": "stripes", "effect": "pixelated",
              "objects": [{"colour": "red", "shape": "star", "size": "large"},
                          {"colour": "blue", "shape": "ring", "size": "large"}]}
    assert present_values(record) == {"count=2", "background=stripes", "effect=pixelated", "colour=red",
                                      "colour=blue", "shape=star", "shape=ring", "size=large", "object=red star",
                                      "object=blue ring"}
    assert set(present_values(record)) <= set(attribute_vocabulary())


def test_rare_values_are_not_scored():
    y = torch.zeros(100, 3, dtype=torch.bool)
    y[:19, 0] = True  # 19 positives: too few
    y[:50, 1] = True
    y[:81, 2] = True  # 19 negatives: too few
    assert scorable_values(y).tolist() == [False, True, False]


@pytest.mark.parametrize("tokens", ["cls", "patches"])
def test_consumer_captures_neurons_random_directions_and_embeddings(tmp_path, tokens):
    backbone = load_tiny_backbone(tmp_path / "tiny.pt")
    layer = 1
    torch.manual_seed(0)
    sae = SparseAutoencoder(backbone.width, 64)
    images = torch.randint(0, 256, (10, 3, backbone.image_size, backbone.image_size), dtype=torch.uint8)
    keys = [f"s.tar/{i}" for i in range(10)]
    rng = np.random.default_rng(0)
    records = {k: sample_scene(rng) for k in keys if k != "s.tar/3"}  # one image without a record: skipped
    consumer = GroundTruthConsumer(backbone, sae, layer=layer, tokens=tokens, records=records, max_images=7,
                                   n_random=16, label_images=4, seed=0)
    pre = []
    handle = backbone.visual.transformer.resblocks[layer].mlp.c_fc.register_forward_hook(
        lambda m, a, out: pre.append(out))
    with torch.no_grad():
        for batch in (slice(0, 6), slice(6, 10)):  # two batches, chunks of 4 rows inside
            x_all = select_tokens(backbone.residual(images[batch], layer), tokens)
            for start in range(0, x_all.shape[0], 4):
                x = x_all[start : start + 4]
                acts = sae.encode(x)
                b = list(range(10))[batch][start : start + 4]
                consumer.update(TokenChunk(x, sae.decode(acts), acts, torch.zeros(len(b)), torch.tensor(b),
                                           [keys[i] for i in b]))
    data = consumer.compute()
    handle.remove()
    kept = [0, 1, 2, 4, 5, 6, 7]  # the first 7 images with a record
    assert data.keys == [keys[i] for i in kept] and data.n_images == 7
    with torch.no_grad():
        x = select_tokens(backbone.residual(images[kept], layer), tokens)
        hidden = select_tokens(backbone.visual.transformer.resblocks[layer].mlp.gelu(torch.cat(pre)), tokens)
        embeddings = torch.nn.functional.normalize(backbone.encode_image(images[kept]), dim=-1)
        acts = sae.encode(x)
    hidden = hidden[kept]
    image_level = (lambda t: t.amax(1)) if tokens == "patches" else (lambda t: t)
    torch.testing.assert_close(data.neurons, image_level(hidden), atol=1e-5, rtol=1e-5)
    assert data.neurons.shape[1] == backbone.visual.transformer.resblocks[layer].mlp.c_fc.out_features
    gen = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(16, backbone.width, generator=gen), dim=1)
    torch.testing.assert_close(data.random, image_level(x @ directions.T), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(data.embeddings, embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(data.sae_dense(0, 64), image_level(acts).clamp_min(0), atol=1e-6, rtol=1e-6)
    assert data.residuals.shape == (4, backbone.n_tokens, backbone.width)
    values = attribute_vocabulary()
    for row, i in enumerate(kept):
        assert {values[v] for v in torch.nonzero(data.labels[row]).squeeze(1).tolist()} == \
            present_values(records[keys[i]])
    # hooks are gone: a later forward pass does not feed the consumer
    assert not backbone.visual.transformer.resblocks[layer]._forward_hooks


def test_without_records_only_what_the_labels_need_is_kept(tmp_path):
    backbone = load_tiny_backbone(tmp_path / "tiny.pt")
    sae = SparseAutoencoder(backbone.width, 32)
    consumer = GroundTruthConsumer(backbone, sae, layer=0, tokens="cls", records=None, max_images=5, label_images=2)
    images = torch.randint(0, 256, (6, 3, backbone.image_size, backbone.image_size), dtype=torch.uint8)
    with torch.no_grad():
        x = backbone.activations(images, 0, "cls")
        acts = sae.encode(x)
    consumer.update(TokenChunk(x, sae.decode(acts), acts, torch.zeros(6), torch.arange(6), [str(i) for i in range(6)]))
    data = consumer.compute()
    assert data.labels is None and data.values is None and data.n_images == 5
    assert data.random.shape == (5, 0) and data.neurons.numel() == 0  # no 1 GiB of random projections for nothing
    assert data.embeddings.shape == (5, backbone.embed_dim) and data.residuals.shape[0] == 2


@pytest.mark.slow
def test_evaluate_writes_ground_truth_and_labels_that_recompute_from_the_files(demo_run, tmp_path):
    """evaluate.py on scene shards: the metrics follow from features.safetensors + features.json, and the AUROC
    table from the shards' attribute records and the SAE's activations."""
    import json

    from hydra import compose, initialize_config_dir
    from safetensors.torch import load_file

    from sae_lightning.data.synthetic import read_attribute_records
    from sae_lightning.evaluation.run import evaluate_run
    CONF = Path(__file__).resolve().parents[1] / "conf"

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"run={demo_run}", f"out_dir={tmp_path / 'eval'}", "top_k=5", "batch_size=32", "contrastive_batch_size=32",
            "num_workers=0", "device=cpu", "n_grid_features=0", "explorer=false", "tensorboard=false",
            "ground_truth_images=100"])
    metrics = evaluate_run(cfg)
    t = load_file(str(tmp_path / "eval" / "features.safetensors"))
    names = json.loads((tmp_path / "eval" / "features.json").read_text())["names"]
    values, keys = names["gt_values"], names["gt_image_keys"]
    assert values == attribute_vocabulary() and len(keys) == 100 == metrics["ground_truth_images"]
    live = t["density"] > 0
    assert metrics["interpretability_sae_units"] == int(live.sum())
    mono = t["gt_monosemantic"]
    assert torch.equal(mono, live & (t["gt_best_auroc"] >= 0.9))
    assert metrics["interpretability_sae_monosemantic"] == pytest.approx(int(mono.sum()) / int(live.sum()))
    table = t["gt_auroc"]
    best = table.nan_to_num(-1).max(1)
    assert torch.equal(t["gt_best_value"][live], best.indices[live])
    # the table from the records and the SAE's own activations on those images
    records = read_attribute_records(metrics["shards"])
    y = torch.tensor([[v in present_values(records[k]) for v in values] for k in keys])
    import os

    import webdataset as wds

    from sae_lightning.evaluation.inputs import prepare_inputs

    inputs = prepare_inputs(cfg)
    images = {f"{os.path.basename(url)}/{s['__key__']}": s["jpg"] for url in inputs.urls
              for s in wds.WebDataset(url, shardshuffle=False, empty_check=False).decode("pil")}
    pixels = torch.stack([inputs.backbone.pixel_transform(images[k]) for k in keys])
    with torch.no_grad():
        acts = inputs.sae.encode(inputs.backbone.activations(pixels, inputs.layer, inputs.tokens).float())
    expected = auroc(acts, y)
    expected[:, ~scorable_values(y)] = math.nan
    torch.testing.assert_close(table, expected.float(), atol=1e-5, rtol=0, equal_nan=True)
    # purity from the same activations and records
    base = y.float().mean(0)
    base[~scorable_values(y)] = math.nan
    pure = purity(top_k_precision(acts, y), base, live)
    torch.testing.assert_close(t["gt_purity"], pure.purity, atol=1e-5, rtol=0, equal_nan=True)
    assert torch.equal(t["gt_pure"], pure.pure) and torch.equal(t["gt_pure"], live & (t["gt_purity"] >= 0.8))
    assert metrics["interpretability_sae_pure"] == pytest.approx(pure.fraction_pure)
    assert metrics["interpretability_sae_pure_covered"] == pytest.approx(pure.fraction_covered)
    assert 0 <= metrics["interpretability_random_pure"] <= 1
    # labels: every method's top-5 table, the default column, the vocabulary
    assert len(names["label_vocabulary"]) == len(values)
    for method in ("encoder_lens", "decoder_lens", "intervention", "top_images"):
        assert t[f"label_{method}"].shape == (len(live), 5)
        assert (t[f"label_{method}"][live] >= 0).all() and (t[f"label_{method}"][~live] == -1).all()
        assert f"label_{method}_top1" in metrics
    assert torch.equal(t["label"], t[f"label_{metrics['label_method']}"][:, 0])
