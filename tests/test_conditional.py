"""Class-conditional flows: the class prior, the marginal, the flow as a Bayes classifier, sampling a digit,
training/resume, evaluate's accuracy and conditional bpd, the confusion matrix, labels' validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import synthetic_digits, write_mnist_dir
from helpers import PARAMS, assert_png, png_size, write_png

from flowmnist.cli import main
from flowmnist.config import Config, FlowmnistError, PriorSpec
from flowmnist.data import FILES, DataError, check_classes, load_dir, write_idx
from flowmnist.evaluate import (
    class_scores,
    classification_table,
    confusion_matrix,
    image_bpd,
    image_class_log_probs,
    results_table,
)
from flowmnist.figures import confusion_fractions, digit_samples, interpolate, plot_confusion
from flowmnist.flows import (
    AffineCoupling,
    Dequantization,
    Split,
    Squeeze,
    channel_mask,
    checkerboard_mask,
    std_normal_log_prob,
)
from flowmnist.models import FlowModel, build_model, count_params, latent_shapes
from flowmnist.nets import GatedConvNet
from flowmnist.priors import ClassPrior, build_prior
from flowmnist.runs import load_checkpoint, load_model, read_metrics
from flowmnist.train import train

CLASS = PriorSpec("class")  # the class prior with its defaults: means at 0 on the whole latent, trained
PRIOR_PARAMS = 2 * 10 * 784  # a mean and a log-scale per digit and latent dimension


def _perturb(model: torch.nn.Module, scale: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its initial value (zero-initialised output convs make couplings identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def _tiny_multiscale(num_classes: int = 10, class_latent: str = "all") -> FlowModel:
    """A 4x4-image model with a coupling, a squeeze, a split and channel couplings, in float64: its
    likelihoods are small enough (D = 16) to exponentiate, class by class."""
    torch.manual_seed(0)
    flows = [
        AffineCoupling(GatedConvNet(1, 4, num_layers=1), checkerboard_mask(4, 4), 1),
        Squeeze(),
        AffineCoupling(GatedConvNet(4, 4, num_layers=1), channel_mask(4), 4),
        Split(),
        AffineCoupling(GatedConvNet(2, 4, num_layers=1), channel_mask(2, invert=True), 2),
    ]
    spec = PriorSpec("class", num_classes, latent=class_latent)
    model = FlowModel(Dequantization(), flows, build_prior(spec, latent_shapes(flows, (1, 4, 4))), (1, 4, 4))
    return _perturb(model.double(), 0.3)


# ----------------------------------------------------------------------------------------------
# The model: unconditional models unchanged, the class prior, the marginal
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PARAMS))
def test_unconditional_models_keep_their_parameters_conditional_add_the_prior(name):
    u, c = build_model(name), build_model(name, prior=CLASS)
    assert count_params(u) == PARAMS[name] and not u.conditional
    assert count_params(c) == PARAMS[name] + PRIOR_PARAMS and c.conditional
    extra = [k for k in c.state_dict() if k not in u.state_dict()]
    assert extra == ["prior.mean", "prior.log_scale", "prior.log_py"]
    assert [k for k in c.state_dict() if k not in extra] == list(u.state_dict())


def test_unconditional_log_prob_is_the_layer_by_layer_sum():
    """The one path (ldj + the prior's log-density of the flat latent) equals the change of variables
    summed layer by layer, each split scoring its half under N(0, I) as ``Split.forward`` does (float64,
    so only the order of the additions differs); encoding returns that latent."""
    torch.manual_seed(0)
    model = _perturb(build_model("multi-vardeq")).double()
    x = torch.randint(0, 256, (3, 1, 28, 28)).double()
    u0 = torch.rand(x.shape, dtype=torch.float64)
    with torch.no_grad():
        z, want = model.dequant(x, u0)
        outs = []
        for flow in model.flows:
            if isinstance(flow, Split):
                outs.append(flow.split(z)[1])
            z, ldj = flow(z)
            want = want + ldj
        want = want + std_normal_log_prob(z)
        latent = torch.cat([z.flatten(1)] + [o.flatten(1) for o in outs[::-1]], dim=1)
        torch.testing.assert_close(model.log_prob_single(x, u0), want, rtol=1e-13, atol=0)
        assert torch.equal(model.encode(x, u0), latent)
        with pytest.raises(ValueError, match="unconditional"):
            model.log_prob_single(x, u0, y=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("name", ["vardeq", "multi-vardeq"])
def test_equal_class_priors_at_zero_give_the_unconditional_log_prob_for_every_digit(name):
    """With every class mean 0 and log-scale 0 (the initialisation) p(z | y) is N(0, I) for every y, so the
    conditional model with the same flows gives the unconditional log p(x) for every y, and so does its
    marginal (whatever p(y)); sampling a digit draws the same images as the unconditional model."""
    torch.manual_seed(0)
    u = _perturb(build_model(name))
    c = build_model(name, prior=CLASS)
    c.load_state_dict({**c.state_dict(), **u.state_dict()})
    c.prior.set_class_frequencies(torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9, 9]))
    x = torch.randint(0, 256, (4, 1, 28, 28)).float()
    u0 = torch.rand(x.shape)
    with torch.no_grad():
        want = u.log_prob_single(x, u0)
        per_class = c.class_log_probs(x, u0)
        assert per_class.shape == (4, 10)
        torch.testing.assert_close(per_class, want[:, None].expand(4, 10), rtol=1e-6, atol=0)
        torch.testing.assert_close(c.log_prob_single(x, u0), want, rtol=1e-6, atol=0)
        for y in (0, 7):
            torch.testing.assert_close(c.log_prob_single(x, u0, y=torch.full((4,), y)), want, rtol=1e-6, atol=0)
    a = u.sample(3, 0.7, torch.Generator().manual_seed(5))
    b = c.sample(3, 0.7, torch.Generator().manual_seed(5), y=7)
    assert torch.equal(a, b)


def test_marginal_is_the_class_by_class_sum_in_float64():
    """exp(log p(x)) = sum_y p(x | y) p(y), the sum taken class by class in float64, with random class
    means and scales and unequal p(y); log p(x | y) is the class prior's log-density plus the flows' ldj."""
    model = _tiny_multiscale()
    with torch.no_grad():
        model.prior.mean.normal_(0, 0.7)
        model.prior.log_scale.uniform_(-0.5, 0.5)
    model.prior.set_class_frequencies(torch.tensor([0] * 5 + [1] * 3 + [2, 3, 4, 5, 6, 7, 8, 9] + [9] * 4))
    p_y = model.prior.log_py.exp()
    assert not torch.allclose(p_y, torch.full_like(p_y, 0.1))
    x = torch.randint(0, 256, (6, 1, 4, 4)).double()
    u0 = torch.rand(x.shape, dtype=torch.float64)
    with torch.no_grad():
        log_px = model.log_prob_single(x, u0)
        total = torch.zeros(6, dtype=torch.float64)
        for y in range(10):
            log_pxy = model.log_prob_single(x, u0, y=torch.full((6,), y))
            total += log_pxy.exp() * p_y[y]
            # log p(x | y) from its parts: class prior of the flat latent + ldj without prior terms
            z, ldj = model.latent_and_ldj(x, u0)
            sigma = model.prior.log_scale[y].exp()
            by_hand = torch.distributions.Normal(model.prior.mean[y], sigma).log_prob(z).sum(1) + ldj
            torch.testing.assert_close(log_pxy, by_hand, rtol=1e-12, atol=1e-10)
    assert float(log_px.min()) > -700  # the test is not vacuous: exp stays far from underflow
    torch.testing.assert_close(total, log_px.exp(), rtol=1e-12, atol=0)


def test_top_class_prior_by_hand_and_the_posterior_reads_the_final_latent_only():
    """class_latent="top": class means and scales on the final latent (the first K dims of the flat latent),
    N(0, 1) on the splits' halves; log p(x | y) by hand, the marginal as the class sum, and p(y | x) a softmax
    over the final latent alone (the ldj and the other dimensions cancel in Bayes' rule)."""
    model = _tiny_multiscale(class_latent="top")
    k = math.prod(model.latent_shapes[0])
    assert model.prior.class_dims == k == 8 < model.dims and model.prior.mean.shape == (10, k)
    with torch.no_grad():
        model.prior.mean.normal_(0, 0.7)
        model.prior.log_scale.uniform_(-0.5, 0.5)
    x = torch.randint(0, 256, (6, 1, 4, 4)).double()
    u0 = torch.rand(x.shape, dtype=torch.float64)
    with torch.no_grad():
        z, ldj = model.latent_and_ldj(x, u0)
        total = torch.zeros(6, dtype=torch.float64)
        heads = []
        for y in range(10):
            head = torch.distributions.Normal(model.prior.mean[y], model.prior.log_scale[y].exp()).log_prob(z[:, :k])
            rest = torch.distributions.Normal(0.0, 1.0).log_prob(z[:, k:])
            by_hand = head.sum(1) + rest.sum(1) + ldj
            log_pxy = model.log_prob_single(x, u0, y=torch.full((6,), y))
            torch.testing.assert_close(log_pxy, by_hand, rtol=1e-12, atol=1e-10)
            total += by_hand.exp() * model.prior.log_py[y].exp()
            heads.append(head.sum(1))
        torch.testing.assert_close(model.log_prob_single(x, u0).exp(), total, rtol=1e-12, atol=0)
        post = class_scores(model.class_log_probs(x, u0)[:, None], model.prior.log_py, torch.zeros(6), 16).log_posterior
        torch.testing.assert_close(post, torch.log_softmax(torch.stack(heads, 1) + model.prior.log_py, 1))
    samples = model.prior.sample(500, 1.0, torch.Generator().manual_seed(0), y=3, like=z)
    assert samples.shape == (500, 16)
    assert (samples[:, :k].mean(0) - model.prior.mean[3]).abs().max() < 0.25  # the class mean on the head only
    assert samples[:, k:].mean(0).abs().max() < 0.25 and abs(float(samples[:, k:].detach().std()) - 1) < 0.1


def test_class_spread_draws_the_means_after_the_flows():
    """class_spread S: means from N(0, S^2), drawn after the flows, so the flows start as the unconditional
    twin's for the same seed; S = 0 keeps every mean at 0."""
    torch.manual_seed(5)
    plain = build_model("multi-vardeq")
    torch.manual_seed(5)
    spread = build_model("multi-vardeq", prior=PriorSpec("class", latent="top", spread=0.5))
    assert spread.prior.mean.shape == (10, 392) and abs(float(spread.prior.mean.std()) - 0.5) < 0.02
    flows = {k: v for k, v in spread.state_dict().items() if not k.startswith("prior.")}
    assert flows.keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in flows.items())
    assert not build_model("simple", prior=CLASS).prior.mean.any()
    fixed = build_model("multi-vardeq", prior=PriorSpec("class", latent="top", spread=0.5, fixed=True))
    assert count_params(fixed) == count_params(plain) and "prior.mean" in fixed.state_dict()  # buffers
    assert not fixed.prior.log_scale.any()


def test_class_term_gradient_reaches_the_flows_and_the_means():
    """The classification part of the hybrid objective, lambda log p(y | x), alone: its gradient reaches
    the coupling nets (so training moves the latent to separate the digits) and the class means."""
    model = _tiny_multiscale(class_latent="top")
    with torch.no_grad():
        model.prior.mean.normal_(0, 0.5)
    x, y = torch.randint(0, 256, (8, 1, 4, 4)).double(), torch.arange(8) % 10
    torch.manual_seed(1)
    plain = model.hybrid_bpd(x, y, 0.0).sum()
    torch.manual_seed(1)
    hybrid = model.hybrid_bpd(x, y, 10.0).sum()
    (hybrid - plain).backward()  # the same noise: what is left is -10 log p(y | x) / (D log 2)
    net = model.flows[0].net
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in net.parameters())
    assert model.prior.mean.grad.abs().max() > 0


