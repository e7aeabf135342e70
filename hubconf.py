"""torch.hub entry points for the models that ship with flowmnist.

    model = torch.hub.load("path/to/flowmnist", "multi_vardeq", source="local")
    images = model.sample(16)              # uint8 (16, 1, 28, 28)
    bpd = model.bpd(images, k=8)           # bits per dimension, importance-weighted

Each entry returns the shipped model in eval mode after checking its files' SHA-256 (see
flowmnist.runs); ``pretrained=False`` gives the same architecture, untrained.
"""

import sys
from pathlib import Path

dependencies = ["torch", "numpy"]

# A clone used without `pip install`: import the package from its src/ folder.
_SRC = Path(__file__).resolve().parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from dataclasses import replace  # noqa: E402

from flowmnist.runs import PRETRAINED_ROOT, load_pretrained, model_of, run_config  # noqa: E402


def _entry(name: str, pretrained: bool, device: str):
    if pretrained:
        return load_pretrained(name, device)
    # untrained: the architecture and class prior of the shipped model's config
    return model_of(replace(run_config(PRETRAINED_ROOT / name), fast=True)).to(device).eval()


def simple(pretrained: bool = True, device: str = "cpu"):
    """Uniform dequantization, 8 checkerboard couplings."""
    return _entry("simple", pretrained, device)


def vardeq(pretrained: bool = True, device: str = "cpu"):
    """Variational dequantization (Flow++), 8 checkerboard couplings."""
    return _entry("vardeq", pretrained, device)


def multi_simple(pretrained: bool = True, device: str = "cpu"):
    """Uniform dequantization, multi-scale flow with squeeze and split."""
    return _entry("multi-simple", pretrained, device)


def multi_vardeq(pretrained: bool = True, device: str = "cpu"):
    """Variational dequantization, multi-scale flow with squeeze and split."""
    return _entry("multi-vardeq", pretrained, device)


def multi_vardeq_cond(pretrained: bool = True, device: str = "cpu"):
    """Class-conditional multi_vardeq: a fixed Gaussian per digit on the final latent (FlowGMM).
    ``model.sample(n, y=7)`` draws sevens; ``flowmnist classify`` reads digits with it."""
    return _entry("multi-vardeq-cond", pretrained, device)


def fashion_multi_vardeq(pretrained: bool = True, device: str = "cpu"):
    """multi_vardeq trained on Fashion-MNIST."""
    return _entry("fashion-multi-vardeq", pretrained, device)


def multi_vardeq_glow_wide(pretrained: bool = True, device: str = "cpu"):
    """multi_vardeq with 4 couplings of 64 channels at 14x14 and 8 of 96 at 7x7, each channel coupling
    after an actnorm and an invertible 1x1 convolution (Glow steps)."""
    return _entry("multi-vardeq-glow-wide", pretrained, device)


def multi_vardeq_glow_wide_long(pretrained: bool = True, device: str = "cpu"):
    """multi_vardeq_glow_wide trained 60,000 steps (about 570 CPU-minutes) on one core, a cosine over
    the steps: the best shipped MNIST model (docs/models.md)."""
    return _entry("multi-vardeq-glow-wide-long", pretrained, device)


def multi_vardeq_glow_wide_cond(pretrained: bool = True, device: str = "cpu"):
    """Class-conditional multi_vardeq_glow_wide: started from the long run's weights, a fixed Gaussian per
    digit on the final latent (FlowGMM); ``model.sample(n, y=7)``, ``flowmnist classify``."""
    return _entry("multi-vardeq-glow-wide-cond", pretrained, device)
