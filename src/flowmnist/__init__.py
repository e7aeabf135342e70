"""flowmnist: normalizing-flow generative models of MNIST digits (RealNVP / Flow++ style)."""

from .config import Config, FlowmnistError
from .models import MODELS, FlowModel, build_model

__all__ = ["Config", "FlowmnistError", "FlowModel", "MODELS", "build_model"]
__version__ = "0.1.0"
