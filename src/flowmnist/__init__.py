"""flowmnist: normalizing-flow generative models of MNIST digits (RealNVP / Flow++ style)."""

from .codec import compress, decompress
from .config import Config, FlowmnistError
from .models import MODELS, FlowModel, build_model
from .runs import load_model, load_pretrained, pretrained_names

__all__ = [
    "Config",
    "FlowmnistError",
    "FlowModel",
    "MODELS",
    "build_model",
    "compress",
    "decompress",
    "load_model",
    "load_pretrained",
    "pretrained_names",
]
__version__ = "0.1.0"
