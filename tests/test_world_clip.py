"""The tiny CLIP: training lowers ClipLoss, the cached checkpoint loads through the backbone loader."""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import open_clip
import pytest
import torch
from torch.utils.data import DataLoader

from sae_lightning.backbone import load_backbone
from sae_lightning.world import train_clip
from sae_lightning.world.clip_model import (
    CaptionedScenes,
    GroupBatchSampler,
    TinyClipModule,
    perturb,
    render_hard_negative_scenes,
    render_scenes,
    simplify,
)
from sae_lightning.world.scenes import sample_scene
from sae_lightning.world.train_clip import TinyClipConfig, ensure_tiny_clip, metadata_path, read_metadata

MICRO = "sae-test-micro-clip"
MICRO_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2},
}


@pytest.fixture(scope="module", autouse=True)
def micro_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / f"{MICRO}.json"
    path.write_text(json.dumps(MICRO_CONFIG))
    open_clip.add_model_config(path)
    return MICRO


def micro_config(**changes) -> TinyClipConfig:
    fields = {"model_name": MICRO, "image_size": 32, "n_train": 64, "n_captions": 2, "steps": 3, "batch_size": 16,
              "group_size": 4, "warmup_steps": 1, "n_eval": 16}
    return TinyClipConfig(**{**fields, **changes})


def test_a_few_steps_lower_the_clip_loss():
    torch.manual_seed(0)
    images, records = render_scenes(np.random.default_rng(0), 32, 32)
    dataset = CaptionedScenes(images, records, open_clip.get_tokenizer(MICRO), n_captions=1, seed=0)
    assert dataset.images.dtype == torch.uint8 and dataset.images.shape == (32, 3, 32, 32)
    assert dataset.tokens.shape == (32, 1, 32)
    module = TinyClipModule(MICRO, lr=3e-3, warmup_steps=1, max_steps=40)
    fixed = (dataset.images, dataset.tokens[:, 0])
    with torch.no_grad():
        before = float(module.clip_loss(*fixed))
    assert before > 0.9 * np.log(32)  # untrained: no better than chance, log(batch size)
    trainer = L.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(dataset, batch_size=32, shuffle=True))
    with torch.no_grad():
        after = float(module.clip_loss(*fixed))
    print(before, after)
    assert after < 0.5 * before, (before, after)


def test_captioned_scenes_rephrase_the_same_facts():
    images, records = render_scenes(np.random.default_rng(1), 4, 16)
    tokenizer = open_clip.get_tokenizer(MICRO)
    dataset = CaptionedScenes(images, records, tokenizer, n_captions=3, seed=0)
    assert torch.equal(dataset.tokens[:, 0], tokenizer([r["caption"] for r in records]))
    assert not torch.equal(dataset.tokens[:, 1], dataset.tokens[:, 2])


@pytest.mark.slow
def test_checkpoint_cached_by_config_and_loaded_like_real_weights(tmp_path, monkeypatch):
    path = tmp_path / "micro.pt"
    config = micro_config()
    trained = []
    real_train = train_clip.train_tiny_clip

    def counting_train(cfg, **kwargs):
        module = real_train(cfg, **kwargs)
        trained.append(module)
        return module

    monkeypatch.setattr(train_clip, "train_tiny_clip", counting_train)
    assert ensure_tiny_clip(path, config) == str(path)
    meta = read_metadata(path)
    assert meta["version"] == 1 and meta["config_hash"] == config.digest() and len(trained) == 1
    assert set(meta["zero_shot"]) >= {"colour", "shape", "count", "effect"}

    backbone = load_backbone(MICRO, pretrained=str(path))
    assert backbone.image_size == 32 and backbone.width == 32
    for name, value in trained[0].model.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[name], value), name
    random = load_backbone(MICRO, pretrained=None)
    assert not torch.equal(random.model.visual.conv1.weight, backbone.model.visual.conv1.weight)

    ensure_tiny_clip(path, config)  # same config: reused, not retrained
    assert len(trained) == 1
    ensure_tiny_clip(path, micro_config(steps=2))  # another config: retrained
    assert len(trained) == 2 and read_metadata(path)["config_hash"] == micro_config(steps=2).digest()
    metadata_path(path).unlink()  # an interrupted run: no metadata, so retrain
    ensure_tiny_clip(path, micro_config(steps=2))
    assert len(trained) == 3


