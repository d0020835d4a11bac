"""Every architecture trains through the real module, shuffle buffer and Lightning Trainer (tiny sizes, CPU):
the loss goes down, the export loads back with the same encode, and `train.py experiment=planted sae=<name>`
runs end to end."""

from __future__ import annotations

import json

import pytest
import torch

from sae_lightning.planted import PlantedRun, score_exported, train_planted
from sae_lightning.sae import TRAINING_ARCHITECTURES, JumpReLUSAE, SparseAutoencoder
from tests.conftest import ROOT, compose_config

KNOBS = {
    "standard": {},
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "jumprelu": {"l0_coefficient": 1e-4, "bandwidth": 0.05, "init_threshold": 0.05},
    "gated": {},
    "matryoshka_batchtopk": {"k": 4, "prefixes": [0.125, 0.5]},
}
SAVED_AS = {"standard": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
            "gated": "gated", "matryoshka_batchtopk": "jumprelu"}


def tiny_run(name: str, **changes) -> PlantedRun:
    return PlantedRun(d=16, n_features=24, active=2.0, n_train=8192, n_eval=1024, expansion=2, steps=80,
                      sae_batch_size=64, buffer_size=512, lr_warmup_steps=10, dead_feature_window=20,
                      l1_coefficient=1e-3, sae=name, sae_kwargs=KNOBS[name], **changes)


def held_out_mse(sae: SparseAutoencoder, run: PlantedRun) -> float:
    x = run.generator().sample(2048, torch.Generator().manual_seed(123))
    with torch.no_grad():
        return float((sae(x) - x).pow(2).sum(-1).mean())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KNOBS))
def test_each_architecture_trains_and_exports_a_loadable_sae(tmp_path, name):
    assert set(KNOBS) == set(TRAINING_ARCHITECTURES)
    run = tiny_run(name)
    torch.manual_seed(run.seed)
    before = held_out_mse(run.build_sae(), run)  # the same initial SAE train_planted starts from
    sae, scores = train_planted(run, tmp_path)
    after = held_out_mse(sae, run)
    assert after < 0.5 * before, (name, before, after)
    assert scores["explained_variance"] > 0.5, scores
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == SAVED_AS[name]
    loaded = SparseAutoencoder.load(tmp_path / "sae")
    x = run.generator().sample(256, torch.Generator().manual_seed(5))
    assert torch.allclose(loaded.encode(x), sae.encode(x), atol=1e-5)
    assert score_exported(tmp_path) == scores
    if name in ("batchtopk", "matryoshka_batchtopk"):  # the inference threshold gives about k per row
        assert isinstance(loaded, JumpReLUSAE) and loaded.threshold.min() > 0
        assert 1.0 < scores["l0"] < 4 * KNOBS[name]["k"]


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [("topk", ["sae.k=5"]), ("batchtopk", ["sae.k=5"]),
                                         ("jumprelu", []), ("gated", []), ("matryoshka_batchtopk", [])])
def test_train_py_planted_experiment_with_each_architecture(tmp_path, name, extra):
    from sae_lightning.training import train

    cfg = compose_config(["experiment=planted", f"sae={name}", f"paths.root_dir={ROOT}",
                          f"paths.output_dir={tmp_path}", "max_steps=12", "data.activations.n=2048",
                          "data.buffer_size=512", "trainer.enable_progress_bar=false", *extra])
    train(cfg)
    sae = SparseAutoencoder.load(tmp_path / "sae")
    assert (sae.d_in, sae.d_sae) == (256, 1024)
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["architecture"] == SAVED_AS[name]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12


@pytest.mark.slow
def test_batchtopk_threshold_is_the_same_on_every_ddp_rank(tmp_path):
    """Two CPU processes with gloo, each on its own share of the data: the inference threshold (exported from
    rank 0) is averaged over the ranks' batch statistics, so both ranks end with the same one."""
    from tests.test_training import run_train_cli

    result = run_train_cli(["experiment=planted", "sae=batchtopk", "sae.k=5", "trainer=ddp",
                            "trainer.accelerator=cpu", "trainer.devices=2", "max_steps=12",
                            "data.activations.n=4096", "data.buffer_size=512", "trainer.enable_progress_bar=false",
                            f"hydra.run.dir={tmp_path}", "+callbacks.ranks._target_=tests.helpers.RankStateDump",
                            f"+callbacks.ranks.directory={tmp_path / 'ranks'}"],
                           env_extra={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert float(ranks[0]["topk_threshold"]) > 0
    assert torch.equal(ranks[0]["topk_threshold"], ranks[1]["topk_threshold"])
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