def test_evaluate_scores_share_noise_and_agree_with_image_bpd():
    """The conditional scores of evaluate: same k noise draws for every class (one pass per draw), the
    importance-weighted marginal equal to image_bpd's (which calls the model's marginal log_prob), and
    the conditional bpd of the true label equal to the importance-weighted log p(x | y)."""
    model = _tiny_multiscale()
    with torch.no_grad():
        model.prior.mean.normal_(0, 0.5)
    x = torch.randint(0, 256, (5, 1, 4, 4)).to(torch.uint8)
    labels = torch.tensor([0, 3, 3, 9, 1])
    lp = image_class_log_probs(model, x, k=3, seed=4)
    assert lp.shape == (5, 3, 10) and lp.dtype == torch.float64
    s = class_scores(lp, model.prior.log_py, labels, model.dims)
    iw, single = image_bpd(model, x, k=3, seed=4)
    torch.testing.assert_close(s.bpd, iw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.bpd_single, single, rtol=1e-12, atol=1e-12)
    cond = -(torch.logsumexp(lp[torch.arange(5), :, labels], dim=1) - math.log(3)) / (16 * math.log(2))
    torch.testing.assert_close(s.bpd_conditional, cond)
    # The draws are shared: replaying draw 0 as explicit noise gives every class's value of draw 0.
    with torch.random.fork_rng():
        torch.manual_seed(4)
        u0 = torch.rand(x.shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.class_log_probs(x, u0), lp[:, 0])


