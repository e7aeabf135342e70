"""Coupling networks: the gated convolutional net of PixelCNN++ (Salimans et al. 2017,
https://arxiv.org/abs/1701.05517) and Flow++ (Ho et al. 2019, https://arxiv.org/abs/1902.00275).

The architecture (and so the parameter counts) follows the RealNVP-style MNIST reference of the
UvA deep-learning tutorials (Lippe, "Normalizing Flows for image modeling"):

    conv3x3(c_in -> h)
    [GatedConv(h) -> LayerNormChannels(h)] x num_layers
    ConcatELU -> conv3x3(2h -> c_out), zero-initialised so every coupling starts as the identity.

GatedConv (Salimans et al. 2017, PixelCNN++; Ho et al. 2019, Flow++):
    y = x + a * sigmoid(b),   [a, b] = conv1x1(ConcatELU(conv3x3(ConcatELU(x))))

Two implementations compute the same function with the same parameter names (so checkpoints load in
either): the plain path (``fast=False``, NCHW, written as the formulas read) and the fast path
(``fast=True``), which on a CPU runs the net in channels-last memory format (oneDNN's faster layout for
convolutions, where the channel layer norm becomes a contiguous ``F.layer_norm`` over the last axis
instead of ``var`` over the strided channel axis of NCHW) and saves fewer activations for backward
(``ConcatELU`` as one autograd function keeping only its output, which the next conv keeps anyway).
docs/speed.md has the measurements.

On top of the fast path, ``compile_nets`` compiles the nets' blocks with torch.compile; under
compilation the fast modules switch to plain ops (``concat_elu_one_exp``, the gate as written) that
inductor fuses, since it cannot fuse through a custom autograd Function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConcatELU(nn.Module):
    """[ELU(x), ELU(-x)] along channels: keeps both signs' information, doubles the channels
    (PixelCNN++, Salimans et al. 2017, https://arxiv.org/abs/1701.05517)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([F.elu(x), F.elu(-x)], dim=1)


class _ConcatELUFn(torch.autograd.Function):
    """y = [ELU(x), ELU(-x)] along channels, with a backward that needs only y:

        dELU(u)/du = 1 if u > 0 else ELU(u) + 1,  so  dx = dy_1 * ELU'(x) - dy_2 * ELU'(-x)

    is computed from y itself. Autograd then keeps one tensor (y, shared with the following conv,
    which saves its input anyway) instead of ELU(x), ELU(-x) and their concatenation.

    Layout: in NHWC memory each pixel's 2C values are [x, -x], i.e. an (N, H, W, 2, C) array, so
    the doubling is one broadcast multiply by (+1, -1) straight into a channels-last result (no
    separate negation and strided concatenation).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        sign = torch.tensor([[1.0], [-1.0]], dtype=x.dtype, device=x.device)  # (2, 1)
        y = x.new_empty(n, h, w, 2, c)  # given explicitly: mul would copy x's permuted strides
        F.elu_(torch.mul(x.permute(0, 2, 3, 1).unsqueeze(3), sign, out=y))
        y = y.view(n, h, w, 2 * c).permute(0, 3, 1, 2)  # NCHW view, channels-last memory
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        n, c2, h, w = y.shape
        g = torch.ops.aten.elu_backward(dy, 1.0, 1, 1.0, True, y)  # dy * ELU'(.), from the result
        g = g.permute(0, 2, 3, 1).reshape(n, h, w, 2, c2 // 2)  # a view when g is channels-last
        return (g[:, :, :, 0] - g[:, :, :, 1]).permute(0, 3, 1, 2)


def concat_elu_one_exp(x: Tensor) -> Tensor:
    """[ELU(x), ELU(-x)] with one exponential per element: of x and -x only the negative one needs
    exp, and it is exp(-|x|) for both,

        e = expm1(-|x|):   ELU(x) = x if x > 0 else e,   ELU(-x) = e if x > 0 else -x.

    Plain ops, written for torch.compile: inductor fuses it (and its derivative) into one pass."""
    e = torch.expm1(-x.abs())
    pos = x > 0
    return torch.cat([torch.where(pos, x, e), torch.where(pos, e, -x)], dim=1)


class FastConcatELU(ConcatELU):
    """ConcatELU with the memory-lean backward of ``_ConcatELUFn`` when eager, and the one-exp form
    of ``concat_elu_one_exp`` under torch.compile (which cannot fuse through a custom Function)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return concat_elu_one_exp(x)
        return _ConcatELUFn.apply(x)


class LayerNormChannels(nn.Module):
    """Layer norm (Ba et al. 2016, https://arxiv.org/abs/1607.06450) over the channel axis only, per pixel
    (NCHW), with learnable gain and bias."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.gamma + self.beta


class FastLayerNormChannels(LayerNormChannels):
    """The same normalisation as ``F.layer_norm`` over the last axis of the NHWC view:

        y = (x - mean_c x) / sqrt(var_c x + eps) * gamma + beta

    For a channels-last tensor the permuted view is contiguous, so this is one fused pass (and its
    backward one more) instead of separate mean, var, sub, rsqrt, mul, mul, add kernels. The output is
    channels-last whatever the input's layout.
    """

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        y = F.layer_norm(x.permute(0, 2, 3, 1), (c,), self.gamma.view(c), self.beta.view(c), self.eps)
        return y.permute(0, 3, 1, 2)


class _GateFn(torch.autograd.Function):
    """y = x + a * sigmoid(b) with [a, b] = h split along channels; backward writes dh in one buffer:

        dx = dy,   da = dy * s,   db = dy * a * s * (1 - s),   s = sigmoid(b)

    Saves h (alive anyway as the conv's output) and recomputes s, where autograd would keep s as well
    and concatenate da and db in an extra copy.
    """

    @staticmethod
    def forward(ctx, x: Tensor, h: Tensor) -> Tensor:
        a, b = h.chunk(2, dim=1)
        ctx.save_for_backward(h)
        return torch.addcmul(x, a, torch.sigmoid(b))

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor, Tensor]:
        (h,) = ctx.saved_tensors
        a, b = h.chunk(2, dim=1)
        s = torch.sigmoid(b)
        dh = torch.empty_like(h)
        da, db = dh.chunk(2, dim=1)
        torch.mul(dy, s, out=da)
        torch.ops.aten.sigmoid_backward(dy * a, s, grad_input=db)  # dy * a * s * (1 - s)
        return dy, dh


class GatedConv(nn.Module):
    """Gated residual block: x + a * sigmoid(b) (PixelCNN++, https://arxiv.org/abs/1701.05517; Flow++,
    https://arxiv.org/abs/1902.00275)."""

    def __init__(self, channels: int, hidden: int, fast: bool = False):
        super().__init__()
        elu = FastConcatELU if fast else ConcatELU
        self.net = nn.Sequential(
            elu(),
            nn.Conv2d(2 * channels, hidden, kernel_size=3, padding=1),
            elu(),
            nn.Conv2d(2 * hidden, 2 * channels, kernel_size=1),
        )
        self.fast = fast

    def forward(self, x: Tensor) -> Tensor:
        if self.fast and not torch.compiler.is_compiling():  # compiled: plain ops, which inductor fuses
            return _GateFn.apply(x, self.net(x))
        a, b = self.net(x).chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


def conv3x3_by_taps(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """A 3x3 convolution (padding 1) as one matrix product and a shifted sum over the nine taps:

        Z[n, i, j, k] = W_k h[n, :, i, j]                    k = (dy, dx): one GEMM, (NHW x C) by (C x 9 c_out)
        out[n, :, i, j] = b + sum_k Z[n, i + dy - 1, j + dx - 1, k]      (zero outside the image)

    The same products and sums as the direct convolution, added in another order (float32 rounding).
    Plain ops, written for torch.compile, which fuses the shifted sum into one pass over Z.
    """
    n, c, h, w = x.shape
    o = weight.shape[0]
    z = F.linear(x.permute(0, 2, 3, 1), weight.permute(2, 3, 0, 1).reshape(9 * o, c)).view(n, h, w, 3, 3, o)
    z = F.pad(z, (0, 0, 0, 0, 0, 0, 1, 1, 1, 1))  # a zero border around the image (dims w, then h)
    out = bias
    for dy in range(3):
        for dx in range(3):
            out = out + z[:, dy : dy + h, dx : dx + w, dy, dx]
    return out.permute(0, 3, 1, 2)


class OutConv(nn.Conv2d):
    """The net's last 3x3 convolution (2h -> c_out, few output channels), with a faster form for
    compiled inference.

    oneDNN's direct convolution uses its vector lanes for output channels, so with c_out = 2 (every
    checkerboard coupling) it leaves most of them idle. ``compile_nets`` sets ``by_taps`` to a compiled
    ``conv3x3_by_taps``, used when no gradient is needed and 9 c_out <= c_in (the GEMM's 9 c_out
    columns then make a shape that BLAS runs well). Training keeps the convolution, whose backward is
    cheaper than the shifted sum's.
    """

    by_taps = None

    def forward(self, x: Tensor) -> Tensor:
        if self.by_taps is not None and not torch.is_grad_enabled() and 9 * self.out_channels <= self.in_channels:
            return self.by_taps(x, self.weight, self.bias)
        return super().forward(x)


class GatedAttention(nn.Module):
    """Multi-head self-attention over the H x W positions with a gated residual, as in Flow++'s coupling
    nets (Ho et al. 2019, https://arxiv.org/abs/1902.00275), then a channel layer norm:

        q, k, v = conv1x1(x + e_pos);   o = softmax(q k^T / sqrt(d)) v per head;
        y = norm(x + a * sigmoid(g)),   [a, g] = conv1x1(o)

    e_pos is a learned position embedding of the block's resolution: attention alone is blind to where a
    pixel is. Cheap where it pays: 196 positions at 14 x 14, 49 at 7 x 7."""

    def __init__(self, channels: int, resolution: tuple[int, int], heads: int = 4, fast: bool = False):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention needs channels ({channels}) divisible by heads ({heads})")
        self.heads = heads
        self.pos = nn.Parameter(torch.randn(1, channels, *resolution) * 0.02)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.out = nn.Conv2d(channels, 2 * channels, kernel_size=1)
        self.norm = (FastLayerNormChannels if fast else LayerNormChannels)(channels)

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(x + self.pos).reshape(n, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        o = F.scaled_dot_product_attention(q, k, v)  # (n, heads, hw, d)
        a, g = self.out(o.transpose(-1, -2).reshape(n, c, h, w)).chunk(2, dim=1)
        return self.norm(x + a * torch.sigmoid(g))


class GatedConvNet(nn.Module):
    """The coupling network of Flow++ (Ho et al. 2019, https://arxiv.org/abs/1902.00275): maps (masked
    input [+ condition]) to c_out channels (scale and shift).

    ``autocast_dtype`` (set by ``set_autocast``: bfloat16 in training steps with `--precision bfloat16`)
    runs the network's convolutions in that dtype and returns float32: only the nets, the bulk of the compute, go low
    precision, while the couplings' scale, shift and log-determinant sums stay float32 (a bfloat16
    sum over 784 pixels would be off by whole nats).
    """

    autocast_dtype: torch.dtype | None = None

    def __init__(
        self,
        c_in: int,
        hidden: int = 32,
        c_out: int | None = None,
        num_layers: int = 3,
        fast: bool = False,
        attention: tuple[int, int] | None = None,
    ):
        super().__init__()
        c_out = 2 * c_in if c_out is None else c_out
        norm = FastLayerNormChannels if fast else LayerNormChannels
        layers: list[nn.Module] = [nn.Conv2d(c_in, hidden, kernel_size=3, padding=1)]
        for _ in range(num_layers):
            layers += [GatedConv(hidden, hidden, fast=fast), norm(hidden)]
            if attention is not None:  # (H, W): a self-attention block after each gated block
                layers.append(GatedAttention(hidden, attention, fast=fast))
        out = (OutConv if fast else nn.Conv2d)(2 * hidden, c_out, kernel_size=3, padding=1)
        layers += [FastConcatELU() if fast else ConcatELU(), out]
        self.net = nn.Sequential(*layers)
        self.fast = fast
        # Zero output: every coupling starts as the identity map, so training starts from a stable flow.
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        if not self.fast:
            return self._run(x)
        # Channels-last inside the net (convs and layer norms are faster there), plain NCHW outside:
        # the few output channels are cheap to copy back, and the coupling's elementwise ops then see
        # operands of one layout.
        return self._run(x.contiguous(memory_format=torch.channels_last)).contiguous()

    def _layers(self, x: Tensor) -> Tensor:
        layers = iter(self.net)  # not self.net[1:], which builds a new Sequential at every call
        h = next(layers)(x)
        if self.fast:
            # With one input channel, x is both NCHW- and channels-last-contiguous, and oneDNN then
            # returns the first conv's output as NCHW: the first block would run its convolutions in
            # the slower layout (a compiled block is traced for the layout it sees). Pin the layout.
            h = h.contiguous(memory_format=torch.channels_last)
        for layer in layers:
            h = layer(h)
        return h

    def _run(self, x: Tensor) -> Tensor:
        if self.autocast_dtype is None:
            return self._layers(x)
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            return self._layers(x).float()


def set_autocast(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Run every coupling network in ``model`` under autocast to ``dtype`` (None: plain float32)."""
    for m in model.modules():
        if isinstance(m, GatedConvNet):
            m.autocast_dtype = dtype


def compile_nets(model: nn.Module) -> int:
    """``torch.compile`` the blocks of every coupling network of ``model`` in place (parameter names
    unchanged, so checkpoints are unaffected); returns the number of networks.

    What is compiled: each ``GatedConv`` (ConcatELU, conv, ConcatELU, conv, gate), each layer norm,
    the final ConcatELU and, for inference, the output convolution's GEMM form (``OutConv``): the bulk
    of the work; inductor fuses their elementwise chains (and derivatives)
    into a few loops around oneDNN's convolutions. With ``dynamic=True`` one graph serves every channel
    count, batch size and resolution of a block type, so a model compiles a handful of small graphs
    (about 30 s cold, seconds with inductor's on-disk cache warm) instead of one per shape. (A whole
    net's graph is not an option: inductor fails to build it with dynamic shapes in torch 2.13.)

    If compilation fails (say, no C++ compiler on the machine), the blocks run eagerly with a warning
    from PyTorch: slower, same results.
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.suppress_errors = True
    nets = [m for m in model.modules() if isinstance(m, GatedConvNet)]
    by_taps = torch.compile(conv3x3_by_taps, dynamic=True)
    for net in nets:
        for block in net.modules():
            if isinstance(block, (GatedConv, LayerNormChannels)) or type(block) is FastConcatELU:
                block.compile(dynamic=True)
            elif isinstance(block, OutConv):
                block.by_taps = by_taps
    return len(nets)
