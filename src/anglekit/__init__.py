"""anglekit: train, evaluate and serve AnglE (angle-optimized) text embeddings."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AnglE": "anglekit.model",
    "AngleConfig": "anglekit.config",
    "AngleLoss": "anglekit.losses",
    "EspressoConfig": "anglekit.espresso",
    "LossConfig": "anglekit.losses",
    "Pooling": "anglekit.pooling",
    "Prompts": "anglekit.prompts",
    "TrainOptions": "anglekit.training",
    "fit": "anglekit.training",
}

__all__ = [
    "AnglE",
    "AngleConfig",
    "AngleLoss",
    "EspressoConfig",
    "LossConfig",
    "Pooling",
    "Prompts",
    "TrainOptions",
    "__version__",
    "fit",
]

if TYPE_CHECKING:
    from anglekit.config import AngleConfig
    from anglekit.espresso import EspressoConfig
    from anglekit.losses import AngleLoss, LossConfig
    from anglekit.model import AnglE
    from anglekit.pooling import Pooling
    from anglekit.prompts import Prompts
    from anglekit.training import TrainOptions, fit


def __getattr__(name: str) -> Any:
    """Import the heavy parts (torch, transformers) only when first used."""
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'anglekit' has no attribute {name!r}")
