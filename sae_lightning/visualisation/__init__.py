"""Feature visualisation: images optimised to maximise an SAE feature through the frozen backbone up to the
hooked block (Fourier parametrisation with decorrelated colour, transformation robustness; Olah et al. 2017).
See docs/visualisation.md."""

from sae_lightning.visualisation.objective import feature_pre_activations, hooked_tokens, normalise_pixels
from sae_lightning.visualisation.optimise import VisualisationResult, visualise_features
from sae_lightning.visualisation.parametrisation import FourierImage
from sae_lightning.visualisation.transforms import TransformConfig, random_transform

__all__ = [
    "FourierImage",
    "TransformConfig",
    "VisualisationResult",
    "feature_pre_activations",
    "hooked_tokens",
    "normalise_pixels",
    "random_transform",
    "visualise_features",
]
