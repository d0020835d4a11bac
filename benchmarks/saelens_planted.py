"""The same planted-feature run trained by SAELens (optional: needs sae-lens, which the project does not depend on).

Run it from an environment that has both sae-lens and this project (see benchmarks/saelens_check.py), e.g.
`/tmp/sl/bin/python -m benchmarks.saelens_planted outputs/benchmarks/planted/arch/wide/topk --settings tuned`.

It reads the project's planted run directory (`planted.safetensors`: the generator, the run's settings and
where the held-out data comes from), regenerates exactly the training activations that run used
(`PlantedFeatures.sample(n_train, seed + 1)`), and trains SAELens's own training SAE class for the same
architecture with SAELens's own `SAETrainer` on the same tokens at the same batch size, in a random order
drawn from the run's seed. The result is saved with SAELens's `save_inference_model` next to a copy of the
generator, and scored by the project's `score_exported`: the same function, the same held-out data, the
same loader the project's own rows use (the loader's encode is checked against SAELens's own on the
held-out data, so scoring is identical for both sides).

Settings (`--settings`):
- `default`: SAELens's defaults for synthetic data (`sae_lens.synthetic.train_toy_sae`: lr 3e-4 constant, no
  warm-up, dead window 1,000 steps, density window 2,000) and its architecture defaults (decoder init norm 0.1
  with W_enc = W_dec^T, TopK family: activations rescaled by decoder norms and AuxK coefficient 1, JumpReLU:
  bandwidth 0.05 and initial threshold 0.01, b_dec initialised to 0). The sparsity knob must be chosen for the
  data in any library: k as in the project's run; SAELens's l1/l0 coefficients are on a different loss scale
  (squared error summed over dimensions, L1 weighted by decoder norms) so they are set per architecture below.
- `tuned`: the project's lr, warm-up and dead window (lr 3e-3, 100 warm-up steps, 64 steps), b_dec
  initialised to the mean of the first 16,384 training activations.
`--set key=value` overrides one SAELens config or trainer field (e.g. `--set l1_coefficient=2`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open

from sae_lightning.planted import PLANTED_FILE, SAE_DIR, SCORES_FILE, PlantedFeatures, eval_data, score_exported
from sae_lightning.sae import SparseAutoencoder

# SAELens-scale sparsity coefficients: the project's (benchmarks/planted_recovery.py ARCH_KNOBS) converted to
# SAELens's loss, the squared error summed over d = 256 dimensions instead of averaged (and for the normalised
# mse of standard and gated, not divided by ||x||, about 1.3 on the default data and 10 on the vit data, where the
# project's l1 is 8x smaller): standard 4e-4 * 256 * 1.3 = 0.13, gated 1e-3 * 256 * 1.3 = 0.33, jumprelu
# 3e-4 * 256 = 0.077
SPARSITY = {
    "standard": {"l1_coefficient": 0.13},
    "gated": {"l1_coefficient": 0.33},
    "jumprelu": {"l0_coefficient": 0.077},
}
SETTINGS = {
    "default": {"lr": 3e-4, "lr_warm_up_steps": 0, "dead_feature_window": 1000, "feature_sampling_window": 2000,
                "b_dec_init": "zeros"},
    "tuned": {"lr": 3e-3, "lr_warm_up_steps": 100, "dead_feature_window": 64, "feature_sampling_window": 2000,
              "b_dec_init": "mean"},
}
TRAINER_FIELDS = ("lr", "lr_warm_up_steps", "lr_decay_steps", "dead_feature_window", "feature_sampling_window",
                  "b_dec_init")


def read_run(directory: Path) -> tuple[PlantedFeatures, dict, dict[str, str]]:
    """The generator, the project run's settings (PlantedRun as a dict) and the file's metadata."""
    with safe_open(str(directory / PLANTED_FILE), "pt") as handle:
        metadata = handle.metadata()
    if "run" not in metadata:
        raise ValueError(f"{directory / PLANTED_FILE} has no `run` metadata: pass a train_planted output directory")
    return PlantedFeatures.load(directory / PLANTED_FILE), json.loads(metadata["run"]), metadata


def saelens_config(arch: str, d_in: int, d_sae: int, run: dict, overrides: dict):
    """The SAELens training config for `arch` with the run's sparsity knob."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    knobs = {**(run.get("sae_kwargs") or {}), **overrides}
    common = {"d_in": d_in, "d_sae": d_sae, "device": "cpu", "dtype": "float32"}
    if arch == "standard":
        cls, fields = StandardTrainingSAEConfig, dict(SPARSITY["standard"])
    elif arch == "gated":
        cls, fields = GatedTrainingSAEConfig, dict(SPARSITY["gated"])
    elif arch == "jumprelu":
        cls, fields = JumpReLUTrainingSAEConfig, dict(SPARSITY["jumprelu"])
    elif arch == "topk":
        cls, fields = TopKTrainingSAEConfig, {"k": int(knobs["k"])}
    elif arch == "batchtopk":
        cls, fields = BatchTopKTrainingSAEConfig, {"k": float(knobs["k"])}
    elif arch == "matryoshka_batchtopk":
        from sae_lightning.sae.matryoshka import prefix_widths

        widths = prefix_widths(d_sae, list(knobs.get("prefixes", (0.0625, 0.25))))
        cls, fields = MatryoshkaBatchTopKTrainingSAEConfig, {"k": float(knobs["k"]), "matryoshka_widths": widths}
    else:
        raise ValueError(f"no SAELens counterpart for architecture {arch!r}")
    fields.update({k: v for k, v in overrides.items() if k in cls.__dataclass_fields__})
    return cls(**common, **fields)


