"""Contrastive loss / zero-shot, three ways, on the tiny random open_clip ViT."""

import math

import pytest
import torch
import torch.nn.functional as F

from sae_lightning.backbone import load_tiny_backbone
from sae_lightning.evaluation.contrastive import (
    ContrastiveAccumulator,
    class_text_features,
    clip_contrastive_loss,
    contrastive_loss_score,
    evaluate_batch,
)

CLASSNAMES = ["red circle", "blue square", "green star", "yellow ring"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return load_tiny_backbone(tmp_path_factory.mktemp("tiny") / "tiny.pt")


def test_symmetric_ce_matches_a_hand_loop():
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
    txt = torch.tensor([[3.0, 1.0], [1.0, 1.0], [-1.0, 4.0]])
    scale = 7.5
    a = F.normalize(img, dim=1)
    b = F.normalize(txt, dim=1)
    logits = [[scale * float(a[i] @ b[j]) for j in range(3)] for i in range(3)]
    per_image = [-logits[i][i] + math.log(sum(math.exp(v) for v in logits[i])) for i in range(3)]
    per_text = [-logits[j][j] + math.log(sum(math.exp(logits[i][j]) for i in range(3))) for j in range(3)]
    expected = (sum(per_image) / 3 + sum(per_text) / 3) / 2
    assert clip_contrastive_loss(img, txt, torch.tensor(scale)).item() == pytest.approx(expected, rel=1e-6)


def test_score_definition():
    assert contrastive_loss_score(1.0, 1.5, 3.0) == pytest.approx(0.25)
    assert math.isnan(contrastive_loss_score(1.0, 1.5, 1.0))


@pytest.mark.parametrize("tokens", ["cls", "patches", "all"])
def test_identity_splice_equals_original_and_zero_equals_ablated(backbone, tokens):
    torch.manual_seed(0)
    images = torch.randn(6, 3, backbone.image_size, backbone.image_size)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])  # duplicates: two images share each of two prompt rows
    text = class_text_features(backbone, CLASSNAMES)
    scale = backbone.logit_scale()

    identity = evaluate_batch(backbone, torch.nn.Identity(), images, labels, 2, tokens, text, scale)
    assert identity["contrastive_loss_sae"] == identity["contrastive_loss_original"]
    assert identity["zero_shot_accuracy_sae"] == identity["zero_shot_accuracy_original"]
    assert identity["contrastive_loss_score"] == 0.0

    zero = evaluate_batch(backbone, torch.zeros_like, images, labels, 2, tokens, text, scale)
    assert zero["contrastive_loss_sae"] == zero["contrastive_loss_ablated"]
    assert zero["zero_shot_accuracy_sae"] == zero["zero_shot_accuracy_ablated"]
    assert zero["contrastive_loss_original"] == identity["contrastive_loss_original"]

    # the original way equals CLIP's own forward with the seed's prompts
    img = backbone.encode_image(images)
    txt = backbone.encode_text([f"A photo of a {CLASSNAMES[i]}." for i in labels])
    reference = clip_contrastive_loss(img, txt, scale).item()
    assert identity["contrastive_loss_original"] == pytest.approx(reference, rel=1e-5)
    top1 = (F.normalize(img, dim=-1) @ text.T).argmax(-1)
    assert identity["zero_shot_accuracy_original"] == pytest.approx((top1 == labels).float().mean().item())


def test_accumulator_uses_full_batches_for_the_loss_and_every_image_for_accuracy():
    text = torch.eye(3)
    acc = ContrastiveAccumulator(text, 10.0, batch_size=3)
    feats = torch.eye(3)
    acc.update(dict.fromkeys(("original", "sae", "ablated"), feats), torch.tensor([0, 1, 2]))
    acc.update(dict.fromkeys(("original", "sae", "ablated"), feats[:2]), torch.tensor([1, 1]))  # partial
    out = acc.compute()
    assert acc.n_batches == 1 and acc.n_images == 5
    assert out["contrastive_loss_original"] == pytest.approx(clip_contrastive_loss(feats, text, 10.0).item())
    assert out["zero_shot_accuracy_original"] == pytest.approx(4 / 5)
