"""The lr schedule end to end on planted activations (seconds): decay refusals before any work, and a resume
that follows the new run's lr, betas and schedule rather than the checkpoint's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae_lightning.module import lr_schedule
from tests.conftest import ROOT, compose_config


def planted(out: Path, *extra: str) -> list[str]:
    """Planted activations (d=32, 64 features), 64 per step, warm-up 2 steps."""
    return ["experiment=planted", f"paths.root_dir={ROOT}", f"paths.output_dir={out}", "max_steps=10",
            "data.activations.n=2048", "data.activations.d=32", "data.activations.n_features=64", "expansion=2",
            "sae_batch_size=64", "data.buffer_size=512", "trainer.enable_progress_bar=false",
            "schedule.lr_warmup=128", "schedule.checkpoint_every=320", *extra]


def train(overrides: list[str]) -> Path:
    from sae_lightning.training import train as train_run

    return train_run(compose_config(overrides))


def last_lr_and_betas(run: Path) -> tuple[float, tuple]:
    group = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]["param_groups"][0]
    return group["lr"], tuple(group["betas"])


def test_the_factors_equal_torchs_warmup_constant_and_linear_decay_as_saelens_chains_them():
    warmup, decay, total = 3, 5, 17
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    chained = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1),
        torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0),
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=decay)],
        milestones=[warmup, total - decay])
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        chained.step()
    f = lr_schedule(warmup, decay, total)
    assert [f(s) for s in range(total)] == pytest.approx(theirs)


def test_a_decay_that_does_not_fit_is_refused_before_an_overwrite_deletes_the_old_run(tmp_path):
    run = train(planted(tmp_path))
    before = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file())
    with pytest.raises(ValueError, match=r"must fit in the run's 10 steps.*schedule.lr_decay at most 512"):
        train(planted(tmp_path, "overwrite=true", "schedule.lr_decay=640"))  # 2 + 10 steps > 10
    assert sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file()) == before


def test_a_decay_shorter_than_two_steps_is_refused_not_ignored(tmp_path):
    with pytest.raises(ValueError, match=r"schedule.lr_decay=64 is 1 step\(s\) of 64 activations: a decay needs "
                                         r"at least 2 steps \(schedule.lr_decay >= 128"):
        train(planted(tmp_path, "schedule.lr_decay=64"))
    assert not (tmp_path / "checkpoints").exists()


def test_a_resume_follows_the_new_lr_betas_and_schedule(tmp_path):
    train(planted(tmp_path))
    assert last_lr_and_betas(tmp_path) == (pytest.approx(3e-3), (0.9, 0.999))
    # continue to step 20 with another lr, betas and a decay over the last 5 steps: the checkpoint's optimiser
    # held lr 3e-3 and betas (0.9, 0.999); the run ends at 1e-3 x 0 with this run's betas
    train(planted(tmp_path, "max_steps=20", "ckpt_path=last", "lr=1.0e-3", "module.adam_betas=[0.8,0.99]",
                  "schedule.lr_decay=320"))
    lr, betas = last_lr_and_betas(tmp_path)
    assert lr == 0.0 and betas == (0.8, 0.99)
    train(planted(tmp_path, "max_steps=22", "ckpt_path=last", "lr=1.0e-3", "module.adam_betas=[0.8,0.99]"))
    assert last_lr_and_betas(tmp_path) == (pytest.approx(1e-3), (0.8, 0.99))  # no decay: the full new lr again


@pytest.mark.parametrize("tokens", ["cls", "patches", "all"])
def test_the_configs_token_count_is_the_built_backbones(tokens):
    """What the early decay check counts per image, from the model config alone, equals the built model's count."""
    from sae_lightning.backbone import TINY_MODEL_NAME, config_tokens_per_image, load_backbone

    built = load_backbone(TINY_MODEL_NAME, pretrained=None)
    assert config_tokens_per_image(TINY_MODEL_NAME, tokens) == built.n_tokens_for(tokens)
    assert config_tokens_per_image("hf-hub:someone/model", tokens) == (1 if tokens == "cls" else None)
    assert config_tokens_per_image("ViT-L-14", tokens) == {"cls": 1, "patches": 256, "all": 257}[tokens]
