"""Whole models: a proper density, every architecture's size, gradients, save/load, encode/decode."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from helpers import PARAMS, perturb

from flowmnist.config import Config, FlowmnistError
from flowmnist.evaluate import dataset_bpd, image_bpd
from flowmnist.flows import (
    AffineCoupling,
    Dequantization,
    Split,
    Squeeze,
    channel_mask,
    checkerboard_mask,
    std_normal_log_prob,
)
from flowmnist.models import ARCHITECTURES, MODELS, FlowModel, build_model, count_params
from flowmnist.nets import GatedConvNet
from flowmnist.runs import load_model, save_checkpoint


def _one_pixel_model(with_coupling: bool) -> FlowModel:
    """A model of 1-pixel images, float64: uniform dequantization, the logit, and optionally one
    coupling (on a 1x1 'checkerboard' it is a learned affine map z -> (z + t) e^s) that shrinks the
    latent range."""
    torch.manual_seed(0)
    flows = []
    if with_coupling:
        coupling = perturb(AffineCoupling(GatedConvNet(1, 4, num_layers=1), checkerboard_mask(1, 1), 1), 0.5)
        with torch.no_grad():
            coupling.net.net[-1].bias[0] -= 3.0  # log-scale s < 0: the flow shrinks the latent range
        flows = [coupling]
    return FlowModel(Dequantization(alpha=1e-5), flows, image_shape=(1, 1, 1)).double()


def _quadrature_p(model: FlowModel, values: list[int] | None = None) -> torch.Tensor:
    """P(x) = integral over the bin of exp(log p(x, u0)) du0 for each pixel value, by quadrature in
    w = logit(u0): nodes crowd exponentially towards the bin edges, where the density can be sharply
    peaked (next to v = 0 and v = 1 the logit's Jacobian is huge)."""
    values = list(range(256)) if values is None else values
    nodes, lim = 6000, 30.0
    w = -lim + (torch.arange(nodes, dtype=torch.float64) + 0.5) * (2 * lim / nodes)
    u0, weight = torch.sigmoid(w), torch.sigmoid(w) * torch.sigmoid(-w) * (2 * lim / nodes)
    x = torch.tensor(values, dtype=torch.float64).view(-1, 1).expand(-1, nodes)
    with torch.no_grad():
        lp = model.log_prob_single(x.reshape(-1, 1, 1, 1), noise=u0.expand(len(values), nodes).reshape(-1, 1, 1, 1))
    return (lp.view(len(values), nodes).exp() * weight).sum(dim=1)


@pytest.mark.parametrize("with_coupling", [False, True], ids=["identity", "coupling"])
def test_one_pixel_density_sums_to_the_prior_mass_it_reaches(with_coupling):
    """For a 1-pixel image, P(x) = integral over the bin of exp(log p(x, u0)) du0. Summed over the 256
    values it must equal the prior mass of the interval that the flow maps [0, 256) onto,
    Phi(z_hi) - Phi(z_lo): the alpha-squeezed logit reaches |z| <= 12.2 only, and a coupling may
    shrink that range. So the likelihood is a proper density over the discrete values (no mass
    counted twice, none invented), which a wrong Jacobian term anywhere would break."""
    model = _one_pixel_model(with_coupling)
    p_x = _quadrature_p(model)
    with torch.no_grad():
        ends = model.encode(
            torch.tensor([0.0, 255.0]).view(2, 1, 1, 1), noise=torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)
        )
    normal = torch.distributions.Normal(0.0, 1.0)
    reached = float(normal.cdf(ends.max()) - normal.cdf(ends.min()))
    assert abs(float(p_x.sum()) - reached) < 1e-6
    if with_coupling:
        assert reached < 0.999  # the case is not vacuous: this coupling shrinks the range
    else:
        assert reached > 1 - 1e-12
        # Uniform dequantization + logit with an identity flow is far from uniform over values.
        assert p_x.max() / p_x.min() > 10


