"""Whole models: a proper density, the four variants' sizes, gradients, save/load, encode/decode."""

from __future__ import annotations

import math

import pytest
import torch

from flowmnist.config import Config
from flowmnist.flows import AffineCoupling, Dequantization, checkerboard_mask
from flowmnist.models import MODELS, FlowModel, build_model, count_params
from flowmnist.nets import GatedConvNet
from flowmnist.runs import load_model, save_checkpoint

PARAMS = {"simple": 556_312, "vardeq": 628_388, "multi-simple": 1_639_742, "multi-vardeq": 1_711_818}


def _perturb(model: torch.nn.Module, scale: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its initial value: the zero-initialised output convs would otherwise
    make every coupling the identity (and block the gradients of the layers below them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.mark.parametrize("with_coupling", [False, True], ids=["identity", "coupling"])
def test_one_pixel_density_sums_to_the_prior_mass_it_reaches(with_coupling):
    """For a 1-pixel image, P(x) = integral over the bin of exp(log p(x, u0)) du0. Summed over the 256
    values it must equal the prior mass of the interval that the flow maps [0, 256) onto,
    Phi(z_hi) - Phi(z_lo): the alpha-squeezed logit reaches |z| <= 12.2 only, and a coupling may
    shrink that range. So the likelihood is a proper density over the discrete values (no mass
    counted twice, none invented), which a wrong Jacobian term anywhere would break."""
    torch.manual_seed(0)
    flows = []
    if with_coupling:  # a 1x1 'checkerboard' coupling is a learned affine map z -> (z + t) e^s
        coupling = _perturb(AffineCoupling(GatedConvNet(1, 4, num_layers=1), checkerboard_mask(1, 1), 1), 0.5)
        with torch.no_grad():
            coupling.net.net[-1].bias[0] -= 3.0  # log-scale s < 0: the flow shrinks the latent range
        flows = [coupling]
    model = FlowModel(Dequantization(alpha=1e-5), flows, image_shape=(1, 1, 1)).double()
    # Quadrature in w = logit(u0): nodes crowd exponentially towards the bin edges, where the density
    # can be sharply peaked (next to v = 0 and v = 1 the logit's Jacobian is huge).
    nodes, lim = 6000, 30.0
    w = -lim + (torch.arange(nodes, dtype=torch.float64) + 0.5) * (2 * lim / nodes)
    u0, weight = torch.sigmoid(w), torch.sigmoid(w) * torch.sigmoid(-w) * (2 * lim / nodes)
    x = torch.arange(256, dtype=torch.float64).view(256, 1).expand(256, nodes)
    with torch.no_grad():
        lp = model.log_prob_single(x.reshape(-1, 1, 1, 1), noise=u0.expand(256, nodes).reshape(-1, 1, 1, 1))
        ends = model.encode(
            torch.tensor([0.0, 255.0]).view(2, 1, 1, 1), noise=torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
        )
    p_x = (lp.view(256, nodes).exp() * weight).sum(dim=1)
    normal = torch.distributions.Normal(0.0, 1.0)
    reached = float(normal.cdf(ends.max()) - normal.cdf(ends.min()))
    assert abs(float(p_x.sum()) - reached) < 1e-6
    if with_coupling:
        assert reached < 0.999  # the case is not vacuous: this coupling shrinks the range
    else:
        assert reached > 1 - 1e-12
        # Uniform dequantization + logit with an identity flow is far from uniform over values.
        assert p_x.max() / p_x.min() > 10


def test_identity_flow_analytic_bpd():
    """With no flow layers, bpd is the hand-computed change of variables through uniform
    dequantization and the logit, at known pixels and noise."""
    alpha = 1e-5
    model = FlowModel(Dequantization(alpha), [])
    x = torch.zeros(2, 1, 28, 28, dtype=torch.float64)
    x[1] = 255.0
    noise = torch.full_like(x, 0.5)
    with torch.no_grad():
        lp = model.log_prob_single(x, noise=noise)

    def by_hand(pixel: float) -> float:
        s = alpha / 2 + (1 - alpha) * (pixel + 0.5) / 256
        z = math.log(s / (1 - s))
        log_normal = -0.5 * z * z - 0.5 * math.log(2 * math.pi)
        return 784 * (log_normal + math.log(1 - alpha) - math.log(s) - math.log(1 - s) - math.log(256))

    torch.testing.assert_close(lp, torch.tensor([by_hand(0.0), by_hand(255.0)], dtype=torch.float64))
    bpd = -lp / (784 * math.log(2))
    # All-black and all-white images are equally likely under this symmetric flow.
    torch.testing.assert_close(bpd[0], bpd[1])


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count(name):
    assert count_params(build_model(name)) == PARAMS[name]


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'tiny'"):
        build_model("tiny")


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = _perturb(build_model(name))
    x = torch.randint(0, 256, (2, 1, 28, 28))
    loss = model.bpd(x).mean()
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", MODELS)
def test_save_load_reproduces_log_prob(name, tmp_path):
    torch.manual_seed(0)
    cfg = Config(model=name)  # the fast path, as training builds it
    model = _perturb(build_model(name, fast=cfg.fast))
    save_checkpoint(tmp_path / "best.pt", {"config": cfg.to_dict(), "model": model.state_dict()})
    loaded, loaded_cfg = load_model(tmp_path)
    assert loaded_cfg == cfg
    x = torch.randint(0, 256, (3, 1, 28, 28))
    noise = torch.rand(x.shape)
    with torch.no_grad():
        assert torch.equal(model.log_prob_single(x, noise), loaded.log_prob_single(x, noise))


@pytest.mark.parametrize("name", MODELS)
def test_encode_decode_round_trip_on_real_digits(name, real_digits):
    torch.manual_seed(0)
    model = _perturb(build_model(name)).eval()
    with torch.no_grad():
        z = model.encode(real_digits)
        assert z.shape == (64, 784) and torch.isfinite(z).all()
        assert torch.equal(model.decode(z), real_digits)


@pytest.mark.parametrize("name", ["simple", "multi-vardeq"])
def test_samples_are_valid_images_and_seeded(name):
    model = _perturb(build_model(name)).eval()
    a = model.sample(4, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = model.sample(4, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == (4, 1, 28, 28)
    assert torch.equal(a, b)
    hot = model.sample(4, temperature=50.0, generator=torch.Generator().manual_seed(2))
    assert hot.dtype == torch.uint8  # uint8 cannot leave 0..255; extreme latents must not crash


def test_importance_weighting_tightens_the_bound():
    """log (1/k) sum exp(l_i) >= (1/k) sum l_i for the same draws (Jensen): IW bpd <= mean single bpd."""
    model = _perturb(build_model("vardeq"), 0.05).eval()
    x = torch.randint(0, 256, (4, 1, 28, 28))
    torch.manual_seed(3)
    with torch.no_grad():
        lps = torch.stack([model.log_prob_single(x) for _ in range(4)], -1)
        torch.manual_seed(3)
        iw = model.log_prob(x, k=4)
    torch.testing.assert_close(iw, torch.logsumexp(lps, -1) - math.log(4))
    assert (iw >= lps.mean(-1) - 1e-4).all()
