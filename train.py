"""Train a sparse autoencoder on a frozen CLIP ViT's residual stream.

    python train.py                          # the seed's run (needs ImageNet shards: data.train_shards=...)
    python train.py experiment=demo          # offline, CPU, tiny model, generated shards
    python train.py -m experiment=demo expansion=4,8
    python train.py ckpt_path=<run>/checkpoints/last.ckpt   # resume, in <run> itself
"""

import sys
from datetime import datetime
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sae_lightning.config import register_resolvers
from sae_lightning.training import train

register_resolvers()


def resume_in_place(argv: list[str]) -> list[str]:
    """`ckpt_path=<run>/checkpoints/x.ckpt` without `hydra.run.dir`: continue in <run>, not a new directory.

    Hydra's own files for the resume go to <run>/.hydra/resume-<time>/, so the run's original config stays.
    """
    if any(a in ("-m", "--multirun") for a in argv) or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("ckpt_path=")), None)
    if not spec or spec in ("last", "null"):
        return argv
    ckpt = Path(spec.strip("'\"")).expanduser().resolve()
    if not ckpt.is_file():
        return argv  # train() names the missing file
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return [*argv, f"hydra.run.dir={run}", f"hydra.output_subdir=.hydra/resume-{stamp}"]


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *resume_in_place(sys.argv[1:])]
    main()
