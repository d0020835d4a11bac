"""Many SAEs per pass (`saes:`): every SAE sees the same batches, equals its own single run, stops alone,
resumes, exports and evaluates into its own folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sae_lightning import SparseAutoencoder
from sae_lightning.callbacks import sae_members
from sae_lightning.sae.io import read_sae_step
from tests.conftest import ROOT, compose_config

STEPS_OF_64 = ("schedule.lr_warmup=320", "schedule.dead_feature_window=256", "schedule.feature_sampling_window=640",
               "schedule.checkpoint_every=320")


class BatchChecksums(Callback):
    """Writes <path>: per SAE (single run: "single"), the sha1 of the inputs it stepped on, step by step."""

    def __init__(self, path: str):
        self.path, self.seen, self.step = Path(path), {}, -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            return  # the shuffle buffer was still filling: no step
        self.step = trainer.global_step
        for name, module, _ in sae_members(trainer, pl_module):
            x = module._last_batch
            if x is not None and (name is None or name not in getattr(pl_module, "stopped_info", {})):
                digest = hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                self.seen.setdefault(name or "single", []).append(digest)

    def on_train_end(self, trainer, pl_module):
        self.path.write_text(json.dumps(self.seen))


class NaNGradientAt(Callback):
    """Makes SAE `name`'s W_enc gradient NaN in step `step` only (a fault in one member of the run)."""

    def __init__(self, name: str, step: int):
        self.name, self.step, self.handle = name, step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.handle is None:
            param = pl_module.saes[self.name].sae.W_enc
            self.handle = param.register_hook(lambda grad: grad * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.handle is not None and trainer.global_step > self.step:
            self.handle.remove()


def planted(out: Path, *extra: str) -> list[str]:
    """Planted activations (d=32, 64 features), 64 per step, 20 steps: seconds on a CPU."""
    return ["experiment=planted", f"paths.root_dir={ROOT}", f"paths.output_dir={out}", "max_steps=20",
            "data.activations.n=4096", "data.activations.d=32", "data.activations.n_features=64", "expansion=2",
            "sae_batch_size=64", "data.buffer_size=512", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=5", *STEPS_OF_64, *extra]


TWO = "saes={a:{},b:{l1_coefficient:1.0e-3,lr:1.0e-3,expansion:3}}"
TOPK = "+saes.t.sae={_target_:sae_lightning.sae.TopKSAE,k:4,mse:plain}"
BATCHTOPK = "+sae@saes.bt.sae=batchtopk"  # composed from conf/sae/batchtopk.yaml, as an experiment file does


def train_cfg(overrides: list[str]) -> Path:
    from sae_lightning.training import train

    return train(compose_config(overrides))


def checksums(out: Path, name: str = "batches.json") -> list[str]:
    return ["+callbacks.checksums._target_=tests.test_multi_sae.BatchChecksums",
            f"+callbacks.checksums.path={out / name}"]


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multi")
    # with an architecture composed into `saes` (BATCHTOPK), entries are added one by one (Hydra's struct mode)
    # b decays its lr to 0 over the last 10 of the 20 steps (640 activations of 64)
    return train_cfg(planted(out, "+saes.a={}", "+saes.b={l1_coefficient:1.0e-3,lr:1.0e-3,expansion:3,"
                             "schedule:{lr_decay:640}}", TOPK, BATCHTOPK, *checksums(out)))


def test_variants_resolve_with_their_own_knobs_and_bad_entries_fail_before_any_work(tmp_path):
    from sae_lightning.training import sae_variants

    cfg = compose_config(["experiment=sweep_demo"])
    variants = sae_variants(cfg)
    assert list(variants) == sorted(["relu", "relu_l1_1e-2", "topk16", "batchtopk16"])
    assert variants["relu_l1_1e-2"].sae.l1_coefficient == 1e-2  # ${l1_coefficient} is the entry's own
    assert variants["relu"].sae.l1_coefficient == cfg.l1_coefficient == 3e-3
    assert variants["topk16"].sae._target_.endswith("TopKSAE") and variants["topk16"].sae.k == 16
    assert variants["topk16"].lr == 2e-3 and variants["batchtopk16"].expansion == 16
    assert sae_variants(compose_config([])) is None  # the default: one SAE, as before
    with pytest.raises(ValueError) as err:
        train_cfg(planted(tmp_path, "saes={a:{layer:3},b:{schedule:{checkpoint_every:64}},_c:{},"
                                    "d:{module:{ghost_grad:false},sae:{k:3}}}"))
    message = str(err.value)
    assert "saes.a: layer cannot differ" in message and "saes.b.schedule: checkpoint_every is run-wide" in message
    assert "saes._c: the name becomes a folder" in message
    assert "saes.d.module: ghost_grad is not a knob of the run's module" in message
    assert "saes.d.sae: k is not a knob of the run's sae (l1_coefficient, mse, decoder_norm)" in message
    with pytest.raises(ValueError, match=r"saes.a: (.|\n)*lr=-1.0: must be a finite number"):
        train_cfg(planted(tmp_path, "saes={a:{lr:-1.0}}"))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "sae").exists()


@pytest.mark.slow
def test_each_sae_exports_its_own_folder_tensorboard_run_and_config(multi_run):
    saes = {name: SparseAutoencoder.load(multi_run / "sae" / name) for name in ("a", "b", "t")}
    assert type(saes["t"]).__name__ == "TopKSAE" and saes["t"].k == 4
    assert type(saes["a"]).__name__ == type(saes["b"]).__name__ == "SparseAutoencoder"
    assert (saes["a"].d_sae, saes["b"].d_sae, saes["t"].d_sae) == (64, 96, 64)
    assert saes["a"].l1_coefficient == 4e-4 and saes["b"].l1_coefficient == 1e-3
    assert not torch.allclose(saes["a"].W_dec, saes["t"].W_dec)
    assert all(read_sae_step(multi_run / "sae" / name) == 20 for name in saes)
    from omegaconf import OmegaConf

    resolved = OmegaConf.load(multi_run / "sae" / "b" / "resolved.yaml")
    assert resolved.lr == 1e-3 and resolved.expansion == 3 and "saes" not in resolved
    ckpt = torch.load(multi_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 20  # one step per batch, not one per optimiser
    assert [float(o["state"][0]["step"]) for o in ckpt["optimizer_states"]] == [20.0] * 4
    for name, sae in saes.items():
        assert torch.equal(sae.W_enc, ckpt["state_dict"][f"saes.{name}.sae.W_enc"])
    runs = sorted(p.name for p in (multi_run / "tensorboard" / multi_run.name).iterdir())
    assert runs == ["a", "b", "bt", "t"]
    events = EventAccumulator(str(multi_run / "tensorboard" / multi_run.name / "b"))
    events.Reload()
    assert [e.step for e in events.Scalars("losses/total")] == [5, 10, 15, 20]
    # b's own lr in b's own run: 1e-3, decayed over the last 10 steps (factor (20 - step) / 10 from step 10)
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([1e-3, 1e-3, 5e-4, 0.0])


@pytest.mark.slow
def test_every_sae_sees_the_same_batches_and_equals_its_single_run(multi_run, tmp_path):
    seen = json.loads((multi_run / "batches.json").read_text())
    assert len(seen["a"]) == 20 and seen["a"] == seen["b"] == seen["t"] == seen["bt"]
    # b alone: same data, seed and knobs, no other SAE beside it
    single = train_cfg(planted(tmp_path, "l1_coefficient=1.0e-3", "lr=1.0e-3", "expansion=3", "schedule.lr_decay=640",
                               *checksums(tmp_path)))
    assert json.loads((tmp_path / "batches.json").read_text())["single"] == seen["b"]
    alone, together = SparseAutoencoder.load(single / "sae"), SparseAutoencoder.load(multi_run / "sae" / "b")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(together, name), getattr(alone, name), rtol=0, atol=1e-5)
    a_state = torch.load(multi_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b_state = torch.load(single / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(a_state["saes.b.steps_since_fired"], b_state["steps_since_fired"])
    lrs = [o["param_groups"][0]["lr"] for o in torch.load(multi_run / "checkpoints" / "last.ckpt",
                                                           weights_only=True)["optimizer_states"]]
    assert lrs[0] == pytest.approx(3e-3) and lrs[1] == 0.0  # a: the planted experiment's constant lr; b: decayed
    # BatchTopK too (AuxK, its threshold's moving average): the same as `sae=batchtopk` alone
    single = train_cfg(planted(tmp_path / "bt", "sae=batchtopk"))
    alone, together = SparseAutoencoder.load(single / "sae"), SparseAutoencoder.load(multi_run / "sae" / "bt")
    assert type(together).__name__ == type(alone).__name__ and together.threshold.abs().sum() > 0
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        torch.testing.assert_close(getattr(together, name), getattr(alone, name), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_non_finite_step_stops_that_sae_only_and_resume_keeps_it_stopped(multi_run, tmp_path):
    inject = ["+callbacks.nan._target_=tests.test_multi_sae.NaNGradientAt", "+callbacks.nan.name=b",
              "+callbacks.nan.step=7"]
    run = train_cfg(planted(tmp_path, TWO, TOPK, *inject))
    record = json.loads((run / "sae" / "b" / "training_stopped.json").read_text())
    assert record["step"] == 10 and record["exported_step"] == 5  # found at the next health check (every 5)
    assert "non-finite at step 7 with finite inputs" in record["reason"]
    assert read_sae_step(run / "sae" / "b") == 5  # nothing after the fault was exported
    # the others are exactly what they are without the fault
    for name in ("a", "t"):
        clean, faulty = (SparseAutoencoder.load(r / "sae" / name) for r in (multi_run, run))
        assert torch.equal(clean.W_enc, faulty.W_enc) and torch.equal(clean.b_dec, faulty.b_dec), name
        assert read_sae_step(run / "sae" / name) == 20
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"]["stopped"].tolist() == [False, True, False]
    assert torch.isfinite(ckpt["state_dict"]["saes.b.sae.W_enc"]).all()  # the NaN step changed nothing

    # resume to 30 steps: a and t continue, b stays stopped with its record
    train_cfg(planted(tmp_path, TWO, TOPK, "max_steps=30", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    after = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == 30
    # b's Adam took steps 0-9 but the skipped step 7: 9 updates, then none after it stopped
    assert [float(o["state"][0]["step"]) for o in after["optimizer_states"]] == [30.0, 9.0, 30.0]
    assert read_sae_step(run / "sae" / "a") == read_sae_step(run / "sae" / "t") == 30
    assert read_sae_step(run / "sae" / "b") == 5 and after["sae_lightning_stopped"]["b"]["step"] == 10
    assert torch.equal(after["state_dict"]["saes.b.sae.W_enc"], ckpt["state_dict"]["saes.b.sae.W_enc"])


@pytest.mark.slow
def test_resume_refuses_other_saes(multi_run, tmp_path):
    last = multi_run / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="saes.t: sae._target_"):
        train_cfg(planted(tmp_path, "+saes.a={}", "+saes.b={l1_coefficient:1.0e-3,lr:1.0e-3,expansion:3}",
                          "+saes.t.sae={_target_:sae_lightning.sae.BatchTopKSAE,k:4}", BATCHTOPK,
                          f"ckpt_path={last}"))
    with pytest.raises(ValueError, match="the SAEs' names"):
        train_cfg(planted(tmp_path, TWO, f"ckpt_path={last}"))


def test_an_entry_with_its_own_schedule_resumes(tmp_path):
    """The stored config keeps only the windows an entry set (it used to store the whole resolved schedule,
    whose run-wide checkpoint interval made every resume of such a run fail its own validation); each member
    follows its new lr after the resume."""
    entries = ("+saes.a={}", "+saes.b={schedule:{lr_warmup:0,lr_decay:320}}")
    train_cfg(planted(tmp_path, *entries, "max_steps=10"))
    resolved = OmegaConf.load(tmp_path / ".hydra" / "resolved.yaml")
    assert OmegaConf.to_container(resolved.saes.b.schedule) == {"lr_warmup": 0, "lr_decay": 320}
    # resumed with a's lr changed: a follows it (not the checkpoint's 3e-3), b still decays to 0
    train_cfg(planted(tmp_path, "+saes.a={lr:1.0e-3}", entries[1], "max_steps=20", "ckpt_path=last"))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 20
    assert [o["param_groups"][0]["lr"] for o in ckpt["optimizer_states"]] == [pytest.approx(1e-3), 0.0]


@pytest.mark.slow
def test_sigterm_saves_every_sae_and_the_resume_finishes_them(tmp_path):
    with pytest.raises(SystemExit) as stop:
        train_cfg(planted(tmp_path, TWO, "+callbacks.stop._target_=tests.helpers.SignalAtStep",
                          "+callbacks.stop.step=12"))
    assert stop.value.code == 143
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    step = ckpt["global_step"]
    assert 12 <= step < 20 and step % 5  # saved at the signal, not at a scheduled checkpoint
    assert read_sae_step(tmp_path / "sae" / "a") == read_sae_step(tmp_path / "sae" / "b") == step
    assert [float(o["state"][0]["step"]) for o in ckpt["optimizer_states"]] == [float(step)] * 2
    train_cfg(planted(tmp_path, TWO, f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"))
    assert read_sae_step(tmp_path / "sae" / "a") == read_sae_step(tmp_path / "sae" / "b") == 20


@pytest.fixture(scope="module")
def image_multi_run(tmp_path_factory, data_dir, tiny_shards) -> Path:
    """Two SAEs (standard, TopK k=4) on the tiny ViT's class tokens: 30 steps of the shrunk demo."""
    from tests.conftest import demo_overrides

    out = tmp_path_factory.mktemp("image_multi")
    return train_cfg(demo_overrides(out, data_dir, tiny_shards, [
        "saes={relu:{}}", "+saes.topk.sae={_target_:sae_lightning.sae.TopKSAE,k:4,mse:plain}"]))


@pytest.mark.slow
def test_image_run_logs_each_sae_to_its_own_tensorboard_run(image_multi_run):
    for name in ("relu", "topk"):
        events = EventAccumulator(str(image_multi_run / "tensorboard" / image_multi_run.name / name),
                                  size_guidance={"scalars": 0, "histograms": 0})
        events.Reload()
        tags = events.Tags()
        assert {"losses/total", "metrics/l0", "contrastive/loss_sae", "contrastive/loss_original",
                "features/dead_features", "final/step"} <= set(tags["scalars"]), name
        assert "features/log10_density" in tags["histograms"]
        assert len(events.Scalars("contrastive/loss_original")) == 1
    topk_l0 = EventAccumulator(str(image_multi_run / "tensorboard" / image_multi_run.name / "topk"))
    topk_l0.Reload()
    assert all(e.value <= 4 for e in topk_l0.Scalars("metrics/l0"))


@pytest.mark.slow
def test_evaluate_writes_each_sae_into_its_own_folder(image_multi_run):
    from hydra import compose, initialize_config_dir

    from sae_lightning.evaluation.run import evaluate_run

    def eval_cfg(*extra):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose(config_name="evaluate", overrides=[
                f"run={image_multi_run}", "n_images=48", "top_k=5", "batch_size=16", "contrastive_batch_size=16",
                "num_workers=0", "device=cpu", "n_grid_features=1", "n_game=8", "explorer=false", *extra])

    results = evaluate_run(eval_cfg())
    assert set(results) == {"relu", "topk"}
    for name in ("relu", "topk"):
        metrics = json.loads((image_multi_run / "eval" / name / "metrics.json").read_text())
        assert metrics["sae_path"] == str(image_multi_run / "sae" / name) and metrics["n_images"] == 48
        assert metrics["l0"] == pytest.approx(results[name]["l0"])
        assert (image_multi_run / "eval" / name / "features.safetensors").is_file()
    assert results["topk"]["l0"] <= 4 and results["relu"]["l0"] != results["topk"]["l0"]
    comparison = json.loads((image_multi_run / "eval" / "comparison.json").read_text())["saes"]
    assert {name: row["l0"] for name, row in comparison.items()} == {n: results[n]["l0"] for n in results}
    assert "| topk | 48 |" in (image_multi_run / "eval" / "comparison.md").read_text()
    # one SAE: only its folder is rewritten, with the same numbers as beside the other
    before = (image_multi_run / "eval" / "relu" / "metrics.json").stat().st_mtime_ns
    alone = evaluate_run(eval_cfg("sae_name=topk"))
    assert set(alone) == {"topk"}
    assert (image_multi_run / "eval" / "relu" / "metrics.json").stat().st_mtime_ns == before
    differ = [k for k, v in alone["topk"].items() if k != "date" and v != results["topk"][k]
              and not (isinstance(v, float) and v != v)]
    assert not differ
    with pytest.raises(ValueError, match="holds the SAEs relu, topk"):
        evaluate_run(eval_cfg("sae_name=nope"))


@pytest.mark.slow
def test_one_pass_for_many_saes_equals_one_pass_each(image_multi_run, tiny_shards):
    """stream_pass_many shares the backbone's work between SAEs; every number equals stream_pass alone."""
    from dataclasses import fields

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sae_lightning.data.shards import expand_shards, image_loader, load_classnames
    from sae_lightning.evaluation.stream import stream_pass, stream_pass_many

    backbone = instantiate(OmegaConf.load(image_multi_run / ".hydra" / "resolved.yaml").backbone, device="cpu")
    saes = {name: SparseAutoencoder.load(image_multi_run / "sae" / name).eval() for name in ("relu", "topk")}
    urls = expand_shards(tiny_shards[1])
    classnames = load_classnames(None, urls)
    args = dict(layer=2, tokens="cls", n_images=40, k=4, classnames=classnames, contrastive_batch_size=8,
                max_tokens=16, device=torch.device("cpu"))

    def loader():
        return image_loader(urls, backbone.pixel_transform, 16, num_workers=0, shuffle=0, shardshuffle=False,
                            seed=0, partial=True)

    together = stream_pass_many(backbone, saes, loader(), **args)
    for name, sae in saes.items():
        alone = stream_pass(backbone, sae, loader(), **args)
        for field in fields(alone):
            a, b = getattr(alone, field.name), getattr(together[name], field.name)
            if field.name == "stats":
                for f in fields(a):
                    x, y = getattr(a, f.name), getattr(b, f.name)
                    if isinstance(x, torch.Tensor):  # NaN where undefined (a feature that never fired)
                        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=f"{name} {f.name}")
                    else:
                        assert x == y, (name, f.name)
            else:
                assert a == b or (isinstance(a, dict) and all(
                    a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)), (name, field.name)


class MultiRankStateDump(Callback):
    """At the end of training every rank writes every SAE's parameters, counters and stop flags to <dir>/rank<r>.pt."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_end(self, trainer, pl_module):
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {f"{name}.{k}": v.detach().cpu().clone() for name, m in pl_module.members()
                 for k, v in m.state_dict().items()}
        state["stopped"] = pl_module.stopped.cpu().clone()
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_on_cpu_keeps_every_sae_identical_across_ranks_and_stops_one_everywhere(tmp_path, data_dir, tiny_shards):
    from tests.conftest import demo_overrides
    from tests.test_training import run_train_cli

    overrides = [o for o in demo_overrides(tmp_path, data_dir, tiny_shards)
                 if not o.startswith(("paths.output_dir", "training_images", "trainer.log_every_n_steps"))]
    result = run_train_cli([*overrides, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                            "data.resampled=true", "training_images=1280", "trainer.log_every_n_steps=5",
                            f"hydra.run.dir={tmp_path}", "saes={a:{},b:{lr:2.0e-3}}",
                            "+callbacks.nan._target_=tests.test_multi_sae.NaNGradientAt", "+callbacks.nan.name=b",
                            "+callbacks.nan.step=2",
                            "+callbacks.ranks._target_=tests.test_multi_sae.MultiRankStateDump",
                            f"+callbacks.ranks.directory={tmp_path / 'ranks'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 10  # 1,280 images at 64 per rank and step, 2 ranks
    assert ckpt["state_dict"]["stopped"].tolist() == [False, True]
    assert json.loads((tmp_path / "sae" / "b" / "training_stopped.json").read_text())["step"] == 5
    assert read_sae_step(tmp_path / "sae" / "a") == 10
    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert {"a.sae.W_enc", "b.sae.W_enc", "a.steps_since_fired", "stopped"} <= set(ranks[0])
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key


class DivergeOnRank(Callback):
    """From step `step` on, SAE `name`'s explained-variance health check fails on rank `rank` only (a check on
    that rank's own batch, as a real divergence seen in one rank's data would)."""

    def __init__(self, name: str, step: int, rank: int):
        self.name, self.step, self.rank = name, step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            pl_module.saes[self.name].hparams.divergence_explained_variance = 2.0  # EV is never above 1


@pytest.mark.slow
def test_ddp_a_health_check_failing_on_one_rank_stops_that_sae_on_every_rank(tmp_path, data_dir, tiny_shards):
    """The explained variance is checked on each rank's own batch: when it fails on rank 1 only, both ranks
    stop that SAE at the same step (before the fix, rank 0 trained it on and the ranks' copies drifted)."""
    from tests.conftest import demo_overrides
    from tests.test_training import run_train_cli

    overrides = [o for o in demo_overrides(tmp_path, data_dir, tiny_shards)
                 if not o.startswith(("paths.output_dir", "training_images", "trainer.log_every_n_steps"))]
    result = run_train_cli([*overrides, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                            "data.resampled=true", "training_images=1280", "trainer.log_every_n_steps=5",
                            f"hydra.run.dir={tmp_path}", "saes={a:{},b:{lr:2.0e-3}}",
                            "+callbacks.diverge._target_=tests.test_multi_sae.DivergeOnRank",
                            "+callbacks.diverge.name=b", "+callbacks.diverge.step=2", "+callbacks.diverge.rank=1",
                            "+callbacks.ranks._target_=tests.test_multi_sae.MultiRankStateDump",
                            f"+callbacks.ranks.directory={tmp_path / 'ranks'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    stopped = json.loads((tmp_path / "sae" / "b" / "training_stopped.json").read_text())
    assert stopped["step"] == 5 and stopped["exported_step"] is None
    assert read_sae_step(tmp_path / "sae" / "a") == 10
    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["stopped"].tolist() == ranks[1]["stopped"].tolist() == [False, True]
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key


@pytest.fixture(scope="module")
def written_cache(tmp_path_factory, data_dir, tiny_shards) -> Path:
    """The tiny shards' class tokens through `cache.py`'s writer (tests/test_cache.py's cache)."""
    from sae_lightning.data.cache_write import CacheWriter
    from tests.test_cache import cache_config

    directory = tmp_path_factory.mktemp("cache") / "cls"
    assert CacheWriter(cache_config(directory, data_dir, tiny_shards)).run() == 0
    return directory


@pytest.mark.slow
def test_from_the_cache_an_interrupted_multi_run_resumes_to_the_same_saes(tmp_path, written_cache):
    """data=cache (exact resume position): 3 SAEs for 24 steps straight vs stopped by SIGTERM at step 9 and
    resumed: every SAE, its counters and its Adam state to 1e-5; and each equals its own single cache run."""
    from tests.test_cache import final_state, train_config

    saes = ["+saes.relu={}", "+saes.l1={l1_coefficient:1.0e-2,lr:2.0e-3}", "+sae@saes.topk.sae=topk",
            "saes.topk.sae.k=8"]
    from sae_lightning.training import train

    train(train_config(tmp_path / "straight", written_cache, saes))
    reference = final_state(tmp_path / "straight")
    stopped = tmp_path / "stopped"
    with pytest.raises(SystemExit) as exit_info:
        train(train_config(stopped, written_cache, [*saes, "+callbacks.stop._target_=tests.helpers.SignalAtStep",
                                                    "+callbacks.stop.step=9"]))
    assert exit_info.value.code == 143
    train(train_config(stopped, written_cache, [*saes, "ckpt_path=last"]))
    state = final_state(stopped)
    assert state.keys() == reference.keys() and "saes.topk.sae.W_enc" in state and "adam2.0.exp_avg" in state
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, atol=1e-5, rtol=0, msg=key)
    # the l1 SAE alone on the same cache
    train(train_config(tmp_path / "alone", written_cache, ["l1_coefficient=1.0e-2", "lr=2.0e-3"]))
    alone = final_state(tmp_path / "alone")
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(reference[f"saes.l1.sae.{name}"], alone[f"sae.{name}"], atol=1e-5, rtol=0)


def dead_at_windows(run: Path, name: str | None) -> list[float]:
    """The SAE's dead-feature counts at each closed density window, from its TensorBoard run."""
    folder = run / "tensorboard" / run.name / (name or "")
    events = EventAccumulator(str(folder))
    events.Reload()
    return [e.value for e in events.Scalars("features/dead_features")]


class DeadFromStart(Callback):
    """Features 0..n-1 of SAE `name` (None: the run's one SAE) can never fire from each step in `steps` on (zero
    encoder columns, encoder bias -100), so the next density window closes with them dead and resamples them."""

    def __init__(self, n: int, name: str | None = None, steps: tuple[int, ...] = (0,)):
        self.n, self.name, self.steps = n, name, tuple(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            sae = (pl_module.saes[self.name] if self.name else pl_module).sae
            with torch.no_grad():
                sae.W_enc[:, :self.n] = 0.0
                sae.b_enc[:self.n] = -100.0


RESAMPLE = ("module.resample_dead=true", "module.ghost_grads=false", "schedule.feature_sampling_window=320")


@pytest.mark.slow
def test_with_resampling_each_sae_still_equals_its_single_run(tmp_path):
    """Resampling draws from each SAE's own generator (seeded from the run seed), not from one stream shared by
    the run's SAEs: b beside a resamples exactly as b alone (before the fix, a's draws came first and changed b's)."""
    kill = ("+callbacks.kill._target_=tests.test_multi_sae.DeadFromStart", "+callbacks.kill.n=12")
    together = train_cfg(planted(tmp_path / "multi", TWO, *RESAMPLE, *kill, "+callbacks.kill.name=b"))
    alone = train_cfg(planted(tmp_path / "single", "l1_coefficient=1.0e-3", "lr=1.0e-3", "expansion=3", *RESAMPLE,
                              *kill))
    dead = dead_at_windows(together, "b")
    assert dead[0] == 12 and dead == dead_at_windows(alone, None)  # the first window resampled 12 features
    b, single = SparseAutoencoder.load(together / "sae" / "b"), SparseAutoencoder.load(alone / "sae")
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(b, key), getattr(single, key), rtol=0, atol=1e-5, msg=key)
    ckpt = torch.load(together / "checkpoints" / "last.ckpt", weights_only=True)
    generators = ckpt["sae_lightning_resample_rng"]
    assert set(generators) == {"a", "b"} and generators["b"]["version"] == 1
    assert torch.equal(generators["b"]["state"],
                       torch.load(alone / "checkpoints" / "last.ckpt", weights_only=True)[
                           "sae_lightning_resample_rng"]["state"])


@pytest.mark.slow
@pytest.mark.parametrize("multi", [False, True])
def test_with_resampling_an_interrupted_run_resumes_to_the_same_saes(tmp_path, written_cache, multi):
    """data=cache (exact resume position), resampling every 5 steps with features killed at steps 0 and 10:
    24 steps straight vs stopped by SIGTERM at step 9 and resumed give the same SAEs to 1e-5 (before the fix,
    the resumed run's resampling drew from a reseeded global stream: the window at step 15 differed)."""
    from sae_lightning.training import train
    from tests.test_cache import final_state, train_config

    extra = ["module.resample_dead=true", "module.ghost_grads=false", "schedule.feature_sampling_window=240",
             "+callbacks.kill._target_=tests.test_multi_sae.DeadFromStart", "+callbacks.kill.n=12",
             "+callbacks.kill.steps=[0,10]"]
    if multi:
        extra += ["+saes.relu={}", "+saes.l1={l1_coefficient:1.0e-2,lr:2.0e-3}", "+callbacks.kill.name=l1"]
    train(train_config(tmp_path / "straight", written_cache, extra))
    reference = final_state(tmp_path / "straight")
    name = "l1" if multi else None
    assert dead_at_windows(tmp_path / "straight", name)[:3:2] == [12.0, 12.0]  # resampled at steps 5 and 15
    stopped = tmp_path / "stopped"
    with pytest.raises(SystemExit):
        train(train_config(stopped, written_cache, [*extra, "+callbacks.stop._target_=tests.helpers.SignalAtStep",
                                                    "+callbacks.stop.step=9"]))
    assert torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    train(train_config(stopped, written_cache, [*extra, "ckpt_path=last"]))
    state = final_state(stopped)
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, atol=1e-5, rtol=0, msg=key)
    generators = [torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["sae_lightning_resample_rng"]
                  for run in (tmp_path / "straight", stopped)]
    if multi:
        assert set(generators[0]) == {"relu", "l1"}
        generators = [g["l1"] for g in generators]
    assert torch.equal(generators[0]["state"], generators[1]["state"])
