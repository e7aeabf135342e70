"""The priors' protocol: every entry of PRIORS built from a PriorSpec scores, samples and reports its
classes alike; a run's config gives its prior in one place."""

from __future__ import annotations

import math

import pytest
import torch

from flowmnist.config import Config, PriorSpec
from flowmnist.flows import std_normal_log_prob
from flowmnist.models import build_model
from flowmnist.priors import PRIORS, ClassPrior, StandardNormalPrior, build_prior

SHAPES = [(4, 2, 2), (2, 4, 4)]  # a final latent of 16 dimensions and a split's half of 32
DIMS = 48


@pytest.mark.parametrize("kind", PRIORS)
def test_every_prior_keeps_the_protocol(kind):
    prior = build_prior(PriorSpec(kind, num_classes=3, spread=0.5), SHAPES)
    assert prior.dims == DIMS
    z = torch.randn(5, DIMS)
    assert prior.log_prob(z).shape == (5,) and torch.isfinite(prior.log_prob(z)).all()
    s = prior.sample(7, 0.5, torch.Generator().manual_seed(0), like=z)
    assert s.shape == (7, DIMS) and s.dtype == z.dtype
    if prior.num_classes:
        y = torch.tensor([0, 1, 2, 1, 0])
        lp_all = prior.log_prob_all(z)
        assert lp_all.shape == (5, prior.num_classes)
        torch.testing.assert_close(prior.log_prob(z, y), lp_all.gather(1, y[:, None]).squeeze(1))
        torch.testing.assert_close(prior.log_prob(z), torch.logsumexp(lp_all + prior.log_py, 1))
        assert prior.sample(4, 1.0, torch.Generator().manual_seed(0), y=2, like=z).shape == (4, DIMS)
    else:
        with pytest.raises(ValueError, match="labels given to an unconditional model"):
            prior.log_prob(z, torch.zeros(5, dtype=torch.long))
        with pytest.raises(ValueError, match="class-conditional"):
            prior.log_prob_all(z)


def test_the_spec_places_the_class_means():
    top = build_prior(PriorSpec("class", latent="top"), SHAPES)
    assert isinstance(top, ClassPrior) and top.class_dims == 16 and top.num_classes == 10
    assert build_prior(PriorSpec("class"), SHAPES).class_dims == DIMS
    normal = build_prior(PriorSpec(), SHAPES)
    assert isinstance(normal, StandardNormalPrior)
    z = torch.randn(3, DIMS)
    torch.testing.assert_close(normal.log_prob(z), std_normal_log_prob(z))
    assert abs(float(normal.log_prob(torch.zeros(1, DIMS))) + 0.5 * DIMS * math.log(2 * math.pi)) < 1e-4


def test_unknown_prior_and_latent_are_refused_in_one_line():
    with pytest.raises(ValueError, match="unknown prior 'mixture'; choose one of normal, class"):
        build_prior(PriorSpec("mixture"), SHAPES)
    with pytest.raises(ValueError, match="class_latent must be one of all, top"):
        build_prior(PriorSpec("class", latent="middle"), SHAPES)


def test_a_runs_config_names_its_prior():
    assert Config().prior_spec() == PriorSpec()
    cfg = Config(conditional=True, class_latent="top", class_spread=2.0, class_fixed=True)
    assert cfg.prior_spec() == PriorSpec("class", latent="top", spread=2.0, fixed=True)
    model = build_model("multi-simple", prior=cfg.prior_spec())
    assert model.conditional and model.prior.class_dims == 392 and "mean" in dict(model.prior.named_buffers())