def test_importance_weighted_log_p_rises_to_the_quadrature_value():
    """evaluate's importance-weighted bound, E[log (1/k) sum_i p(x, u_i)], rises with k towards the true
    log P(x) (Burda et al. 2016, thm 1) and never above it. On the 1-pixel model log P(x) is known by
    quadrature: at the bin's ends (values 0 and 255) the single-sample bound is loose by about 0.6 nats.
    A mean in place of the logsumexp would not rise; without the - log k it would overshoot log P by
    log k. Means over 400 seeded repetitions per value (standard error <= 0.05 nats at k = 1)."""
    model = _one_pixel_model(with_coupling=True)
    values, reps = [0, 255], 400
    log_p = _quadrature_p(model, values).log()
    x = torch.tensor(values, dtype=torch.uint8).repeat(reps).view(-1, 1, 1, 1)
    gaps = []
    for k in (1, 8, 64, 512):
        iw, _ = image_bpd(model, x, k, batch_size=len(x), seed=k)
        log_p_iw = (-iw * math.log(2)).view(reps, len(values))  # one dimension: bpd = -log2 P
        se = log_p_iw.std(dim=0) / math.sqrt(reps)
        gap = log_p - log_p_iw.mean(dim=0)
        assert (gap > -3 * se - 1e-3).all(), (k, gap, se)  # never above log P (beyond the noise)
        gaps.append(gap)
    assert (gaps[0] > 0.4).all(), gaps[0]  # k = 1 is loose here: the case is not vacuous
    assert (gaps[0] > gaps[1] + 0.2).all() and (gaps[1] > gaps[2] + 0.1).all(), gaps
    assert (gaps[3].abs() < 0.03).all(), gaps[3]  # k = 512: the bound has closed on log P


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


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_parameter_count(name):
    assert count_params(build_model(name)) == PARAMS[name]


@pytest.mark.parametrize("name", MODELS)
def test_builder_keeps_the_shipped_state_dict_names(name):
    """The builder gives the original report's four exactly the tensors (names, shapes, order) of their
    shipped weights, so those load unchanged."""
    from flowmnist.runs import WEIGHTS, load_checkpoint, verify_pretrained

    shipped = load_checkpoint(verify_pretrained(name) / WEIGHTS)["model"]
    built = build_model(name).state_dict()
    assert list(built) == list(shipped)
    assert all(built[k].shape == shipped[k].shape for k in built)


@pytest.mark.parametrize("name", [n for n in ARCHITECTURES if n not in MODELS])
def test_new_architectures_change_of_variables_in_float64(name):
    """A whole new model, perturbed off its identity start, in float64: log p(x) is the sum of the layer
    terms and the prior's, decode(encode(x)) returns the pixels, and samples are valid images."""
    torch.manual_seed(0)
    model = perturb(build_model(name), 0.01).double().eval()
    x = torch.randint(0, 256, (2, 1, 28, 28)).double()
    u0 = torch.rand(x.shape, dtype=torch.float64)
    with torch.no_grad():
        model.initialize(x)
        z, want = model.dequant(x, u0)
        for flow in model.flows:
            z, ldj = flow(z)
            want = want + ldj
        want = want + std_normal_log_prob(z)
        torch.testing.assert_close(model.log_prob_single(x, u0), want, rtol=1e-12, atol=0)
        assert torch.isfinite(want).all()
        assert torch.equal(model.decode(model.encode(x)), x.to(torch.uint8))
        s = model.sample(2, generator=torch.Generator().manual_seed(1))
    assert s.shape == (2, 1, 28, 28) and s.dtype == torch.uint8


@pytest.mark.parametrize("name", ["multi-vardeq", "flowpp"])
def test_a_model_of_another_size_has_the_same_stages_and_a_prior_of_its_size(name):
    """At 32x36 the flows' weights are the same tensors as at 28x28 except where the size is built in
    (checkerboard masks, self-attention's position embeddings, a class prior); the latent has 32 x 36 dimensions,
    the change of variables holds, and samples come out at that size."""
    from flowmnist.config import PriorSpec

    small, big = build_model(name), build_model(name, image_shape=(1, 32, 36), prior=PriorSpec("class"))
    assert big.image_shape == (1, 32, 36) and big.dims == 32 * 36 and big.prior.dims == 32 * 36
    before = small.state_dict()
    sized = {k for k, v in big.state_dict().items() if k not in before or v.shape != before[k].shape}
    assert all(k.startswith("prior.") or k.endswith((".pos", ".mask")) for k in sized)
    assert {"prior.mean", "flows.0.mask"} <= sized
    model = perturb(big, 0.01).double().eval()
    x = torch.randint(0, 256, (2, 1, 32, 36)).double()
    with torch.no_grad():
        model.initialize(x)
        assert torch.equal(model.decode(model.encode(x)), x.to(torch.uint8))
        assert torch.isfinite(model.log_prob_single(x)).all()
        s = model.sample(2, generator=torch.Generator().manual_seed(1), y=torch.tensor([0, 1]))
    assert s.shape == (2, 1, 32, 36) and s.dtype == torch.uint8