def test_config_hash_covers_settings_and_model_config():
    assert micro_config().digest() == micro_config().digest()
    assert micro_config(lr=1e-3).digest() != micro_config().digest()
    assert micro_config().as_dict()["model_config"] == MICRO_CONFIG


def _facts(record: dict) -> dict:
    """Everything but the objects' shapes/colours and the derived label fields."""
    return {k: v for k, v in record.items() if k not in ("objects", "label", "classname", "caption")}


@pytest.mark.parametrize("seed", range(6))
def test_perturb_changes_exactly_one_attribute(seed):
    rng = np.random.default_rng(seed)
    base = sample_scene(rng)
    shape = perturb(base, "shape", rng)
    assert _facts(shape) == _facts(base) and len(shape["objects"]) == len(base["objects"])
    for old, new in zip(base["objects"], shape["objects"], strict=True):
        assert new["shape"] != old["shape"] and {**new, "shape": old["shape"]} == old
    # distinct shapes stay distinct, equal ones stay equal ("two red stars" -> "two red rings")
    assert [[a["shape"] == b["shape"] for b in base["objects"]] for a in base["objects"]] == \
        [[a["shape"] == b["shape"] for b in shape["objects"]] for a in shape["objects"]]
    assert shape["classname"] == f"{shape['objects'][0]['colour']} {shape['objects'][0]['shape']}"

    colour = perturb(base, "colour", rng)
    for old, new in zip(base["objects"], colour["objects"], strict=True):
        assert new["colour"] != old["colour"] and new["shape"] == old["shape"] and new["x"] == old["x"]

    count = perturb(base, "count", rng)
    assert count["count"] != base["count"] and len(count["objects"]) == count["count"]
    assert {k: v for k, v in _facts(count).items() if k != "count"} == \
        {k: v for k, v in _facts(base).items() if k != "count"}
    if count["count"] > base["count"]:  # added objects copy the main object's colour and shape
        main = (base["objects"][0]["colour"], base["objects"][0]["shape"])
        assert sum((o["colour"], o["shape"]) == main for o in count["objects"]) >= 1 + count["count"] - base["count"]

    effect = perturb(base, "effect", rng)
    assert effect["effect"] != base["effect"] and effect["objects"] == base["objects"]
    assert {k: v for k, v in _facts(effect).items() if k != "effect"} == \
        {k: v for k, v in _facts(base).items() if k != "effect"}
    assert "caption" not in shape and base == sample_scene(np.random.default_rng(seed))  # base left untouched
    with pytest.raises(ValueError, match="attribute must be one of"):
        perturb(base, "size", rng)


