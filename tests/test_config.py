"""The run config (flowmnist.config.Config): defaults, checks, and configs saved before a field existed."""

from __future__ import annotations

import re

import pytest

from flowmnist.config import BEFORE_FIELD, Config, FlowmnistError, first_difference


def test_fast_is_default_for_training_config():
    assert Config().fast is True
    assert Config.from_dict({k: v for k, v in Config().to_dict().items() if k != "fast"}).fast  # old configs


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"schedule": "linear"}, "schedule must be one of"),
        ({"precision": "float16"}, "precision must be one of"),
        ({"ema": 1.0}, "ema must be in [0, 1)"),
        ({"lr_min": 1.5}, "lr_min must be in [0, 1]"),
        ({"checkpoint_minutes": 0}, "checkpoint_minutes must be > 0"),
        ({"val_minutes": -1}, "val_minutes must be >= 0"),
        ({"val_images": -1}, "val_images must be >= 0"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"hybrid_weight": float("inf"), "conditional": True}, "hybrid_weight must be a finite number"),
        ({"hybrid_weight": 0.5}, "hybrid_weight needs a conditional model"),
    ],
)
def test_check_refuses_what_no_run_can_use(kw, message):
    with pytest.raises(FlowmnistError, match=re.escape(message)):
        Config(**kw).check()


def test_defaults_pass_the_check_and_round_trip():
    Config().check()
    Config(conditional=True, hybrid_weight=0.5).check()
    assert Config.from_dict(Config(lr=0.1, model="vardeq").to_dict()) == Config(lr=0.1, model="vardeq")


def test_a_config_saved_before_a_field_existed_gets_what_that_run_did():
    """A resumed old run must keep its recipe, not switch to today's defaults."""
    old = {k: v for k, v in Config().to_dict().items() if k not in BEFORE_FIELD}
    cfg = Config.from_dict(old)
    for name, value in BEFORE_FIELD.items():
        assert getattr(cfg, name) == value, name
    assert (cfg.schedule, cfg.precision) != (Config().schedule, Config().precision)  # they do differ


def test_unknown_fields_are_refused_by_name():
    with pytest.raises(FlowmnistError, match=r"unknown fields \['speed'\]"):
        Config.from_dict({**Config().to_dict(), "speed": 2})


def test_an_architecture_is_the_fields_that_fix_its_weights():
    """Model, alpha and the prior's layout; a class prior's latent and fixedness only where there is one;
    the recipe (lr, spread, seed) never. The first field that differs is the one a refusal names."""
    assert Config().architecture() == {
        "model": "multi-vardeq",
        "alpha": 1e-5,
        "image_shape": (1, 28, 28),
        "conditional": False,
    }
    cond = Config(conditional=True, class_latent="top", class_spread=0.5, class_fixed=True, lr=0.1)
    assert cond.architecture() == {
        **Config().architecture(),
        "conditional": True,
        "num_classes": 10,  # unset: MNIST's digits
        "class_latent": "top",
        "class_fixed": True,
    }
    assert Config(conditional=True, num_classes=3).architecture()["num_classes"] == 3
    assert Config(conditional=True, class_spread=2.0).architecture() == Config(conditional=True).architecture()
    have, want = Config(conditional=True).architecture(), cond.architecture()
    assert first_difference(have, want) == "class_latent" and first_difference(want, want) is None
    assert first_difference(Config().resume_identity(), Config(seed=1).resume_identity()) == "seed"


def test_image_shape_round_trips_as_a_tuple_and_old_configs_are_mnist_sized():
    """JSON gives back a list; the config keeps a tuple, so comparing architectures works. A config saved
    before the field existed (every shipped model's) ran on 28x28 MNIST-sized images."""
    import json

    cfg = Config(image_shape=(1, 32, 32))
    back = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.image_shape == (1, 32, 32) and isinstance(back.image_shape, tuple) and back == cfg
    old = {k: v for k, v in Config().to_dict().items() if k != "image_shape"}
    assert Config.from_dict(old).image_shape == (1, 28, 28)
    assert first_difference(Config().architecture(), back.architecture()) == "image_shape"


@pytest.mark.parametrize("shape", [(1, 30, 32), (3, 32, 32), (1, 28), (1, 0, 28)])
def test_an_image_shape_no_architecture_fits_is_refused_in_one_line(shape):
    with pytest.raises(FlowmnistError, match=r"^image_shape [0-9x]+: expected 1 x H x W \(grayscale\), height and"):
        Config(image_shape=shape).check()