@pytest.mark.parametrize("shape", [(1, 30, 32), (1, 28, 26), (3, 28, 28)])
def test_a_size_the_squeezes_do_not_fit_is_refused_in_one_line_naming_it(shape):
    with pytest.raises(FlowmnistError, match=r"^image shape " + "x".join(map(str, shape)) + ": expected 1 x H x W"):
        build_model("simple", image_shape=shape)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model 'tiny'"):
        build_model("tiny")


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = perturb(build_model(name))
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
    model = perturb(build_model(name, fast=cfg.fast))
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
    model = perturb(build_model(name)).eval()
    with torch.no_grad():
        z = model.encode(real_digits)
        assert z.shape == (64, 784) and torch.isfinite(z).all()
        assert torch.equal(model.decode(z), real_digits)


@pytest.mark.parametrize("name", ["simple", "multi-vardeq"])
def test_samples_are_valid_images_and_seeded(name):
    model = perturb(build_model(name)).eval()
    a = model.sample(4, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = model.sample(4, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == (4, 1, 28, 28)
    assert torch.equal(a, b)
    assert not torch.equal(a, model.sample(4, generator=torch.Generator().manual_seed(2)))
    # Extreme latents saturate every pixel at 0 or 255, by the sign of its logit: about half each. A value
    # past either end must clamp, not wrap round in the uint8 cast (256 -> 0, -1 -> 255).
    hot = model.sample(4, temperature=50.0, generator=torch.Generator().manual_seed(2))
    assert (hot == 255).float().mean() > 0.35 and (hot == 0).float().mean() > 0.35


def test_decode_clamps_past_the_ends():
    """Without flows, decode is the quantiser floor(256 v), v = the alpha-squeezed logit's inverse, which
    reaches slightly past [0, 1]: floor gives -1 and 256 there, which must come out as 0 and 255."""
    model = FlowModel(Dequantization(alpha=1e-5), [])
    z = torch.tensor([-50.0, 50.0, -math.inf, math.inf]).view(4, 1).expand(4, 784)
    assert model.decode(z).view(4, 784).amax(1).tolist() == [0, 255, 0, 255]
    assert model.decode(z).view(4, 784).amin(1).tolist() == [0, 255, 0, 255]
    # Sampling at a high temperature: each pixel saturates by the sign of its own latent.
    hot = model.sample(4, temperature=50.0, generator=torch.Generator().manual_seed(5)).view(4, 784)
    latent = torch.randn(4, 784, generator=torch.Generator().manual_seed(5)) * 50
    far = latent.abs() > 13  # past the logit's reach, +-12.2
    assert far.float().mean() > 0.7
    assert torch.equal(hot[far], torch.where(latent[far] > 0, 255, 0).to(torch.uint8))


# --- small multi-scale models, float64: the whole model's change of variables --------------------

SMALL = (1, 4, 4)  # 1x4x4 images: the whole Jacobian is 16 x 16


def _small_model(name: str, fast: bool = False) -> FlowModel:
    """One of the original report's four structures, scaled down to 1x4x4 images, float64, weights perturbed:
    ``simple``: 3 checkerboard couplings; ``multi-*``: 2 checkerboard couplings, squeeze, 2 channel
    couplings (4x2x2), split, squeeze, 2 channel couplings (8x1x1); ``*vardeq``: 2 conditioned
    checkerboard couplings on the noise. The nets are wide enough (9 c_out <= 2 hidden) for the fast
    path's GEMM output convolution to run in inference."""
    torch.manual_seed(0)
    h, w = SMALL[1:]

    def checker(n: int, c_in: int, hidden: int, cond: int = 0, c_out: int | None = None):
        return [
            AffineCoupling(
                GatedConvNet(c_in + cond, hidden, c_out, num_layers=1, fast=fast),
                checkerboard_mask(h, w, invert=i % 2 == 1),
                c_in,
            )
            for i in range(n)
        ]

    def channel(n: int, c_in: int, hidden: int):
        return [
            AffineCoupling(GatedConvNet(c_in, hidden, num_layers=1, fast=fast), channel_mask(c_in, i % 2 == 1), c_in)
            for i in range(n)
        ]

    noise = checker(2, 1, 16, cond=1, c_out=2) if name.endswith("vardeq") else None
    if name.startswith("multi"):
        flows = checker(2, 1, 16) + [Squeeze()] + channel(2, 4, 36) + [Split(), Squeeze()] + channel(2, 8, 72)
    else:
        flows = checker(3, 1, 16)
    return perturb(FlowModel(Dequantization(1e-3, noise), flows, image_shape=SMALL), 0.1).double()


def _small_inputs(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *SMALL), generator=g).to(torch.uint8)
    x[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)  # the bin ends, where the logit is steepest
    return x, torch.rand(x.shape, generator=g, dtype=torch.float64) * 0.98 + 0.01


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("name", MODELS)
def test_whole_model_change_of_variables(name, fast):
    """log p(x, u0) = log N(encode(x, u0)) + log|det d encode / d u0|, for the whole model: with the
    image fixed, u0 -> the flat latent (final latent and every split's half) is a bijection of R^16,
    and the model's log-likelihood is the change of variables through it. So every layer's ldj, the
    split's prior term, the dequantization's -D log 256 and -log q, and the final prior combine
    exactly once (a term counted twice, or dropped, is off by nats). The latent's order is checked by
    decoding it back to the image."""
    model = _small_model(name, fast)
    x, u0 = _small_inputs()
    with torch.no_grad():
        lp = model.log_prob_single(x, u0)
        latent = model.encode(x, u0)
        assert latent.shape == (len(x), 16)
        assert torch.equal(model.decode(latent), x)
    for i in range(len(x)):
        xi = x[i : i + 1]
        jac = torch.autograd.functional.jacobian(
            lambda u, xi=xi: model.encode(xi, u.view(1, *SMALL))[0], u0[i].flatten()
        )
        sign, logdet = torch.linalg.slogdet(jac)
        assert sign != 0
        expected = std_normal_log_prob(latent[i : i + 1])[0] + logdet
        torch.testing.assert_close(lp[i], expected, rtol=1e-11, atol=1e-9)
    # Not vacuous: every part moves the latent (couplings, the split's half, the learned noise).
    with torch.no_grad():
        kept = [f for f in model.flows if not isinstance(f, AffineCoupling)]
        plain = FlowModel(Dequantization(1e-3), kept, image_shape=SMALL)
        assert (latent - plain.double().encode(x, u0)).abs().max() > 0.1
        if name.endswith("vardeq"):
            u, _ = model.dequant.noise(x.double(), u0)
            assert (u - u0).abs().max() > 0.05


def test_importance_weighted_bpd_is_the_model_bound():
    """image_bpd with k draws is -log (1/k) sum_i p(x, u_i) / (D ln 2), the i-th draw of the seeded stream:
    equal to the model's own k-sample bound under the same seed, to a log-mean-exp summed here in
    plain Python, and sandwiched by the draws: best - log k <= IW <= best, mean <= IW (in log p).
    dataset_bpd is the mean of image_bpd."""
    model = _small_model("multi-vardeq")
    x, _ = _small_inputs(5, seed=1)
    k, seed, scale = 8, 3, -1 / (16 * math.log(2))
    iw, single = image_bpd(model, x, k, seed=seed)
    with torch.no_grad():
        torch.manual_seed(seed)
        draws = torch.stack([model.log_prob_single(x) for _ in range(k)], dim=-1)  # what image_bpd draws
        torch.manual_seed(seed)
        bound = model.log_prob(x, k)
    torch.testing.assert_close(iw, bound * scale, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(single, draws.mean(-1) * scale, rtol=1e-12, atol=1e-12)
    for i, row in enumerate(draws.tolist()):
        best = max(row)
        log_mean_exp = best + math.log(math.fsum(math.exp(v - best) for v in row) / k)
        assert iw[i].item() == pytest.approx(log_mean_exp * scale, rel=1e-12)
        assert best * scale <= iw[i].item() <= (best - math.log(k)) * scale  # bpd: the order flips
        assert iw[i].item() <= single[i].item()
    assert (draws.max(-1).values - draws.min(-1).values).min() > 0.1  # the draws differ: not vacuous
    mean_iw, mean_single = dataset_bpd(model, x, k, seed=seed)
    assert mean_iw == pytest.approx(iw.mean().item(), rel=1e-15) and mean_single == pytest.approx(single.mean().item())
    assert dataset_bpd(model, x, k, seed=seed) == (mean_iw, mean_single)  # seeded: reproducible
    assert dataset_bpd(model, x, k, seed=seed + 1) != (mean_iw, mean_single)


def test_the_readme_states_the_pinned_parameter_counts():
    """Counts written in the README (architecture and results tables) are PARAMS', not copies that drift."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    seen = set()
    for line in readme.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in PARAMS:
            counts = [int(c.replace(",", "")) for c in cells[1:] if re.fullmatch(r"\d{1,3}(,\d{3}){1,2}", c)]
            assert all(n == PARAMS[cells[0]] for n in counts if n >= 100_000), line
            if counts:
                seen.add(cells[0])
    assert {"simple", "vardeq", "multi-simple", "multi-vardeq"} <= seen