def test_decision_follows_the_nearer_mean():
    """Two classes whose priors differ only in the mean (same scales, same p(y)): Bayes' rule picks the
    class whose mean is nearer the image's latent."""
    model = _tiny_multiscale(num_classes=2)
    with torch.no_grad():
        model.prior.mean[0].fill_(-0.8)
        model.prior.mean[1].normal_(0.8, 0.3)
        model.prior.log_scale.fill_(0.4)
    x = torch.randint(0, 256, (64, 1, 4, 4)).to(torch.uint8)
    u0 = torch.rand(x.shape, dtype=torch.float64)
    with torch.no_grad():
        z, _ = model.latent_and_ldj(x, u0)
        nearer = (z[:, None, :] - model.prior.mean[None]).norm(dim=2).argmin(dim=1)
        lp = model.class_log_probs(x, u0)
    predicted = class_scores(lp[:, None], model.prior.log_py, torch.zeros(64), model.dims).predicted
    assert set(nearer.tolist()) == {0, 1}  # both decisions occur
    assert torch.equal(predicted, nearer)


def test_hybrid_objective_adds_the_weighted_class_posterior():
    model = _tiny_multiscale()
    with torch.no_grad():
        model.prior.mean.normal_(0, 0.5)
    x, y = torch.randint(0, 256, (4, 1, 4, 4)).double(), torch.tensor([1, 2, 2, 8])
    torch.manual_seed(3)
    plain = model.hybrid_bpd(x, y, 0.0)
    torch.manual_seed(3)
    assert torch.equal(plain, model.bpd(x, y=y))
    torch.manual_seed(3)
    hybrid = model.hybrid_bpd(x, y, 50.0)
    torch.manual_seed(3)
    lp = model.class_log_probs(x)
    log_pxy = lp[torch.arange(4), y]
    log_post = log_pxy + model.prior.log_py[y] - torch.logsumexp(lp + model.prior.log_py, dim=1)
    torch.testing.assert_close(hybrid, -(log_pxy + 50.0 * log_post) / (16 * math.log(2)))


