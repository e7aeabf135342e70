"""The toy 1-D dequantization models behind the concept figures."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import assert_png

from flowmnist.cli import main
from flowmnist.config import FlowmnistError
from flowmnist.toy import (
    DTYPE,
    ConditionalDequantizer,
    boundary_jumps,
    elbo_bits,
    entropy_bits,
    fit_toy,
    midpoints,
    normalise_probs,
)


@pytest.fixture(scope="module")
def fit():
    torch.set_num_threads(1)
    return fit_toy(seed=0)


def test_normalise_probs_warns_only_when_it_changes_them():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.allclose(normalise_probs([0.4, 0.1, 0.45, 0.05]), [0.4, 0.1, 0.45, 0.05])
    with pytest.warns(UserWarning, match="sum to 4"):
        assert np.allclose(normalise_probs([1, 1, 2]), [0.25, 0.25, 0.5])
    for bad in ([1], [0.5, -0.1, 0.6], [0, 0], [0.5, float("nan")]):
        with pytest.raises(FlowmnistError):
            normalise_probs(bad)


def test_entropy_bits():
    assert entropy_bits([0.5, 0.5]) == pytest.approx(1.0)
    assert entropy_bits([1.0, 0.0]) == 0.0
    assert entropy_bits([0.4, 0.1, 0.45, 0.05]) == pytest.approx(1.5955, abs=1e-4)


def test_fitted_density_is_a_normalised_smooth_density(fit):
    v = torch.linspace(0, 4, 40_001, dtype=DTYPE)
    with torch.no_grad():
        for model in (fit.density, fit.uniform_smooth):
            p = model.log_prob(v).exp()
            assert float(torch.trapezoid(p, v)) == pytest.approx(1.0, abs=1e-6)
            assert float(model.discrete_log_prob().exp().sum()) == pytest.approx(1.0, abs=1e-9)
            # continuous across the integers: no jump bigger than the slope over 2 eps allows
            k = torch.arange(1, 4, dtype=DTYPE)
            jump = (model.log_prob(k + 1e-4) - model.log_prob(k - 1e-4)).abs()
            assert float(jump.max()) < 1e-2


def test_variational_dequantized_density_is_smooth_across_boundaries(fit):
    uniform = boundary_jumps(fit.probs, None)
    assert np.allclose(uniform, np.abs(np.diff(np.log(fit.probs))))  # log(p_k / p_{k-1}): 1.4 to 2.2 nats
    learned = boundary_jumps(fit.probs, fit.dequantizer)
    assert learned.max() < 0.5
    assert np.all(learned < 0.35 * uniform)


def test_bits_are_ordered_as_the_theory_says(fit):
    # A cross-entropy is never below the entropy, and the ELBO never above the exact likelihood of
    # the same p(v) (a wrong-signed log q would break this): H <= -log2 P(x) <= -ELBO.
    assert fit.entropy_bits <= fit.variational_exact_bits + 1e-9
    assert fit.variational_exact_bits <= fit.variational_bits + 1e-6
    assert fit.entropy_bits <= fit.uniform_smooth_bits
    # The same smooth family, optimiser, steps and seed: learned dequantization beats uniform by a
    # clear margin (the smooth fit cannot follow the jumps; q can make the data follow the fit).
    assert fit.variational_bits < fit.uniform_smooth_bits - 0.03
    assert fit.variational_bits - fit.entropy_bits < 0.02


def test_elbo_with_uniform_q_equals_the_uniform_model():
    fit = fit_toy([0.5, 0.5], seed=0, steps=5)
    flat = ConditionalDequantizer(2)
    with torch.no_grad():  # a very broad single-bump mixture: q is flat to ~1e-3
        flat.log_s.fill_(6.0)
        flat.mu.fill_(0.5)
    assert elbo_bits(fit.probs, fit.uniform_smooth, flat) == pytest.approx(
        elbo_bits(fit.probs, fit.uniform_smooth), abs=1e-4
    )


def test_dequantizer_samples_follow_its_density():
    torch.manual_seed(0)
    deq = ConditionalDequantizer(3)
    with torch.no_grad():
        for p in deq.parameters():
            p.add_(0.5 * torch.randn_like(p))
    u0 = midpoints(2000)
    x = torch.full((2000,), 1)
    with torch.no_grad():
        u, log_q = deq(x, u0)
    assert float(u.min()) >= 0 and float(u.max()) <= 1
    assert torch.all(torch.diff(u) > 0)  # monotone in u0
    # q integrates to 1 over [0, 1], and the samples' CDF is the identity on u0: G(u) = u0
    grid = torch.linspace(0, 1, 20_001, dtype=DTYPE)
    with torch.no_grad():
        q = deq.log_q(torch.full_like(grid, 1, dtype=torch.long), grid).exp()
    assert float(torch.trapezoid(q, grid)) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(log_q, deq.log_q(x, u).detach())
    # reparameterised gradient: matches a central difference of u in a parameter (eps well above the
    # bisection's 2^-32 resolution)
    u1, _ = deq(x[:1], torch.tensor([0.3], dtype=DTYPE))
    (grad,) = torch.autograd.grad(u1.sum(), deq.mu)
    eps = 1e-4
    with torch.no_grad():
        deq.mu[1, 0] += eps
        up, _ = deq(x[:1], torch.tensor([0.3], dtype=DTYPE))
        deq.mu[1, 0] -= 2 * eps
        down, _ = deq(x[:1], torch.tensor([0.3], dtype=DTYPE))
    assert float(grad[1, 0]) == pytest.approx(float((up - down) / (2 * eps)), rel=1e-2)


def test_concepts_command(tmp_path, capsys):
    assert main(["concepts", "--out", str(tmp_path), "--probs", "2", "1", "1"]) == 0
    captured = capsys.readouterr()
    assert "note: probabilities sum to 4" in captured.err
    paths = captured.out.split()
    assert [p.rsplit("/", 1)[-1] for p in paths] == [
        "concept_discrete.png",
        "concept_uniform.png",
        "concept_variational.png",
    ]
    for p in paths:
        assert_png(p)
    assert main(["concepts", "--out", str(tmp_path), "--probs", "1", "-1"]) == 2
