"""The model as the codec sees it: its layers checked once against the kinds ``layers`` codes, the
integer nets built, the grids, and the SHA-256 that names the model in a file."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..config import MNIST_SHAPE, FlowmnistError
from ..flows import ActNorm, AffineCoupling, Dequantization, InvConv1x1, Logit, Sigmoid
from . import exact
from .fileformat import FORMAT_VERSION, CodecParams
from .intnet import IntNet, IntSpec, sha256_of
from .layers import CODERS, H_RANGE, coupling_parts

# ----------------------------------------------------------------------------------------------
# The model as the codec sees it: its layers, checked once
# ----------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What the codec needs of a model: the layer lists (each of a kind it can code) and the grids."""

    model: torch.nn.Module
    params: CodecParams
    noise: list[AffineCoupling]
    flows: list[torch.nn.Module]
    alpha: float  # the main logit's
    noise_alpha: float  # the noise logit's (the logistic base of q)
    variational: bool
    model_dtype: torch.dtype = torch.float32
    shape: tuple[int, int, int] = MNIST_SHAPE  # the model's image shape (make_plan sets it)
    base_c0: int = 0
    extra: dict = field(default_factory=dict)
    fmt: int = FORMAT_VERSION
    nets: dict = field(default_factory=dict)  # id(coupling) -> its IntNet (format 2)

    @property
    def spec(self) -> IntSpec:
        return self.params.spec

    @property
    def m(self):
        """The elementwise maths: portable (format 2) or numpy's own (format 1)."""
        return exact if self.fmt >= 2 else _NumpyMath

    @property
    def dz(self) -> float:
        return 2.0**-self.params.grid_bits

    @property
    def dy(self) -> float:
        return 2.0 ** -(self.params.noise_bits + (9 if not self.variational else 0))

    @property
    def y_range(self) -> tuple[int, int]:
        """(k_min, k_max) of the fine noise grid: u in [0, 1), or h in [-H, H)."""
        if not self.variational:
            return 0, round(1 / self.dy) - 1
        return -round(H_RANGE / self.dy), round(H_RANGE / self.dy) - 1


def _refuse(what: str) -> FlowmnistError:
    return FlowmnistError(f"codec: {what} has no local bits-back coding; this model cannot be compressed")


def make_plan(model: torch.nn.Module, params: CodecParams, fmt: int = FORMAT_VERSION) -> Plan:
    """Check every layer of ``model`` against the kinds the codec codes; refuse the first other one.
    Format 2 builds each coupling's integer net."""
    dq = getattr(model, "dequant", None)
    if type(dq) is not Dequantization:
        raise _refuse(f"dequantization layer {type(dq).__name__}")
    for name in ("logit", "noise_logit"):
        if type(getattr(dq, name)) is not Logit:
            raise _refuse(f"dequant.{name} {type(getattr(dq, name)).__name__}")
    if type(dq.noise_sigmoid) is not Sigmoid:
        raise _refuse(f"dequant.noise_sigmoid {type(dq.noise_sigmoid).__name__}")
    for i, f in enumerate(dq.noise_flows):
        if type(f) is not AffineCoupling:
            raise _refuse(f"layer {type(f).__name__} (dequant.noise_flows[{i}])")
    for i, f in enumerate(model.flows):
        if type(f) not in CODERS:
            raise _refuse(f"layer {type(f).__name__} (flows[{i}])")
    prior = getattr(model, "prior", None)
    if not _standard_prior(prior) and not (fmt >= 2 and _top_class_prior(model)):
        raise _refuse(f"prior {type(prior).__name__}" + (" (class means beyond the final latent)" if fmt >= 2 else ""))
    shape = tuple(getattr(model, "image_shape", ()))
    if len(shape) != 3 or shape[0] != 1:
        raise FlowmnistError(f"codec: model image shape {shape or None}; the codec codes grayscale images (1, H, W)")
    dtype = next(model.parameters(), torch.empty(0)).dtype
    plan = Plan(
        model,
        params,
        list(dq.noise_flows),
        list(model.flows),
        dq.logit.alpha,
        dq.noise_logit.alpha,
        dq.variational,
        dtype,
        shape=shape,
        fmt=fmt,
    )
    if fmt >= 2:
        for layer in plan.noise + [f for f in plan.flows if isinstance(f, AffineCoupling)]:
            try:
                plan.nets[id(layer)] = IntNet(coupling_parts(layer)[0], plan.spec)
            except ValueError as e:
                raise FlowmnistError(f"codec: a coupling net has no exact integer form ({e})") from e
    if plan.variational:
        _base_model(plan)
    return plan