def test_sampled_digits_are_uint8_and_classified_as_asked():
    """A tiny conditional flow trained for a few seconds on ten stroke patterns: samples of digit d are
    uint8 images that its own classifier mostly labels d (chance is 10 %; a conditioning that ignored
    the label, or mixed up the classes, fails)."""
    torch.manual_seed(0)
    images, labels = synthetic_digits(400, 0)
    x, y = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()
    flows = [AffineCoupling(GatedConvNet(1, 8, num_layers=1), checkerboard_mask(28, 28, i == 1), 1) for i in (0, 1)]
    model = FlowModel(Dequantization(), flows, ClassPrior(10, 784))
    model.prior.set_class_frequencies(y)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(100):
        idx = torch.randint(0, len(x), (32,))
        loss = model.bpd(x[idx], y=y[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    one = model.sample(5, 1.0, torch.Generator().manual_seed(0), y=7)
    assert one.dtype == torch.uint8 and one.shape == (5, 1, 28, 28)
    samples = digit_samples(model, 10, seed=0)
    asked = torch.arange(10).repeat_interleave(10)
    assert samples.dtype == torch.uint8 and samples.shape == (100, 1, 28, 28)
    predicted = class_scores(image_class_log_probs(model, samples), model.prior.log_py, asked, model.dims).predicted
    assert float((predicted == asked).double().mean()) >= 0.6


# ----------------------------------------------------------------------------------------------
# The confusion matrix and the tables
# ----------------------------------------------------------------------------------------------


def test_confusion_matrix_and_row_fractions_by_hand(tmp_path):
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 0, 1, 1, 2, 2])
    m = confusion_matrix(labels, predicted, classes=4)
    assert m.tolist() == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    f = confusion_fractions(m.tolist())
    np.testing.assert_allclose(f[:3].sum(axis=1), 1.0)
    np.testing.assert_allclose(f[0], [2 / 3, 1 / 3, 0, 0])
    assert (f[3] == 0).all()  # a digit without images: a zero row, no NaN
    path = plot_confusion(m.tolist(), tmp_path / "c.png", "test")
    assert_png(path, min_w=250, min_h=250)


