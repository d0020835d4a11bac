"""SAE Explorer: the data bundle evaluation writes for it, the Streamlit app and the guessing game's metric."""

from sae_lightning.explorer.bundle import BUNDLE_VERSION, ActivationHistogram, Bundle, write_explorer_bundle
from sae_lightning.explorer.game import game_metric

__all__ = ["BUNDLE_VERSION", "ActivationHistogram", "Bundle", "game_metric", "write_explorer_bundle"]
