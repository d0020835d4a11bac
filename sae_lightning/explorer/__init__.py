"""SAE Explorer: the data bundle evaluation writes for it, the Streamlit app and the guessing game's metric.

Names are imported on first use: the app and its launcher read bundles without importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"write_explorer_bundle": "bundle", "ActivationHistogram": "bundle", "Bundle": "store",
            "BUNDLE_VERSION": "store", "ThumbnailStore": "store", "game_metric": "game"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sae_lightning.explorer.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sae_lightning.explorer' has no attribute {name!r}")