def test_tables_mark_conditional_runs_and_list_accuracy():
    base = {"params": 1, "inference_ms_per_64": 1.0, "sampling_ms_per_64": 2.0}
    plain = {"model": "simple", "bpd": {"val": 1.5}, **base}
    cond = {
        "model": "simple",
        "conditional": True,
        "bpd": {"val": 1.4},
        "accuracy": {"val": 0.9731, "test": 0.5},
        "bpd_conditional": {"val": 1.3971},
        **base,
    }
    table = results_table([plain, cond])
    assert "| simple | – | 1.500 |" in table and "| simple (conditional) | – | 1.400 |" in table
    assert classification_table([plain]) == ""
    rows = classification_table([plain, cond]).splitlines()
    assert len(rows) == 3 and rows[0].startswith("| Model | Train accuracy | Val accuracy | Test accuracy |")
    assert rows[2] == "| simple (conditional) | – | 97.31% | 50.00% | – | 1.397 | – |"


# ----------------------------------------------------------------------------------------------
# Config, data
# ----------------------------------------------------------------------------------------------


def test_classify_idx_and_png_rows_and_unconditional_refused(cond_run, cond_data, tmp_path, capsys):
    """`classify`: per image the predicted digit, its posterior, all ten posteriors (summing to 1) and the
    marginal bpd; a split's JSON has the accuracy; PNGs are labelled by file; an unconditional run and a bad
    --out are refused in one line."""
    argv = ["classify", str(cond_run), "--data-dir", str(cond_data), "--split", "test", "--importance-samples", "2"]
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    images, labels = load_dir(cond_data).split("test")
    assert len(doc["rows"]) == 8 and [r["label"] for r in doc["rows"]] == labels.tolist()
    for r in doc["rows"]:
        post = [r[f"p{c}"] for c in range(10)]
        assert abs(sum(post) - 1) < 1e-4 and r["posterior"] == max(post) and r["predicted"] == post.index(max(post))
    assert doc["accuracy"] == sum(r["predicted"] == r["label"] for r in doc["rows"]) / 8
    model, _ = load_model(cond_run)
    iw = image_bpd(model, images, k=2)[0]
    assert [r["bpd"] for r in doc["rows"]] == pytest.approx(iw.tolist(), abs=1e-5)
    out = tmp_path / "c.csv"
    assert main([*argv, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_text().splitlines()[0].startswith("index,label,predicted,posterior,bpd,p0,")
    pngs = [write_png(tmp_path / f"{i}.png", images[i, 0].numpy()) for i in range(2)]
    assert main(["classify", str(cond_run), "--png", *map(str, pngs), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["label"] for r in rows] == list(map(str, pngs))
    assert [r["predicted"] for r in rows] == [r["predicted"] for r in doc["rows"][:2]]
    plain = tmp_path / "plain"
    train(_cfg(cond_data, conditional=False), plain)
    capsys.readouterr()
    assert main(["classify", str(plain), "--data-dir", str(cond_data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unconditional" in err and str(plain) in err
    assert main([*argv, "--out", str(tmp_path / "c.txt")]) == 2
    assert "must end in .csv or .json" in capsys.readouterr().err


def test_classify_own_samples_labels_each_with_the_digit_asked_for(cond_run, capsys):
    """`classify --own-samples N`: N samples of each digit, drawn as `model.sample(y=d)` draws them (seed,
    temperature), labelled d, and the accuracy of the model on them; --split makes no sense there."""
    argv = ["classify", str(cond_run), "--own-samples", "3", "--temperature", "0.7", "--seed", "5", "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in doc["rows"]] == [d for d in range(10) for _ in range(3)]
    assert doc["accuracy"] == sum(r["predicted"] == r["label"] for r in doc["rows"]) / 30
    assert (doc["own_samples"], doc["temperature"], doc["seed"]) == (3, 0.7, 5)
    model, _ = load_model(cond_run)
    with torch.no_grad():
        digits = torch.arange(10).repeat_interleave(3)
        images = model.sample(30, 0.7, torch.Generator().manual_seed(5), y=digits)
    s = class_scores(image_class_log_probs(model, images), model.prior.log_py, digits, model.dims)
    assert [r["predicted"] for r in doc["rows"]] == s.predicted.tolist()
    assert main([*argv, "--split", "val"]) == 2
    assert "--split applies to --data-dir and --png, not to --own-samples" in capsys.readouterr().err


def test_config_fields_old_configs_and_checks():
    old = {k: v for k, v in Config().to_dict().items() if k not in ("conditional", "hybrid_weight")}
    cfg = Config.from_dict(old)
    assert cfg.conditional is False and cfg.hybrid_weight == 0.0
    with pytest.raises(FlowmnistError, match="hybrid_weight needs a conditional model"):
        Config(hybrid_weight=1.0).check()
    with pytest.raises(FlowmnistError, match="hybrid_weight must be"):
        Config(conditional=True, hybrid_weight=-1.0).check()
    Config(conditional=True, hybrid_weight=10.0).check()
    assert Config.from_dict(old).class_latent == "all"  # older conditional runs: means on the whole latent
    with pytest.raises(FlowmnistError, match="class_latent, class_spread and class_fixed need a conditional model"):
        Config(class_latent="top").check()
    with pytest.raises(FlowmnistError, match="class_latent must be one of"):
        Config(conditional=True, class_latent="middle").check()
    with pytest.raises(FlowmnistError, match="class_spread must be"):
        Config(conditional=True, class_spread=-1.0).check()


def test_bad_labels_are_one_line_errors_naming_the_file(tmp_path, capsys):
    root = write_mnist_dir(tmp_path / "data", 30)
    labels = np.arange(30, dtype=np.uint8) % 10
    labels[17] = 12
    write_idx(root / (FILES["train-labels"][0] + ".gz"), labels)
    assert load_dir(root).classes == tuple(map(str, range(13)))  # labels of another set: read, 13 classes
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: label 12 is outside 0-9"):
        check_classes(load_dir(root), 10)
    args = ["train", "--model", "simple", "--conditional", "--data-dir", str(root), "--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train-labels-idx1-ubyte.gz: no training images of class 10 (of 13)" in err
    assert not (tmp_path / "r").exists()  # refused before the run directory is made
    write_idx(root / (FILES["train-labels"][0] + ".gz"), labels[:29] % 10)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "30 images but train-labels-idx1-ubyte.gz has 29 labels" in err


# ----------------------------------------------------------------------------------------------
# Training, checkpoints, evaluate, sample: a tiny conditional run through the command line
# ----------------------------------------------------------------------------------------------


def _cfg(data, **kw) -> Config:
    base = dict(
        model="simple",
        data_dir=str(data),
        epochs=1,
        batch_size=8,
        log_every=1,
        compile=False,
        precision="float32",
        conditional=True,
    )
    return Config(**{**base, **kw})


@pytest.fixture(scope="module")
def cond_data(tmp_path_factory):
    """48 training images (40 train / 8 val) and 8 t10k test images."""
    return write_mnist_dir(tmp_path_factory.mktemp("cdata") / "data", 48, 8)


@pytest.fixture(scope="module")
def cond_run(cond_data, tmp_path_factory):
    """`flowmnist train --model simple --conditional`, one epoch of 5 steps."""
    run = tmp_path_factory.mktemp("cruns") / "cond"
    args = ["train", "--model", "simple", "--conditional", "--data-dir", str(cond_data), "--out", str(run)]
    args += ["--epochs", "1", "--batch-size", "8", "--no-compile", "--precision", "float32", "--log-every", "1"]
    assert main(args) == 0
    return run


def test_conditional_checkpoint_holds_the_prior_and_p_y(cond_run, cond_data):
    cfg = json.loads((cond_run / "config.json").read_text())
    assert cfg["conditional"] is True and cfg["hybrid_weight"] == 0.0
    ckpt = load_checkpoint(cond_run / "last.pt")
    assert ckpt["model"]["prior.mean"].shape == (10, 784)
    assert float(ckpt["model"]["prior.mean"].abs().max()) > 0  # the prior trained
    train_labels = load_dir(cond_data).labels["train"]
    freq = torch.bincount(train_labels, minlength=10).double() / len(train_labels)
    torch.testing.assert_close(ckpt["model"]["prior.log_py"].double().exp(), freq)
    model, loaded = load_model(cond_run)
    assert loaded.conditional and model.conditional and count_params(model) == PARAMS["simple"] + PRIOR_PARAMS
    rows = read_metrics(cond_run)
    assert {r["split"] for r in rows} == {"train", "val"} and all(math.isfinite(r["bpd"]) for r in rows)


def test_conditional_run_resumes_exactly_with_the_hybrid_objective(cond_data, tmp_path):
    """Two epochs straight == one epoch then --resume, for a conditional run trained on the hybrid
    objective: the same weights (prior included) and log. A resume that drops --conditional is refused."""
    kw = dict(schedule="step", hybrid_weight=50.0)
    train(_cfg(cond_data, epochs=2, **kw), tmp_path / "straight")
    train(_cfg(cond_data, epochs=1, **kw), tmp_path / "split")
    train(_cfg(cond_data, epochs=2, **kw), tmp_path / "split", resume=True)
    a, b = load_checkpoint(tmp_path / "straight/last.pt"), load_checkpoint(tmp_path / "split/last.pt")
    assert a["state"]["step"] == b["state"]["step"] == 10
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    times = ("seconds", "cpu_seconds")
    strip = [{k: v for k, v in r.items() if k not in times} for r in read_metrics(tmp_path / "straight")]
    assert strip == [{k: v for k, v in r.items() if k not in times} for r in read_metrics(tmp_path / "split")]
    with pytest.raises(FlowmnistError, match="cannot resume with conditional=False"):
        train(_cfg(cond_data, epochs=3, conditional=False), tmp_path / "split", resume=True)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_a_conditional_run_resumed_with_another_prior_layout_is_refused_in_one_line(cond_run, capsys):
    """Class means on the whole latent, resumed with them on the final latent only (a prior of another
    shape) or fixed (buffers, not trained): one line naming the field; the run is left as it was."""
    before = (cond_run / "last.pt").read_bytes()
    args = ["train", "--out", str(cond_run), "--resume", "--no-compile"]
    assert main([*args, "--class-latent", "top"]) == 2
    assert "cannot resume with class_latent='top'; the run has 'all'" in _one_line(capsys)
    assert main([*args, "--class-spread", "1", "--class-fixed"]) == 2
    assert "cannot resume with class_fixed=True; the run has False" in _one_line(capsys)
    assert (cond_run / "last.pt").read_bytes() == before


def test_init_from_an_unconditional_model_loads_its_flows_and_draws_a_fresh_prior(cond_data, tmp_path):
    """A conditional run started from the shipped unconditional multi-vardeq: every flow weight is the
    shipped one, and the prior is the one its config draws (fixed, separated means on the final latent)."""
    from flowmnist.runs import load_pretrained, model_of

    kw = dict(class_latent="top", class_spread=1.0, class_fixed=True)
    cfg = _cfg(cond_data, model="multi-vardeq", init_from="multi-vardeq", minutes=1e-9, val_images=8, **kw)
    train(cfg, tmp_path / "run")
    got = load_checkpoint(tmp_path / "run" / "last.pt")["model"]
    shipped = load_pretrained("multi-vardeq").state_dict()
    assert set(got) - set(shipped) == {"prior.mean", "prior.log_scale", "prior.log_py"}
    for k, v in shipped.items():
        assert torch.equal(got[k], v), k
    torch.manual_seed(cfg.seed)
    fresh = model_of(cfg).prior
    assert got["prior.mean"].shape == (10, 392) and float(got["prior.mean"].std()) > 0.5
    assert torch.equal(got["prior.mean"], fresh.mean) and torch.equal(got["prior.log_scale"], fresh.log_scale)


def test_init_from_refuses_another_prior_layout_in_one_line(cond_data, tmp_path, capsys):
    """The shipped multi-vardeq-cond (fixed means on the final latent) cannot start a run whose means sit
    on the whole latent, nor an unconditional run: one line naming the field, no run directory."""
    args = ["train", "--model", "multi-vardeq", "--init-from", "multi-vardeq-cond", "--data-dir", str(cond_data)]
    args += ["--out", str(tmp_path / "run"), "--no-compile"]
    assert main([*args, "--conditional"]) == 2
    err = _one_line(capsys)
    assert "--init-from multi-vardeq-cond: its model is 'multi-vardeq (conditional)'" in err
    assert "class_latent='top', this run's has class_latent='all'; the architectures must match" in err
    assert main(args) == 2
    assert "conditional=True, this run's has conditional=False" in _one_line(capsys)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_evaluate_reports_marginal_conditional_bpd_accuracy_and_confusion(cond_run, capsys):
    args = ["evaluate", str(cond_run), "--importance-samples", "2", "--timing-reps", "1", "--json"]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    splits = {"train", "val", "test"}
    assert r["conditional"] is True and r["params"] == PARAMS["simple"] + PRIOR_PARAMS
    assert set(r["bpd"]) == set(r["bpd_conditional"]) == set(r["accuracy"]) == set(r["confusion"]) == splits
    log_py = load_model(cond_run)[0].prior.log_py.double()
    for s in splits:
        assert 0 <= r["accuracy"][s] <= 1
        m = np.array(r["confusion"][s])
        assert m.shape == (10, 10) and m.sum() == r["images"][s]
        assert abs(np.trace(m) / m.sum() - r["accuracy"][s]) < 1e-5
        # log p(x) = log p(x | y) + log p(y) - log p(y | x) >= log p(x | y) + log p(y), image by image
        slack = float(-log_py[torch.isfinite(log_py)].min()) / (784 * math.log(2))
        assert r["bpd"][s] <= r["bpd_conditional"][s] + slack + 1e-6
        assert r["bpd"][s] <= r["bpd_single_sample"][s] + 1e-6
        assert_png(cond_run / f"confusion_{s}.png", min_w=250, min_h=250)
    assert json.loads((cond_run / "results.json").read_text())["accuracy"] == r["accuracy"]
    assert main(["table", str(cond_run)]) == 0
    assert "| simple (conditional) |" in capsys.readouterr().out
    assert main(["evaluate", str(cond_run), "--split", "val", "--importance-samples", "1", "--timing-reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "Val accuracy" in out and f"confusion matrix: {cond_run / 'confusion_val.png'}" in out


def test_sample_a_digit_and_all_digits(cond_run, tmp_path, capsys):
    one, grid = tmp_path / "seven.png", tmp_path / "all.png"
    assert main(["sample", str(cond_run), "--digit", "7", "--n", "4", "--out", str(one)]) == 0
    assert main(["sample", str(cond_run), "--digit", "all", "--n", "6", "--out", str(grid)]) == 0
    assert_png(one, min_w=50, min_h=50)
    assert_png(grid, min_w=100, min_h=100)
    w, h = png_size(grid)
    assert h > w  # 10 rows of 6
    assert main(["sample", str(cond_run), "--out", str(tmp_path / "any.png")]) == 0  # y ~ p(y)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["sample", str(cond_run), "--digit", "10"])
    assert "--digit: must be a digit 0-9 or all" in capsys.readouterr().err


def test_unconditional_run_refuses_digit_and_hybrid_weight(cond_data, tmp_path, capsys):
    run = tmp_path / "plain"
    train(_cfg(cond_data, conditional=False), run)
    assert main(["sample", str(run), "--digit", "3", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--digit" in err and "unconditional" in err
    assert not (tmp_path / "s.png").exists()
    args = ["train", "--model", "simple", "--hybrid-weight", "5", "--data-dir", str(cond_data)]
    assert main([*args, "--out", str(tmp_path / "h")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs a conditional model" in err


def test_interpolation_between_digits_of_different_classes_is_exact_at_the_ends(cond_run, cond_data):
    model, cfg = load_model(cond_run)
    images, labels = load_dir(cond_data, cfg.split_seed, cfg.val_fraction).split("val")
    i = 0
    j = next(j for j in range(1, len(labels)) if labels[j] != labels[i])
    row = interpolate(model, images[i], images[j], steps=5)
    assert row.dtype == torch.uint8 and torch.equal(row[0], images[i]) and torch.equal(row[-1], images[j])


def test_report_shows_digits_and_confusion_for_conditional_runs(cond_run, tmp_path, capsys):
    from flowmnist.report import build_report

    assert main(["evaluate", str(cond_run), "--split", "val", "--importance-samples", "1", "--timing-reps", "1"]) == 0
    capsys.readouterr()
    index = build_report([cond_run], tmp_path / "report", pairs=1, steps=3, samples=4, dequant_images=4)
    page = index.read_text()
    assert "Digits on demand" in page and "Val accuracy" in page
    for name in ("digits_simple_conditional.png", "confusion_simple_conditional_val.png"):
        assert f'src="{name}"' in page
        assert_png(tmp_path / "report" / name, min_w=100, min_h=100)
    assert "--digit all" in page
