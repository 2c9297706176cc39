"""TinyViT on CIFAR-10: model, data and trainer. Knows nothing of Ray, Optuna or MLflow."""
from .config import Config, ConfigError
from .model import TinyViT

__all__ = ["Config", "ConfigError", "TinyViT"]
