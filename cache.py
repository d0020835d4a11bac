"""Write an activation cache: the training shards through the frozen backbone once (docs/format-activations.md).

    python cache.py experiment=demo                       # the demo's backbone, shards, layer and tokens
    python cache.py layer=20 tokens=all cache.dtype=bf16 cache.dir=/data/cache/l20-all
    python train.py data=cache data.path=/data/cache/l20-all   # train from it (no backbone)

Rerun the same command after an interruption to continue; overwrite=true replaces a cache of another config.
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from sae_lightning.config import register_resolvers
from sae_lightning.data.cache_write import CacheWriteError, CacheWriter
from sae_lightning.training import quiet_console

register_resolvers()
log = logging.getLogger("cache")


@hydra.main(config_path="conf", config_name="cache", version_base="1.3")
def main(cfg: DictConfig) -> None:
    quiet_console()
    try:
        code = CacheWriter(cfg).run()  # 0 complete, 143/130 stopped by SIGTERM/SIGINT (what is complete is kept)
    except (ValueError, FileNotFoundError, CacheWriteError) as err:  # clear and actionable (CacheError, a full disk)
        log.error("%s", err)
        code = 2
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
