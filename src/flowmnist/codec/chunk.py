"""One chunk of images through the whole model, both ways: the label's bits back (a class-conditional
model), the noise, the dequantization's map, the flows and the final latent, in the order that makes
the decoder the encoder's exact inverse."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..config import FlowmnistError
from . import exact
from .ans import _NullStream, _Stream
from .layers import (
    CODERS,
    H_RANGE,
    Site,
    base_pop,
    base_push,
    prior_pop,
    prior_push,
    scale_fwd,
    scale_inv,
    ymap_fwd,
    ymap_inv,
)
from .plan import Plan, conditional


def encode_chunk(st: _Stream, plan: Plan, x: Tensor) -> np.ndarray:
    """Encode images x (B, 1, H, W) uint8; returns each one's single-sample bound in nats at the noise
    the codec drew (the cost the codec realises, up to its grids)."""
    ideal = np.zeros(x.shape[0])
    y = None
    if conditional(plan):  # bits back on the label: decode y from the stream under q(y | x)
        q = _label_posterior(plan, x)
        y = st.pop_rows(q)
        ideal += np.log(q[np.arange(len(y)), y] / q.sum(1))
    ky = torch.from_numpy(base_pop(st, plan, tuple(x.shape), ideal))
    noise = Site(plan.params.noise_bits, x, ideal)
    for layer in plan.noise:
        ky = CODERS[type(layer)][0](st, plan, layer, ky, noise)
    kmin, kmax = plan.y_range
    if (ky < kmin).any() or (ky > kmax).any():
        raise FlowmnistError(f"codec: dequantization noise outside the codec's range (|h| > {H_RANGE:g})")
    k = torch.from_numpy(ymap_fwd(st, plan, ky.numpy(), x.numpy().astype(np.int64), ideal))
    main = Site(plan.params.grid_bits, None, ideal)
    for layer in plan.flows:
        k = CODERS[type(layer)][0](st, plan, layer, k, main)
    _final_push(st, plan, k.contiguous().numpy(), y, ideal)
    return ideal


# ----------------------------------------------------------------------------------------------
# The final latent, and a class-conditional model's label
# ----------------------------------------------------------------------------------------------


def _final_push(st: _Stream, plan: Plan, k: np.ndarray, y: np.ndarray | None, ideal: np.ndarray) -> None:
    """The final latent under the prior; for a class-conditional model under N(mu_y, sigma_y), as
    z' = (z - mu_y) / sigma_y by a shift and a scale step (cost log sigma_y), and then the label y under
    p(y)."""
    if y is None:
        prior_push(st, plan, k, ideal)
        return
    s, t = _class_terms(plan, y, k.shape)
    ideal -= s.reshape(len(y), -1).sum(1)
    prior_push(st, plan, scale_fwd(st, k, t, s, plan.m), ideal)
    probs, log_py = _label_model(plan)
    st.push_cat(y, st.categorical(probs))
    ideal -= log_py[y]


def _final_pop(st: _Stream, plan: Plan, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """The inverse of ``_final_push``: (final latent, label or None)."""
    if not conditional(plan):
        return prior_pop(st, plan, shape), None
    y = st.pop_cat(shape[0], st.categorical(_label_model(plan)[0]))
    s, t = _class_terms(plan, y, shape)
    return scale_inv(st, prior_pop(st, plan, shape), t, s, plan.m), y


def _label_posterior(plan: Plan, x: Tensor) -> np.ndarray:
    """q(y | x) (B, classes), unnormalised: p(z | y) p(y) at the latent z of images x with the noise at its
    centre and every scale step's remainder 0 (the layer coders on a ``_NullStream``), in ``exact``'s
    maths with sums in a fixed order: the same numbers for the encoder, which decodes y under it (bits
    back), and the decoder, which encodes y again once it knows x."""
    null, ideal = _NullStream(), np.zeros(len(x))
    centre = 0 if plan.variational else (plan.y_range[1] + 1) // 2
    ky = torch.full(tuple(x.shape), centre, dtype=torch.int64)
    noise = Site(plan.params.noise_bits, x, ideal)
    for layer in plan.noise:
        ky = CODERS[type(layer)][0](null, plan, layer, ky, noise)
    k = torch.from_numpy(ymap_fwd(null, plan, ky.numpy(), x.numpy().astype(np.int64), ideal))
    main = Site(plan.params.grid_bits, None, ideal)
    for layer in plan.flows:
        k = CODERS[type(layer)][0](null, plan, layer, k, main)
    z = (k.reshape(len(x), -1).numpy() + 0.5) * plan.dz
    prior = plan.model.prior
    mean, log_scale = prior.mean.detach().double().numpy(), prior.log_scale.detach().double().numpy()
    ll = (
        np.stack(
            [
                np.cumsum(-0.5 * np.square((z - mean[c]) * exact.exp(-log_scale[c])) - log_scale[c], axis=1)[:, -1]
                for c in range(len(mean))
            ],
            axis=1,
        )
        + _label_model(plan)[1]
    )
    return exact.exp(ll - ll.max(axis=1, keepdims=True))


def _class_terms(plan: Plan, y: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per element of the final latent: the scale step's log-scale -log sigma_y and the integer shift
    -mu_y / delta (the codec's z' = (z + t) e^s)."""
    prior = plan.model.prior
    mean = prior.mean.detach().double().numpy()[y]
    log_scale = prior.log_scale.detach().double().numpy()[y]
    return (-log_scale).reshape(shape), np.rint(-mean / plan.dz).astype(np.int64).reshape(shape)


def _label_model(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """p(y) as the probabilities the coder quantises (``exact.exp`` of log p(y)), and log p(y)."""
    log_py = plan.model.prior.log_py.detach().double().numpy()
    return exact.exp(log_py), log_py


def _final_shape(plan: Plan, b: int) -> tuple[int, ...]:
    shape = plan.shape
    for layer in plan.flows:
        shape = layer.out_shape(shape)
    return (b, *shape)


def decode_chunk(st: _Stream, plan: Plan, b: int) -> Tensor:
    """The exact inverse of ``encode_chunk``: b images as uint8 (b, 1, H, W)."""
    k, y = _final_pop(st, plan, _final_shape(plan, b))
    k = torch.from_numpy(k)
    main = Site(plan.params.grid_bits)
    for layer in reversed(plan.flows):
        k = CODERS[type(layer)][1](st, plan, layer, k, main)
    x, ky = ymap_inv(st, plan, k.numpy())
    xt = torch.from_numpy(x.astype(np.uint8))
    ky = torch.from_numpy(ky)
    noise = Site(plan.params.noise_bits, xt)
    for layer in reversed(plan.noise):
        ky = CODERS[type(layer)][1](st, plan, layer, ky, noise)
    base_push(st, plan, ky.numpy())
    if y is not None:
        st.push_rows(y, _label_posterior(plan, xt))
    return xt
