"""nanoseek: understand, train, ablate and run DeepSeek-architecture language models.

>>> from nanoseek import ModelConfig, Transformer, generate
>>> model = Transformer(ModelConfig.from_preset("deepseek-v3-tiny")).eval()
>>> generate(model, [1, 2, 3], max_new_tokens=4, temperature=0).shape
torch.Size([4])
"""

import nanoseek.kernels  # noqa: F401 (installs the fast paths into the model; see kernels/__init__.py)
from nanoseek.config import ModelConfig, TrainConfig
from nanoseek.errors import NanoseekError
from nanoseek.generation.loop import generate
from nanoseek.io import load_model, save_model
from nanoseek.model import Transformer

__version__ = "0.1.0"

__all__ = ["ModelConfig", "TrainConfig", "Transformer", "NanoseekError", "load_model", "save_model", "generate"]
