"""Coupling networks: the gated convolutional net of PixelCNN++ / Flow++.

The architecture (and so the parameter counts) follows the RealNVP-style MNIST reference of the
UvA deep-learning tutorials (Lippe, "Normalizing Flows for image modeling"):

    conv3x3(c_in -> h)
    [GatedConv(h) -> LayerNormChannels(h)] x num_layers
    ConcatELU -> conv3x3(2h -> c_out), zero-initialised so every coupling starts as the identity.

GatedConv (Salimans et al. 2017, PixelCNN++; Ho et al. 2019, Flow++):
    y = x + a * sigmoid(b),   [a, b] = conv1x1(ConcatELU(conv3x3(ConcatELU(x))))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConcatELU(nn.Module):
    """[ELU(x), ELU(-x)] along channels: keeps both signs' information, doubles the channels."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([F.elu(x), F.elu(-x)], dim=1)


class LayerNormChannels(nn.Module):
    """Layer norm over the channel axis only, per pixel (NCHW), with learnable gain and bias."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.gamma + self.beta


class GatedConv(nn.Module):
    """Gated residual block: x + a * sigmoid(b)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            ConcatELU(),
            nn.Conv2d(2 * channels, hidden, kernel_size=3, padding=1),
            ConcatELU(),
            nn.Conv2d(2 * hidden, 2 * channels, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.net(x).chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class GatedConvNet(nn.Module):
    """The coupling network: maps (masked input [+ condition]) to c_out channels (scale and shift).

    ``autocast_dtype`` (set by ``set_autocast``, e.g. bfloat16 for `train --bf16`) runs the network's
    convolutions in that dtype and returns float32: only the nets, the bulk of the compute, go low
    precision, while the couplings' scale, shift and log-determinant sums stay float32 (a bfloat16
    sum over 784 pixels would be off by whole nats).
    """

    autocast_dtype: torch.dtype | None = None

    def __init__(self, c_in: int, hidden: int = 32, c_out: int | None = None, num_layers: int = 3):
        super().__init__()
        c_out = 2 * c_in if c_out is None else c_out
        layers: list[nn.Module] = [nn.Conv2d(c_in, hidden, kernel_size=3, padding=1)]
        for _ in range(num_layers):
            layers += [GatedConv(hidden, hidden), LayerNormChannels(hidden)]
        layers += [ConcatELU(), nn.Conv2d(2 * hidden, c_out, kernel_size=3, padding=1)]
        self.net = nn.Sequential(*layers)
        # Zero output: every coupling starts as the identity map, so training starts from a stable flow.
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.autocast_dtype is None:
            return self.net(x)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            return self.net(x).float()


def set_autocast(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Run every coupling network in ``model`` under autocast to ``dtype`` (None: plain float32)."""
    for m in model.modules():
        if isinstance(m, GatedConvNet):
            m.autocast_dtype = dtype
