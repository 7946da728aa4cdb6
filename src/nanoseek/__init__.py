"""nanoseek: understand, train, ablate and run DeepSeek-architecture language models."""

from .config import ModelConfig, TrainConfig
from .errors import NanoseekError
from .generate import generate
from .model import Transformer

__version__ = "0.1.0"


def load_model(path, dtype=None, trust_pickle=False):
    """Load a checkpoint directory (nanoseek or HF format) and return the model in eval mode."""
    from .checkpoint import load_model as _load

    return _load(path, dtype=dtype, trust_pickle=trust_pickle)


__all__ = ["ModelConfig", "TrainConfig", "Transformer", "NanoseekError", "load_model", "generate"]
