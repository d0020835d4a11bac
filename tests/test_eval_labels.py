"""Automatic feature labels: every method names "red" for a hand-built feature that fires on red objects, in a
small CLIP-shaped model whose text embeddings are controlled; scoring against the ground truth."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from sae_lightning.evaluation.ground_truth import GroundTruthData, attribute_vocabulary, present_values
from sae_lightning.evaluation.labels import (
    METHODS,
    PROMPT,
    concept_vocabulary,
    label_accuracy,
    method_vectors,
    rank_labels,
    scene_word,
    text_embeddings,
)
from sae_lightning.sae import SparseAutoencoder
from sae_lightning.world.scenes import sample_scene

WIDTH, EMBED = 48, 96


class Visual(nn.Module):
    def __init__(self, gen):
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, 1)
        self.ln_post = nn.LayerNorm(WIDTH)
        with torch.no_grad():
            self.ln_post.weight.copy_(0.5 + torch.rand(WIDTH, generator=gen))
            self.ln_post.bias.copy_(torch.randn(WIDTH, generator=gen))
        self.proj = nn.Parameter(torch.randn(WIDTH, EMBED, generator=gen) / WIDTH ** 0.5)


class ControlledCLIP(nn.Module):
    """CLIP-shaped: the hook is the last block (forward_from = ln_post of the cls token, then the projection, as
    open_clip's head), and the text embedding of each prompt is a fixed random vector."""

    def __init__(self, words):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.visual = Visual(gen)
        self.model = self
        self.embed_dim, self.width = EMBED, WIDTH
        self.table = {PROMPT.format(label=w): torch.randn(EMBED, generator=gen) for w in words}

    @property
    def device(self):
        return torch.device("cpu")

    def encode_text(self, prompts):
        return torch.stack([self.table[p] for p in prompts])

    def forward_from(self, residual, layer):
        return self.visual.ln_post(residual[:, 0]) @ self.visual.proj


def direction_for(backbone, target):
    """A residual direction d with layer_norm(d, ln_post.weight) @ proj proportional to `target`: d = u / w with
    u @ proj = target and sum(u / w) = 0 (so d has mean 0 and its layer norm is proportional to u)."""
    w = backbone.visual.ln_post.weight.detach()
    a = torch.cat([backbone.visual.proj.detach().T, (1 / w)[None]])  # [E + 1, d]
    b = torch.cat([target, torch.zeros(1)])
    u = torch.linalg.lstsq(a.double(), b.double()[:, None]).solution[:, 0].float()
    return u / w


@pytest.fixture(scope="module")
def world():
    values = attribute_vocabulary()
    words = [scene_word(v) for v in values]
    backbone = ControlledCLIP(words)
    text = text_embeddings(backbone, words)
    red = values.index("colour=red")
    rng = np.random.default_rng(0)
    records = [sample_scene(rng) for _ in range(200)]
    is_red = torch.tensor(["colour=red" in present_values(r) for r in records])
    assert 10 < int(is_red.sum()) < 190
    gen = torch.Generator().manual_seed(1)
    # image embeddings: red scenes lean towards the text embedding of "red"
    emb = torch.randn(200, EMBED, generator=gen) + 4 * is_red[:, None] * text[red]
    emb = torch.nn.functional.normalize(emb, dim=-1)
    torch.manual_seed(0)
    sae = SparseAutoencoder(WIDTH, 3)
    d = direction_for(backbone, text[red])
    with torch.no_grad():
        sae.W_enc[:, 0] = d
        sae.W_dec[0] = d / d.norm()
    rows = torch.nonzero(is_red).squeeze(1)
    data = GroundTruthData(
        n_images=200, n_features=3, sae_rows=rows, sae_cols=torch.zeros_like(rows),
        sae_values=1 + torch.rand(len(rows), generator=gen), neurons=torch.zeros(200, 1), random=torch.zeros(200, 1),
        embeddings=emb, residuals=torch.randn(8, 5, WIDTH, generator=gen), values=values, labels=None,
        keys=[str(i) for i in range(200)])
    return backbone, sae, data, text, words, red


@pytest.mark.parametrize("method", METHODS)
def test_every_method_names_red_for_a_feature_firing_on_red_objects(world, method):
    backbone, sae, data, text, words, red = world
    live = torch.tensor([True, False, False])
    scales = torch.tensor([50.0, math.nan, math.nan])  # the intervention adds 50 x the unit decoder row
    vectors = method_vectors(method, backbone=backbone, sae=sae, data=data, layer=0, tokens="cls", scales=scales,
                             live=live, k=20)
    top, cos = rank_labels(vectors, text)
    assert words[top[0, 0]] == "red" and top[0, 0].item() == red
    assert cos[0, 0] > cos[0, 1]
    assert (top[1:] == -1).all() and torch.isnan(cos[1:]).all()  # not live: no label


def test_intervention_names_the_word_of_the_pushed_direction(world):
    """The label comes from the pushed direction, not from the images: pushing another word's direction
    names that word."""
    backbone, sae, data, text, words, red = world
    blue = words.index("blue")
    d = direction_for(backbone, text[blue])
    other = SparseAutoencoder(WIDTH, 1)
    with torch.no_grad():
        other.W_dec[0] = d / d.norm()
    vectors = method_vectors("intervention", backbone=backbone, sae=other, data=data, layer=0, tokens="cls",
                             scales=torch.tensor([50.0]), live=torch.tensor([True]), k=20)
    assert rank_labels(vectors, text)[0][0, 0].item() == blue


def test_label_accuracy_counts_top1_and_top5_over_the_monosemantic_features_only():
    top = torch.tensor([[3, 1, 2, 0, 4], [0, 1, 2, 3, 4], [9, 8, 7, 6, 5], [1, 2, 3, 4, 5]])
    truth = torch.tensor([3, 4, 0, 1])
    mask = torch.tensor([True, True, True, False])
    top1, top5 = label_accuracy(top, truth, mask)
    assert top1 == pytest.approx(1 / 3) and top5 == pytest.approx(2 / 3)
    assert all(math.isnan(x) for x in label_accuracy(top, truth, torch.zeros(4, dtype=torch.bool)))


def test_vocabularies():
    assert scene_word("colour=red") == "red" and scene_word("object=red star") == "red star"
    assert scene_word("count=2") == "two objects" and scene_word("background=stripes") == "striped background"
    words = concept_vocabulary(["tench", "red"])
    assert words[:2] == ["tench", "red"] and words.count("red") == 1 and len(words) > 200
    assert not any(w.startswith("#") or not w for w in words)


def test_related_accuracy_accepts_parts_and_wholes_only():
    from sae_lightning.evaluation.labels import related_accuracy

    values = attribute_vocabulary()
    v = values.index
    top = torch.tensor([[v("object=red star")], [v("colour=red")], [v("object=blue star")], [v("shape=ring")]])
    truth = torch.tensor([v("colour=red"), v("object=red star"), v("colour=red"), v("shape=star")])
    assert related_accuracy(top, truth, torch.ones(4, dtype=torch.bool), values) == 0.5
