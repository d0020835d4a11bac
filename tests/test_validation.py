"""Config validation up front: every bad value of the real composed config is named with what is allowed."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sae_lightning.validation import is_multi_process, validate_eval_config, validate_train_config
from tests.conftest import CONF, compose_config


def problems(overrides: list[str]) -> str:
    with pytest.raises(ValueError) as info:
        validate_train_config(compose_config(overrides))
    return str(info.value)


@pytest.mark.parametrize("overrides", [
    [], ["experiment=fry2024"], ["experiment=demo"], ["experiment=planted"],
    ["experiment=demo", "tokens=all", "layer=0", "expansion=1", "l1_coefficient=0", "schedule.lr_warmup=0"],
    ["trainer=ddp", "data.resampled=true"],
    ["experiment=planted", "trainer=ddp"],  # stored activations: no shards to run out of
    ["max_steps=10", "training_images=null"],
])
def test_valid_configs_pass(overrides):
    validate_train_config(compose_config(overrides))


@pytest.mark.parametrize(("overrides", "expected"), [
    (["tokens=patch"], "tokens='patch' (a str): must be one of cls (the class token), patches"),
    (["expansion=0"], "expansion=0: must be a positive integer (d_sae = expansion x d_model"),
    (["expansion=-4"], "expansion=-4: must be a positive integer"),
    (["expansion=2.5"], "expansion=2.5: must be a positive integer"),
    (["l1_coefficient=-1e-4"], "l1_coefficient=-0.0001: must be a finite number >= 0"),
    (["l1_coefficient=inf"], "l1_coefficient=inf: must be a finite number >= 0"),
    (["l1_coefficient=nan"], "l1_coefficient=nan: must be a finite number >= 0"),
    (["lr=0"], "lr=0: must be a finite number > 0"),
    (["lr=-0.001"], "lr=-0.001: must be a finite number > 0"),
    (["lr=inf"], "lr=inf: must be a finite number > 0"),
    (["lr=fast"], "lr='fast' (a str): must be a finite number > 0"),
    (["sae_batch_size=0"], "sae_batch_size=0: must be a positive integer (activations per SAE step)"),
    (["sae_batch_size=-1"], "sae_batch_size=-1: must be a positive integer"),
    (["training_images=0"], "training_images=0: must be a positive integer"),
    (["max_steps=0"], "max_steps=0: must be a positive integer (or null"),
    (["max_steps=-5"], "max_steps=-5: must be a positive integer"),
    (["training_images=null"], "set training_images (images to train on) or max_steps"),
    (["data.buffer_size=512"], "data.buffer_size=512: must be at least sae_batch_size=1024"),
    (["experiment=planted", "data.buffer_size=64"], "data.buffer_size=64: must be at least sae_batch_size=128"),
    (["layer=24"], "layer=24 is outside 'ViT-L-14', which has 24 residual blocks: use 0..23"),
    (["layer=1.5"], "layer=1.5: must be an integer block index"),
    (["schedule.lr_warmup=-1"], "schedule.lr_warmup=-1: must be an integer >= 0 (counted in activations seen)"),
    (["schedule.dead_feature_window=0"], "schedule.dead_feature_window=0: must be a positive integer"),
    (["schedule.feature_sampling_window=0"], "schedule.feature_sampling_window=0: must be a positive integer"),
    (["schedule.checkpoint_every=0"], "schedule.checkpoint_every=0: must be a positive integer"),
    (["schedule.contrastive_every=-10"], "schedule.contrastive_every=-10: must be a positive integer"),
    (["schedule.checkpoint_every=1.5"], "schedule.checkpoint_every=1.5: must be a positive integer"),
    (["module.b_dec_init=median"], "module.b_dec_init='median' (a str): must be one of geometric_median, mean"),
    (["sae.mse=l2"], "sae.mse='l2' (a str): must be one of normalised, plain"),
    (["trainer=ddp"], "data.resampled=False: must be true with several processes"),
    (["trainer.devices=2"], "Add data.resampled=true"),
    (["trainer.num_nodes=2"], "Add data.resampled=true"),
    (["experiment=demo", "trainer.devices=2"], "Add data.resampled=true"),  # DDP on CPU processes too
])
def test_each_rule_names_the_value_and_what_is_allowed(overrides, expected):
    message = problems(overrides)
    assert expected in message, message
    assert message.startswith("Invalid training config (1 problem)"), message


def test_every_problem_is_listed_at_once():
    message = problems(["tokens=foo", "expansion=0", "lr=-1", "sae_batch_size=0", "trainer=ddp"])
    assert message.startswith("Invalid training config (5 problems), nothing was run:"), message
    for key in ("tokens=", "expansion=", "lr=", "sae_batch_size=", "data.resampled="):
        assert f"\n  - {key}" in message, key


def test_stored_activations_skip_the_backbone_rules():
    """`backbone: null`: tokens, layer and data.resampled mean nothing there, the rest still applies."""
    cfg = compose_config(["experiment=planted", "tokens=nonsense", "layer=99", "trainer=ddp"])
    validate_train_config(cfg)
    cfg = compose_config(["experiment=planted", "expansion=0"])
    with pytest.raises(ValueError, match="expansion=0"):
        validate_train_config(cfg)


def test_the_demo_shards_are_not_generated_by_validation(tmp_path):
    cfg = compose_config(["experiment=demo", f"paths.data_dir={tmp_path}"])
    validate_train_config(cfg)
    assert list(tmp_path.iterdir()) == []


def test_multi_process_detection():
    def trainer(**kw):
        return OmegaConf.create({"accelerator": "gpu", "devices": 1, "num_nodes": 1, "strategy": "auto", **kw})

    assert not is_multi_process(trainer())
    assert is_multi_process(trainer(strategy="ddp_find_unused_parameters_true"))
    assert is_multi_process(trainer(devices=[0, 1])) and is_multi_process(trainer(devices="0,1"))
    assert is_multi_process(trainer(devices="4")) and not is_multi_process(trainer(devices=[1]))
    assert not is_multi_process(trainer(accelerator="cpu", devices=-1))
    assert not is_multi_process(None)


def compose_eval(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="evaluate", overrides=overrides)


def test_eval_defaults_pass():
    validate_eval_config(compose_eval(["run=/some/run"]))
    validate_eval_config(compose_eval(["run=/some/run", "features=[1,2]", "n_images=1", "n_grid_features=0"]))


@pytest.mark.parametrize(("override", "expected"), [
    ("n_images=0", "n_images=0: must be a positive integer (held-out images to stream)"),
    ("n_images=-3", "n_images=-3: must be a positive integer"),
    ("batch_size=0", "batch_size=0: must be a positive integer (images per batch)"),
    ("top_k=0", "top_k=0: must be a positive integer (top images kept per feature)"),
    ("max_tokens=0", "max_tokens=0: must be a positive integer"),
    ("n_grid_features=-1", "n_grid_features=-1: must be an integer >= 0"),
    ("features=[1,-2]", "features=[1, -2]: must be a list of feature ids"),
])
def test_eval_rules(override, expected):
    with pytest.raises(ValueError) as info:
        validate_eval_config(compose_eval(["run=/some/run", override]))
    assert expected in str(info.value) and str(info.value).startswith("Invalid evaluation config (1 problem)")


def test_eval_problems_are_listed_together():
    with pytest.raises(ValueError, match=r"\(3 problems\)"):
        validate_eval_config(compose_eval(["run=/r", "n_images=0", "batch_size=0", "top_k=0"]))


def test_stored_activations_with_large_chunks_under_ddp_are_refused():
    cfg = compose_config(["experiment=planted", "trainer.devices=2", "data.chunk_size=512"])
    with pytest.raises(ValueError, match="data.chunk_size"):
        validate_train_config(cfg)
    validate_train_config(compose_config(["experiment=planted", "trainer.devices=2"]))