class Batches:
    """SAELens's data provider: the run's training activations [n, d] in a seeded random order, `batch` at a time."""

    def __init__(self, x: torch.Tensor, batch: int, seed: int):
        self.x, self.batch = x, batch
        self.order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        self.position = 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.position + self.batch > len(self.order):
            self.order = self.order[torch.randperm(len(self.order))]
            self.position = 0
        rows = self.order[self.position:self.position + self.batch]
        self.position += self.batch
        return self.x[rows]


def train(run_dir: Path, out: Path, settings: str, overrides: dict, arch: str | None = None) -> dict:
    """Train SAELens's SAE on the run's data; write `out/sae`, `out/planted.safetensors`, `out/scores.json`."""
    import sae_lens
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import TrainingSAE
    from sae_lens.training.sae_trainer import SAETrainer

    start = time.perf_counter()  # the whole run, as the project's rows time it: data, training, export, scoring
    planted, run, metadata = read_run(run_dir)
    # the project run's own lr decay unless --set says otherwise: the two sides train on the same schedule
    trainer_settings = {**SETTINGS[settings], "lr_decay_steps": run.get("lr_decay_steps", 0),
                        **{k: v for k, v in overrides.items() if k in TRAINER_FIELDS}}
    torch.manual_seed(run["seed"])
    x = planted.sample(run["n_train"], torch.Generator().manual_seed(run["seed"] + 1))
    d_sae = run["expansion"] * run["d"]
    cfg = saelens_config(arch or run["sae"], run["d"], d_sae, run, overrides)
    sae = TrainingSAE.from_dict(cfg.to_dict())
    if trainer_settings["b_dec_init"] == "mean":
        with torch.no_grad():
            sae.b_dec.copy_(x[:16_384].mean(0))
    batch, steps = run["sae_batch_size"], run["steps"]
    trainer_cfg = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False, total_training_samples=steps * batch,
        device="cpu", autocast=False, lr=trainer_settings["lr"], lr_end=trainer_settings["lr"],
        lr_scheduler_name="constant", lr_warm_up_steps=trainer_settings["lr_warm_up_steps"], adam_beta1=0.9,
        adam_beta2=0.999, lr_decay_steps=trainer_settings["lr_decay_steps"], n_restart_cycles=1,
        train_batch_size_samples=batch,
        dead_feature_window=trainer_settings["dead_feature_window"],
        feature_sampling_window=trainer_settings["feature_sampling_window"],
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1), n_batches_for_norm_estimate=100)
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=Batches(x, batch, run["seed"]))
    trainer.fit()
    del x
    out.mkdir(parents=True, exist_ok=True)
    if (out / SAE_DIR).exists():
        shutil.rmtree(out / SAE_DIR)
    sae.save_inference_model(out / SAE_DIR)
    shutil.copy(run_dir / PLANTED_FILE, out / PLANTED_FILE)
    # the project's loader must encode exactly as SAELens's own inference SAE does, or the scores would differ
    held_out = eval_data(planted, metadata)
    theirs = SAE.load_from_disk(str(out / SAE_DIR), device="cpu")
    ours = SparseAutoencoder.load(out / SAE_DIR)
    with torch.no_grad():
        f_theirs, f_ours = theirs.encode(held_out), ours.encode(held_out)
        diff = float((f_theirs - f_ours).abs().max())
        diff_dec = float((theirs.decode(f_theirs) - ours.decode(f_theirs)).abs().max())
    if diff > 1e-4 or diff_dec > 1e-4:
        raise RuntimeError(f"the project's loader differs from SAELens on this export (encode {diff:.3g}, "
                           f"decode {diff_dec:.3g}): the scores would not be comparable")
    scores = score_exported(out)
    elapsed = time.perf_counter() - start
    scores |= {"seconds": elapsed, "tokens_per_s": steps * batch / elapsed, "loader_max_diff": max(diff, diff_dec)}
    (out / SCORES_FILE).write_text(json.dumps(scores, indent=2))
    (out / "saelens_settings.json").write_text(json.dumps(
        {"sae_lens": sae_lens.__version__, "settings": settings, "trainer": trainer_settings,
         "sae_config": {k: v for k, v in cfg.to_dict().items() if k != "metadata"}, "project_run": run},
        indent=2, default=str))
    return scores


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train SAELens's SAE on a project planted run's data and score it.")
    parser.add_argument("run_dir", help="a train_planted output directory (e.g. outputs/benchmarks/planted/arch/wide/"
                                        "topk)")
    parser.add_argument("--settings", choices=sorted(SETTINGS), default="default")
    parser.add_argument("--out", default=None, help="default: <run_dir>/../saelens-<arch>-<settings>[-<key>=<value>]")
    parser.add_argument("--arch", default=None, help="train this architecture on the run's data instead of the "
                                                     "run's own (its k with --set k=...)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a SAELens config field or a trainer setting (lr, lr_warm_up_steps, ...)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run_dir = Path(args.run_dir)
    overrides = dict(item.split("=", 1) for item in args.set)
    overrides = {k: parse_value(v) for k, v in overrides.items()}
    _, run, _ = read_run(run_dir)
    arch = args.arch or run["sae"]
    suffix = "".join(f"-{k}={v}" for k, v in overrides.items())  # a sweep's runs never overwrite the table's
    out = Path(args.out) if args.out else run_dir.parent / f"saelens-{arch}-{args.settings}{suffix}"
    scores = train(run_dir, out, args.settings, overrides, arch)
    mmcs_down = math.floor(scores["mmcs"] * 1e4) / 1e4
    print(" | ".join([run_dir.parent.name, f"SAELens {arch} ({args.settings})",
                      ", ".join(f"{k}={v}" for k, v in overrides.items()), f"{mmcs_down:.4f}",
                      f"{100 * scores['recovered_0.9']:.1f}%", f"{scores['l0']:.1f}",
                      f"{scores['explained_variance']:.3f}", f"{100 * scores['dead_fraction']:.1f}%",
                      f"{scores['tokens_per_s']:,.0f}", f"{scores['seconds']:.0f}"]), flush=True)


if __name__ == "__main__":
    main()
