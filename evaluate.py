"""Evaluate a trained SAE: `python evaluate.py run=<run dir> [n_images=N] [val_shards=...] [features=[1,2]]`.

Config: conf/evaluate.yaml; outputs: docs/format-eval.md; definitions: docs/metrics.md. The work is
sae_lightning.evaluation.run.evaluate_run (inputs -> stream -> analyses -> outputs).
"""

import hydra
from omegaconf import DictConfig

from sae_lightning.config import register_resolvers
from sae_lightning.evaluation.run import evaluate_run

register_resolvers()


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate_run(cfg)


if __name__ == "__main__":
    main()
