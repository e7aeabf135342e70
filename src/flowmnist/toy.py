"""Dequantization explained on a toy: a 1-D categorical distribution over x in {0, ..., K-1}.

Three views, each with the bits of the model it shows (1 dimension, so bits = bits per dimension):

(a) The discrete distribution P(x) = p_x as spikes. Its entropy H = -sum_x p_x log2 p_x is the best
    expected code length any model of x can reach.
(b) Uniform dequantization (Theis et al. 2016): v = x + u, u ~ U[0, 1). The dequantized density is
    r(v) = p_floor(v), piecewise constant with jumps at the integers. As a continuous model of v
    its exact NLL is E[-log r(v)] = H (bins of width 1: no log-width term), but a *smooth* density
    cannot follow the jumps: the same smooth family fitted to these v pays extra bits.
(c) Variational dequantization (Ho et al. 2019, Flow++): u ~ q(u|x), a small conditional flow on
    [0, 1], trained jointly with a smooth density p(v) to maximise the ELBO

        log P(x) >= E_{u ~ q(u|x)} [ log p(x + u) - log q(u|x) ],

    whose optimum q(u|x) = p(x + u) / P(x) lets the dequantized density r(v) = p_x q(v - x | x)
    follow p across the integer boundaries, so the smooth model loses (almost) nothing.

Everything is float64 and tiny (a few dozen parameters): a fit takes a second or two on one CPU core.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FlowmnistError

DEFAULT_PROBS = (0.4, 0.1, 0.45, 0.05)
LN2 = math.log(2)
DTYPE = torch.float64


def normalise_probs(probs) -> np.ndarray:
    """Validate and normalise to sum 1. Warns (UserWarning) when the given values did not sum to 1,
    since a silent renormalisation would change the figures' bits without the user knowing."""
    p = np.asarray(list(probs), dtype=float)
    if p.ndim != 1 or len(p) < 2:
        raise FlowmnistError(f"need at least 2 probabilities, got {len(p)}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise FlowmnistError(f"probabilities must be finite, non-negative and not all zero, got {p.tolist()}")
    total = float(p.sum())
    if abs(total - 1) > 1e-6:
        msg = f"probabilities sum to {total:g}, not 1; normalised to {(p / total).round(4).tolist()}"
        warnings.warn(msg, UserWarning, stacklevel=2)
    return p / total


def entropy_bits(p: np.ndarray) -> float:
    """H = -sum_x p_x log2 p_x (terms with p_x = 0 contribute 0)."""
    p = np.asarray(p, dtype=float)
    nz = p[p > 0]
    return float(-(nz * np.log2(nz)).sum())


def midpoints(n: int) -> Tensor:
    """u0_i = (i + 1/2) / n: midpoint-rule nodes on [0, 1], for deterministic expectations over U[0,1)."""
    return (torch.arange(n, dtype=DTYPE) + 0.5) / n


def _mixture_log_pdf(v: Tensor, logit_pi: Tensor, mu: Tensor, log_s: Tensor, lo: float, hi: float) -> Tensor:
    """log of a logistic mixture truncated to [lo, hi]; parameters (..., M) broadcast against v (...):

    p(v) = sum_i pi_i l(v; mu_i, s_i) / Z,   l(v; mu, s) = sigma'((v - mu) / s) / s,
    Z = sum_i pi_i [sigma((hi - mu_i) / s_i) - sigma((lo - mu_i) / s_i)],
    log l = -softplus(-t) - softplus(t) - log s  with t = (v - mu) / s  (stable in both tails).
    """
    s = log_s.exp()
    t = (v.unsqueeze(-1) - mu) / s
    log_w = F.log_softmax(logit_pi, -1)
    log_l = -F.softplus(-t) - F.softplus(t) - log_s
    log_z = torch.logsumexp(log_w + torch.log(torch.sigmoid((hi - mu) / s) - torch.sigmoid((lo - mu) / s)), -1)
    return torch.logsumexp(log_w + log_l, -1) - log_z


def _mixture_cdf(v: Tensor, logit_pi: Tensor, mu: Tensor, log_s: Tensor, lo: float, hi: float) -> Tensor:
    """F(v) = sum_i pi_i [sigma((v - mu_i)/s_i) - sigma((lo - mu_i)/s_i)] / Z, the CDF of the above."""
    s = log_s.exp()
    pi = F.softmax(logit_pi, -1)
    base = torch.sigmoid((lo - mu) / s)
    mass = ((torch.sigmoid((v.unsqueeze(-1) - mu) / s) - base) * pi).sum(-1)
    return mass / ((torch.sigmoid((hi - mu) / s) - base) * pi).sum(-1)


class TruncatedLogisticMixture(nn.Module):
    """p(v): a smooth density on [0, K], a logistic mixture truncated to the interval (see
    ``_mixture_log_pdf``). Its CDF is closed-form, so the discrete distribution it induces,
    P(x) = int_x^{x+1} p(v) dv, is exact: that is what makes the ELBO's gap measurable.
    """

    def __init__(self, k: int, components: int = 4):
        super().__init__()
        self.k = k
        self.logit_pi = nn.Parameter(torch.zeros(components, dtype=DTYPE))
        # Spread over the interval, each about one bin wide: a near-flat start with no preferred value.
        self.mu = nn.Parameter(torch.linspace(0.5, k - 0.5, components, dtype=DTYPE))
        self.log_s = nn.Parameter(torch.full((components,), math.log(k / components), dtype=DTYPE))

    def log_prob(self, v: Tensor) -> Tensor:
        return _mixture_log_pdf(v, self.logit_pi, self.mu, self.log_s, 0.0, float(self.k))

    def cdf(self, v: Tensor) -> Tensor:
        return _mixture_cdf(v, self.logit_pi, self.mu, self.log_s, 0.0, float(self.k))

    def discrete_log_prob(self) -> Tensor:
        """log P(x) = log (F(x + 1) - F(x)) for x = 0..K-1: the exact likelihood of the discrete value."""
        edges = torch.arange(self.k + 1, dtype=DTYPE)
        return torch.log(torch.diff(self.cdf(edges)).clamp_min(1e-300))


class ConditionalDequantizer(nn.Module):
    """q(u|x) on [0, 1]: a one-layer 1-D flow whose map u -> u0 is the CDF G of a truncated logistic
    mixture with per-category parameters (Flow++'s mixture-CDF layer; x takes K values, so the
    conditioning is a table lookup). Then u0 = G(u|x) ~ U[0, 1) exactly when u ~ q(u|x) = G'(u|x),
    and the density has finite positive values at the bin edges 0 and 1 (a flow on logit(u) would
    give 0 or infinity there), so smoothness across an integer boundary is well defined.

    Sampling inverts G by bisection (monotone, 1-D: to 2^-32 in 32 halvings, far below the sampling noise). The gradient
    uses implicit reparameterisation (Figurnov et al. 2018): du/dtheta = -(dG/dtheta) / q(u|x),
    wired in as u = u* - (G(u*) - stop_grad G(u*)) / stop_grad q(u*).
    """

    def __init__(self, k: int, components: int = 4):
        super().__init__()
        self.logit_pi = nn.Parameter(torch.zeros(k, components, dtype=DTYPE))
        # A near-uniform start: broad components spread over the bin (the uniform dequantizer's q).
        self.mu = nn.Parameter(torch.linspace(0.1, 0.9, components, dtype=DTYPE).repeat(k, 1))
        self.log_s = nn.Parameter(torch.zeros(k, components, dtype=DTYPE))

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.logit_pi[x], self.mu[x], self.log_s[x]

    def log_q(self, x: Tensor, u: Tensor) -> Tensor:
        """log q(u|x) for given u in [0, 1]."""
        return _mixture_log_pdf(u, *self._params(x), 0.0, 1.0)

    def forward(self, x: Tensor, u0: Tensor) -> tuple[Tensor, Tensor]:
        """x: long (N,), u0: (N,) in [0, 1] -> (u = G^{-1}(u0 | x), log q(u|x))."""
        params = self._params(x)
        with torch.no_grad():
            lo, hi = torch.zeros_like(u0), torch.ones_like(u0)
            for _ in range(32):
                mid = (lo + hi) / 2
                below = _mixture_cdf(mid, *params, 0.0, 1.0) < u0
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            u_star = (lo + hi) / 2
        g = _mixture_cdf(u_star, *params, 0.0, 1.0)
        q_star = _mixture_log_pdf(u_star, *params, 0.0, 1.0).exp()
        u = u_star - (g - g.detach()) / q_star.detach()
        return u, _mixture_log_pdf(u, *params, 0.0, 1.0)


@dataclass
class ToyFit:
    """The three models of the concept figures and their bits (all exact up to midpoint quadrature)."""

    probs: np.ndarray
    entropy_bits: float  # (a) and (b): H
    uniform_smooth: TruncatedLogisticMixture  # the smooth family fitted to uniformly dequantized v
    uniform_smooth_bits: float  # E_{x, u~U}[-log2 p(x + u)]
    density: TruncatedLogisticMixture  # (c): p(v), trained jointly with ...
    dequantizer: ConditionalDequantizer  # ... q(u|x)
    variational_bits: float  # -ELBO / ln 2
    variational_exact_bits: float  # -sum_x p_x log2 P(x) of the same p(v): a cross-entropy, >= H


def elbo_bits(
    probs: np.ndarray,
    density: TruncatedLogisticMixture,
    dequantizer: ConditionalDequantizer | None = None,
    nodes: int = 4096,
) -> float:
    """-ELBO in bits: -sum_x p_x E_{u0}[log p(x + u) - log q(u|x)] / ln 2, the expectation over u0 by
    the midpoint rule (deterministic, so two models compare without Monte-Carlo noise). With no
    dequantizer, u = u0 is uniform and log q = 0: the smooth model's NLL on uniformly dequantized v."""
    u0 = midpoints(nodes)
    total = 0.0
    with torch.no_grad():
        for x, px in enumerate(probs):
            if px == 0:
                continue
            xs = torch.full((nodes,), x, dtype=torch.long)
            u, log_q = dequantizer(xs, u0) if dequantizer is not None else (u0, torch.zeros_like(u0))
            total += px * float((density.log_prob(x + u) - log_q).mean())
    return -total / LN2


def _elbo_loss(probs: Tensor, density, dequantizer, batch: int, gen: torch.Generator) -> Tensor:
    """Reparameterised one-batch estimate of -ELBO in nats; every category in every batch, weighted
    by p_x (lower variance than drawing x)."""
    k = len(probs)
    x = torch.arange(k).repeat_interleave(batch)
    u0 = torch.rand(k * batch, generator=gen, dtype=DTYPE)
    u, log_q = dequantizer(x, u0) if dequantizer is not None else (u0, torch.zeros_like(u0))
    per = (density.log_prob(x + u) - log_q).view(k, batch).mean(1)
    return -(probs * per).sum()


def _fit(probs: np.ndarray, variational: bool, steps: int, seed: int, components: int, batch: int = 128):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    p = torch.tensor(probs, dtype=DTYPE)
    density = TruncatedLogisticMixture(len(probs), components)
    deq = ConditionalDequantizer(len(probs)) if variational else None
    params = list(density.parameters()) + (list(deq.parameters()) if deq is not None else [])
    opt = torch.optim.Adam(params, lr=0.05)
    # Cosine decay: a large early step finds the shape, a small late one settles it (less noise in the bits).
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = _elbo_loss(p, density, deq, batch, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return density, deq


def fit_toy(probs=DEFAULT_PROBS, seed: int = 0, steps: int = 300, components: int = 4) -> ToyFit:
    """Fit (b)'s smooth density on uniform dequantization and (c)'s variational pair with the same
    density family, optimiser, steps and seed, so the two bits compare like for like."""
    p = normalise_probs(probs)
    uni, _ = _fit(p, False, steps, seed, components)
    dens, deq = _fit(p, True, steps, seed, components)
    with torch.no_grad():
        exact = -float((torch.tensor(p) * dens.discrete_log_prob()).sum()) / LN2
    return ToyFit(
        probs=p,
        entropy_bits=entropy_bits(p),
        uniform_smooth=uni,
        uniform_smooth_bits=elbo_bits(p, uni),
        density=dens,
        dequantizer=deq,
        variational_bits=elbo_bits(p, dens, deq),
        variational_exact_bits=exact,
    )


def fit_toy_noting(probs=DEFAULT_PROBS, seed: int = 0) -> tuple[ToyFit, list[str]]:
    """``fit_toy``, with its warnings (a renormalised distribution) returned as notes for the caller to
    show, instead of Python's warning output."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_toy(probs, seed)
    return fit, [str(w.message) for w in caught]


@torch.no_grad()
def dequantized_density(probs: np.ndarray, dequantizer: ConditionalDequantizer | None, nodes: int = 400):
    """The dequantized data density r(v) = p_x q(v - x | x) on each bin [x, x+1], both ends included
    (q = 1 for uniform dequantization). Returns a list of (v, r) arrays, one per x."""
    u = torch.linspace(0, 1, nodes, dtype=DTYPE)
    out = []
    for x, px in enumerate(probs):
        if dequantizer is None:
            q = torch.ones_like(u)
        else:
            q = dequantizer.log_q(torch.full((nodes,), x, dtype=torch.long), u).exp()
        out.append(((x + u).numpy(), (px * q).numpy()))
    return out


def boundary_jumps(probs: np.ndarray, dequantizer: ConditionalDequantizer | None) -> np.ndarray:
    """|log r(k+) - log r(k-)| at the inner integers k = 1..K-1, where r(k-) = p_{k-1} q(1 | k-1) and
    r(k+) = p_k q(0 | k): 0 for a density continuous across the boundary; |log(p_k / p_{k-1})| for
    uniform dequantization. Categories with p = 0 give an infinite jump."""
    curves = dequantized_density(probs, dequantizer, nodes=2)  # u in {0, 1}: the two bin edges
    with np.errstate(divide="ignore"):
        left = np.array([np.log(r[-1]) for _, r in curves[:-1]])
        right = np.array([np.log(r[0]) for _, r in curves[1:]])
    return np.abs(right - left)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def plot_concepts(fit: ToyFit, out_dir) -> list:
    """Write concept_discrete.png, concept_uniform.png, concept_variational.png into ``out_dir``."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    from .plots import save_figure

    out_dir = Path(out_dir)
    p, k = fit.probs, len(fit.probs)
    ymax = 1.15 * max(p.max(), _max_density(fit))
    paths = []

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.vlines(range(k), 0, p, lw=3, color="C0")
    ax.plot(range(k), p, "o", color="C0")
    _style(ax, k, ymax, "P(x)")
    ax.set_title(f"(a) discrete P(x): entropy H = {fit.entropy_bits:.3f} bits")
    paths.append(save_figure(fig, out_dir / "concept_discrete.png"))

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for x, px in enumerate(p):
        ax.fill_between([x, x + 1], [px, px], step="pre", alpha=0.35, color=f"C{x % 10}")
    ax.stairs(p, np.arange(k + 1), color="k", lw=1.5, label=f"r(v) = p_floor(v): NLL = H = {fit.entropy_bits:.3f} bits")
    v = torch.linspace(0, k, 800, dtype=DTYPE)
    with torch.no_grad():
        smooth = fit.uniform_smooth.log_prob(v).exp().numpy()
    ax.plot(v.numpy(), smooth, "--", color="C3", label=f"smooth fit p(v): {fit.uniform_smooth_bits:.3f} bits")
    _style(ax, k, ymax, "density")
    ax.set_title("(b) uniform dequantization v = x + u, u ~ U[0,1)")
    ax.legend(fontsize=7, loc="upper right")
    paths.append(save_figure(fig, out_dir / "concept_uniform.png"))

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for x, (vx, r) in enumerate(dequantized_density(p, fit.dequantizer)):
        ax.fill_between(vx, r, alpha=0.35, color=f"C{x % 10}", lw=0)
    with torch.no_grad():
        dens = fit.density.log_prob(v).exp().numpy()
    ax.plot(v.numpy(), dens, color="k", lw=1.5, label=f"model p(v): ELBO {fit.variational_bits:.3f} bits")
    ax.plot([], [], " ", label=f"(exact -log2 P(x): {fit.variational_exact_bits:.3f}; H = {fit.entropy_bits:.3f})")
    _style(ax, k, ymax, "density")
    ax.set_title("(c) variational dequantization u ~ q(u|x)")
    ax.legend(fontsize=7, loc="upper right")
    paths.append(save_figure(fig, out_dir / "concept_variational.png"))
    return paths


def _max_density(fit: ToyFit) -> float:
    # Shared y-limit so the three panels compare by eye; the learned q can peak above max p.
    peaks = [r.max() for _, r in dequantized_density(fit.probs, fit.dequantizer)]
    return float(min(max(peaks), 3 * fit.probs.max()))


def _style(ax, k: int, ymax: float, ylabel: str) -> None:
    ax.set_xlim(-0.3, k + 0.3)
    ax.set_ylim(0, ymax)
    ax.set_xticks(range(k + 1))
    ax.set_xlabel("value")
    ax.set_ylabel(ylabel)
