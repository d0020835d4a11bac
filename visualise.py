"""Feature visualisation: `python visualise.py run=<run dir> features=[3,17] [n_starts=4] [steps=256] ...`.

Config: conf/visualise.yaml; outputs and method: docs/visualisation.md. From Python:
`sae_lightning.visualisation.run.visualise_run(cfg)` with this config, or `visualise_features(...)`.
"""

import hydra
from omegaconf import DictConfig

from sae_lightning.config import register_resolvers
from sae_lightning.visualisation.run import visualise_run

register_resolvers()


@hydra.main(config_path="conf", config_name="visualise", version_base="1.3")
def main(cfg: DictConfig) -> None:
    visualise_run(cfg)


if __name__ == "__main__":
    main()
