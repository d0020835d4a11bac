"""The composed config: the defaults are the seed's run, experiments override only what they change."""

from __future__ import annotations

from omegaconf import OmegaConf

from tests.conftest import compose_config


def _plain(cfg):
    return OmegaConf.to_container(cfg, resolve=False)


def test_defaults_are_the_seed_run():
    cfg = compose_config()
    assert cfg.backbone.name == "ViT-L-14" and cfg.backbone.pretrained == "openai"
    assert (cfg.layer, cfg.tokens, cfg.expansion) == (22, "cls", 64)
    assert (cfg.l1_coefficient, cfg.lr, cfg.sae_batch_size) == (8e-5, 4e-4, 1024)
    assert cfg.training_images == 2_621_440 and cfg.training_images // cfg.sae_batch_size == 2560
    assert cfg.module.lr_warmup_steps == 500 and cfg.module.dead_feature_window == 64
    assert cfg.module.ghost_grads and cfg.module.b_dec_init == "geometric_median"
    assert cfg.data.buffer_size == 15360 and cfg.data.layer == 22


def test_fry2024_experiment_changes_nothing():
    assert _plain(compose_config()) == _plain(compose_config(["experiment=fry2024"]))


def test_one_override_changes_one_thing():
    base, changed = _plain(compose_config()), _plain(compose_config(["expansion=16"]))
    diff = {k for k in base if base[k] != changed[k]}
    assert diff == {"expansion"}


def test_demo_swaps_backbone_data_and_trainer():
    cfg = compose_config(["experiment=demo"])
    assert cfg.backbone._target_.endswith("load_tiny_backbone")
    assert cfg.trainer.accelerator == "cpu"
    assert "demo_shards" in OmegaConf.to_container(cfg.data)["train_shards"]