def model_sha256(plan: Plan) -> str:
    """A format-2 file's model: SHA-256 of the integer nets' weights and every other number the codec
    computes with (coupling scale bounds, actnorm, 1x1 convolutions, logit squeezes, the numerics)."""
    arrays = []
    for layer in plan.noise + plan.flows:
        if isinstance(layer, AffineCoupling):
            arrays += plan.nets[id(layer)].arrays() + [_bits(coupling_parts(layer)[2])]
        elif isinstance(layer, (ActNorm, InvConv1x1)):
            arrays += [_bits(p) for p in layer.state_dict().values()]
    arrays.append(_bits(torch.tensor([plan.alpha, plan.noise_alpha], dtype=torch.float64)))
    if conditional(plan):
        arrays += [_bits(t) for t in plan.model.prior.state_dict().values()]
    return sha256_of(arrays, plan.spec.tag())


def _bits(t: Tensor) -> np.ndarray:
    """A float tensor's float64 values as their bit patterns (int64), for hashing."""
    return t.detach().cpu().double().contiguous().numpy().view(np.int64)


def _standard_prior(prior) -> bool:
    """N(0, I) on the whole latent: no prior object, or the models' standard-normal one."""
    from .. import models

    standard = getattr(models, "StandardNormalPrior", None)
    return prior is None or (standard is not None and type(prior) is standard)


def _top_class_prior(model) -> bool:
    """A ``ClassPrior`` whose class Gaussians sit on the final latent alone (class means on "top"): the
    split halves stay N(0, I), and the final latent is coded under N(mu_y, sigma_y) by an affine step."""
    from .. import models

    prior = model.prior
    if type(prior) is not getattr(models, "ClassPrior", None):
        return False
    shape = tuple(model.image_shape)
    for layer in model.flows:
        shape = layer.out_shape(shape)
    return prior.class_dims == math.prod(shape)


def conditional(plan: Plan) -> bool:
    return not _standard_prior(getattr(plan.model, "prior", None))


def _base_model(plan: Plan) -> None:
    """The categorical over coarse cells of the logistic base h0 = logit(a/2 + (1 - a) u0), u0 ~ U[0, 1):
    P(cell c) = F(hi_c) - F(lo_c), F(h) = (sigmoid(h) - a/2) / (1 - a); each cell then uniform."""
    a, w = plan.noise_alpha, 2.0**-plan.params.base_bits
    lo, hi = float(plan.m.logit(a / 2)), float(plan.m.logit(1 - a / 2))
    c0, c1 = math.floor(lo / w), math.floor(hi / w)
    edges = np.clip(np.arange(c0, c1 + 2) * w, lo, hi)
    cdf = (plan.m.sigmoid(edges) - a / 2) / (1 - a)
    plan.base_c0 = c0
    plan.extra["base_probs"] = np.diff(cdf)


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state_dict: each name and the tensor's raw bytes, in order."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def numerics_tag(model: torch.nn.Module) -> str:
    """What the nets' float results depend on besides the weights: dtype, code path, torch build."""
    fast = any(getattr(m, "fast", False) for m in model.modules())
    ref = next(model.parameters(), torch.empty(0))
    return f"{str(ref.dtype).removeprefix('torch.')} fast={int(fast)} torch={torch.__version__}"


# ----------------------------------------------------------------------------------------------
# Format 1's elementwise maths: numpy's functions (their last bits depend on the CPU kind)
# ----------------------------------------------------------------------------------------------


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def _logit(p):
    p = np.asarray(p, np.float64)
    return np.log(p) - np.log1p(-p)


def _log_dsigmoid(h):
    """log sigmoid'(h) = -softplus(h) - softplus(-h)."""
    h = np.asarray(h, np.float64)
    return -(np.logaddexp(0, h) + np.logaddexp(0, -h))


class _NumpyMath:
    """Format 1's maths, with the names of ``exact``'s."""

    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    log1p = staticmethod(np.log1p)
    sigmoid = staticmethod(_sigmoid)
    logit = staticmethod(_logit)
    log_dsigmoid = staticmethod(_log_dsigmoid)
