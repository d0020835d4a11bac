"""Train a sparse autoencoder on a frozen CLIP ViT's residual stream.

    python train.py                          # the seed's run (needs ImageNet shards: data.train_shards=...)
    python train.py experiment=demo          # offline, CPU, tiny model, generated shards
    python train.py -m experiment=demo expansion=4,8
"""

import hydra
from omegaconf import DictConfig

from sae_lightning.config import register_resolvers
from sae_lightning.training import train

register_resolvers()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
