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
    # schedules in activations: the seed's 500 / 64 / 500 / 500 / 200 steps of 1,024
    assert dict(cfg.schedule) == {"lr_warmup": 512000, "lr_decay": 0, "dead_feature_window": 65536,
                                  "feature_sampling_window": 512000, "checkpoint_every": 512000,
                                  "contrastive_every": 204800}
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
    assert cfg.backbone.name == "sae-tiny-clip"  # the tiny CLIP trained on the scenes (sae_lightning/world)
    assert cfg.trainer.accelerator == "cpu"
    assert "demo_shards" in OmegaConf.to_container(cfg.data)["train_shards"]


def test_schedule_in_activations_follows_the_seed_per_activation_on_any_number_of_devices():
    """8 GPUs x 1,024 per step: the seed's warm-up of 512k activations is 62.5 -> 62 steps, not 500."""
    from sae_lightning.training import schedule_steps

    seed = compose_config().schedule
    assert schedule_steps(seed, 1024) == {"lr_warmup": 500, "lr_decay": 0, "dead_feature_window": 64,
                                          "feature_sampling_window": 500, "checkpoint_every": 500,
                                          "contrastive_every": 200}
    eight = schedule_steps(seed, 8 * 1024)
    assert eight == {"lr_warmup": 62, "lr_decay": 0, "dead_feature_window": 8, "feature_sampling_window": 62,
                     "checkpoint_every": 62, "contrastive_every": 25}
    # the seed's run on 8 GPUs is 320 steps: it now leaves warm-up after 62 of them
    assert 2_621_440 // (8 * 1024) == 320 > eight["lr_warmup"]
    assert schedule_steps({"lr_warmup": 0, "checkpoint_every": 10}, 1024) == {"lr_warmup": 0, "checkpoint_every": 1}
    assert schedule_steps({"lr_decay": 0, "lr_warmup": 10}, 1024) == {"lr_decay": 0, "lr_warmup": 0}
    demo = compose_config(["experiment=demo"])
    assert schedule_steps(demo.schedule, demo.sae_batch_size) == {
        "lr_warmup": 30, "lr_decay": 0, "dead_feature_window": 32, "feature_sampling_window": 50,
        "checkpoint_every": 100, "contrastive_every": 50}