def test_hard_negative_groups_share_the_background_and_batch_together():
    images, records = render_hard_negative_scenes(np.random.default_rng(0), 8, 32, group_size=4)
    assert len(images) == len(records) == 8
    for g in (0, 4):
        base, shape, count, effect = records[g:g + 4]
        assert shape["background"] == count["background"] == effect["background"] == base["background"]
        assert shape["seed"] == base["seed"] and shape["objects"][0]["shape"] != base["objects"][0]["shape"]
        assert count["count"] != base["count"] and effect["effect"] != base["effect"]
        assert all(r["caption"] for r in records[g:g + 4])
        # same render seed and objects: the shape variant differs from the base only where an object is drawn
        diff = np.abs(np.asarray(images[g], dtype=int) - np.asarray(images[g + 1], dtype=int)).sum(-1) > 0
        assert 0 < diff.mean() < 0.5
    with pytest.raises(ValueError, match="multiple of group_size"):
        render_hard_negative_scenes(np.random.default_rng(0), 7, 32, group_size=4)

    sampler = GroupBatchSampler(48, group_size=4, batch_size=16, generator=torch.Generator().manual_seed(0))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3
    seen = []
    for batch in batches:
        groups = sorted({i // 4 for i in batch})
        assert len(batch) == 16 and len(groups) == 4 and sorted(batch) == [g * 4 + k for g in groups for k in range(4)]
        seen += groups
    assert sorted(seen) == list(range(12))
    with pytest.raises(ValueError, match="multiples of group_size"):
        GroupBatchSampler(48, group_size=4, batch_size=18, generator=torch.Generator())


def test_group_size_is_part_of_the_config_hash():
    assert micro_config(group_size=1).digest() != micro_config(group_size=4).digest()
    # group_size 1 adds nothing to the hash; the default config is the one whose numbers docs/format-scenes.md and
    # BENCHMARKS.md report (vision width 96, text width 64 x 2 blocks, 1000 steps): a change must update them
    assert TinyClipConfig().digest() == "1800faa32d82e131"
    assert "group_size" not in TinyClipConfig().as_dict()


def test_easy_scenes_keep_the_main_object_alone_large_and_clean():
    rng = np.random.default_rng(3)
    for _ in range(20):
        base = sample_scene(rng)
        easy = simplify(base, rng)
        main, new = base["objects"][0], easy["objects"][0]
        assert easy["count"] == 1 and len(easy["objects"]) == 1 and easy["effect"] == "none"
        assert new["size"] == "large" and 0.16 <= new["radius"] <= 0.2
        assert (new["colour"], new["shape"], new["rgb"]) == (main["colour"], main["shape"], main["rgb"])
        assert new["radius"] + 0.02 <= new["x"] <= 1 - new["radius"] - 0.02
        assert (easy["label"], easy["background"], easy["seed"]) == (base["label"], base["background"], base["seed"])
    # easy_fraction 0 draws exactly the scenes it drew before the option existed; 1 simplifies every base scene
    plain = render_hard_negative_scenes(np.random.default_rng(5), 8, 32, group_size=2)[1]
    again = render_hard_negative_scenes(np.random.default_rng(5), 8, 32, group_size=2, easy_fraction=0.0)[1]
    assert plain == again
    images, easy = render_hard_negative_scenes(np.random.default_rng(5), 8, 32, group_size=2, easy_fraction=1.0)
    assert all(r["count"] == 1 and r["objects"][0]["size"] == "large" for r in easy[::2])
    assert all(r["objects"][0]["shape"] != b["objects"][0]["shape"] for b, r in zip(easy[::2], easy[1::2]))
    assert len(images) == 8
    with pytest.raises(ValueError, match="easy_fraction"):
        render_hard_negative_scenes(np.random.default_rng(5), 8, 32, group_size=2, easy_fraction=1.5)


def test_sigmoid_loss_trains_and_needs_a_logit_bias(tmp_path):
    path = tmp_path / "sae-test-micro-sigmoid.json"
    path.write_text(json.dumps({**MICRO_CONFIG, "init_logit_bias": -10.0, "init_logit_scale": float(np.log(10))}))
    open_clip.add_model_config(path)
    with pytest.raises(ValueError, match="init_logit_bias"):
        TinyClipModule(MICRO, loss="siglip")
    with pytest.raises(ValueError, match="loss must be"):
        TinyClipModule(MICRO, loss="hinge")
    torch.manual_seed(0)
    images, records = render_scenes(np.random.default_rng(0), 32, 32)
    dataset = CaptionedScenes(images, records, open_clip.get_tokenizer(MICRO), n_captions=1, seed=0)
    module = TinyClipModule("sae-test-micro-sigmoid", lr=3e-3, warmup_steps=1, max_steps=40, loss="siglip")
    fixed = (dataset.images, dataset.tokens[:, 0])
    # open_clip's SigLipLoss: mean over images of -sum_j log sigmoid(label_ij * (scale * cos_ij + bias))
    with torch.no_grad():
        image = module.model.encode_image(
            (dataset.images.float() / 255 - torch.tensor(module.mean).view(1, 3, 1, 1))
            / torch.tensor(module.std).view(1, 3, 1, 1), normalize=True)
        text = module.model.encode_text(fixed[1], normalize=True)
        logits = 10 * image @ text.T - 10
        labels = 2 * torch.eye(32) - 1
        by_hand = float(-torch.nn.functional.logsigmoid(labels * logits).sum() / 32)
        before = float(module.clip_loss(*fixed))
    assert before == pytest.approx(by_hand, rel=1e-4)
    trainer = L.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(dataset, batch_size=32, shuffle=True))
    with torch.no_grad():
        after = float(module.clip_loss(*fixed))
    assert after < 0.5 * before, (before, after)


def test_new_settings_enter_the_hash_only_when_on():
    assert micro_config(easy_fraction=0.3).digest() != micro_config().digest()
    assert micro_config(loss="siglip").digest() != micro_config().digest()
    assert "easy_fraction" not in micro_config().as_dict() and "loss" not in micro_config().as_dict()
