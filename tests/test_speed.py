"""The fast path computes the reference's function, with interchangeable weights; the bench runs."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import PARAMS, perturb

from flowmnist.bench import bench_table, peak_memory, run_bench
from flowmnist.cli import main
from flowmnist.models import MODELS, build_model, count_params
from flowmnist.nets import ConcatELU, FastConcatELU, FastLayerNormChannels, LayerNormChannels


def _pair(name: str, seed: int = 0):
    """(reference, fast) with the same weights, moved off the zero init so every layer matters."""
    torch.manual_seed(seed)
    ref = perturb(build_model(name), 0.05, seed)
    fast = build_model(name, fast=True)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_interchangeable(name):
    torch.manual_seed(3)
    ref = build_model(name)
    torch.manual_seed(3)
    fast = build_model(name, fast=True)
    assert count_params(fast) == count_params(ref) == PARAMS[name]
    rs, fs = ref.state_dict(), fast.state_dict()
    assert list(rs) == list(fs)
    assert all(rs[k].shape == fs[k].shape for k in rs)
    # Same seed, same initialisation: the fast path builds its parameters in the same order.
    assert all(torch.equal(rs[k], fs[k]) for k in rs)
    ref.load_state_dict(fast.state_dict())  # strict, both ways
    fast.load_state_dict(ref.state_dict())


@pytest.mark.parametrize("name", MODELS)
def test_fast_log_prob_and_gradients_match_reference(name):
    ref, fast = _pair(name)
    x = _images(4)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    lp_ref, lp_fast = ref.log_prob_single(x, u), fast.log_prob_single(x, u)
    assert torch.isfinite(lp_ref).all()
    torch.testing.assert_close(lp_fast, lp_ref, rtol=1e-4, atol=0)
    lp_ref.mean().backward()
    lp_fast.mean().backward()
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    g_fast = torch.cat([p.grad.flatten() for p in fast.parameters()])
    assert g_ref.norm() > 0
    # Float32 through ~100 layers in a different order: equal up to rounding, measured on the whole vector.
    assert (g_fast - g_ref).norm() / g_ref.norm() < 1e-3
    for (n, pr), pf in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-2, atol=1e-3 * g_ref.abs().max().item(), msg=n)


@pytest.mark.parametrize("name", MODELS)
def test_fast_path_is_the_same_function_in_float64(name):
    """The test above allows float32 rounding (1e-4 of ~-4,500 nats is 0.45 nats an image). In float64
    the fast path must be the reference's function up to rounding: log-likelihoods within 1e-10
    relative, every gradient within 1e-8 relative or 1e-10 of the largest, in training and in inference
    mode (where the output convolution runs as a GEMM and shifted sum). Measured: about 1e-15 for both,
    so a real difference of function (an epsilon, a dropped term) cannot hide in the tolerance."""
    ref, fast = _pair(name)
    ref, fast = ref.double(), fast.double()
    x = _images(2)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lp_ref, lp_fast = ref.log_prob_single(x, u), fast.log_prob_single(x, u)
    assert lp_ref.dtype == torch.float64 and (lp_ref < -1000).all()
    torch.testing.assert_close(lp_fast, lp_ref, rtol=1e-10, atol=0)
    lp_ref.mean().backward()
    lp_fast.mean().backward()
    g_max = max(p.grad.abs().max().item() for p in ref.parameters())
    for (n, pr), pf in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-8, atol=1e-10 * g_max, msg=n)
    with torch.inference_mode():
        torch.testing.assert_close(fast.log_prob_single(x, u), lp_ref.detach(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", ["vardeq", "multi-simple"])
def test_fast_encode_decode_match_reference(name):
    ref, fast = _pair(name)
    x = _images(3, seed=2)
    with torch.no_grad():
        z_ref, z_fast = ref.encode(x), fast.encode(x)
        torch.testing.assert_close(z_fast, z_ref, rtol=1e-4, atol=1e-4)
        # The fast inverse inverts as well as the reference's does (with these perturbed, badly conditioned
        # weights, float32 rounding moves a few pixels by one grey level in both).
        for m, z in ((ref, z_ref), (fast, z_fast)):
            assert (m.decode(z).float() - x).abs().max() <= 1
        g = torch.Generator().manual_seed(0)
        latent = torch.randn(3, fast.dims, generator=g)
        # Sampling runs every coupling's inverse (net in inference mode, channels-last).
        d_ref = ref.decode(latent).float()
        d_fast = fast.decode(latent).float()
        assert (d_ref - d_fast).abs().max() <= 1  # at most one grey level where a value sits on a bin edge


def test_concat_elu_gradcheck_both_layouts():
    x = torch.randn(2, 3, 4, 5, dtype=torch.double)
    for layout in (torch.contiguous_format, torch.channels_last):
        xi = x.contiguous(memory_format=layout).requires_grad_()
        torch.testing.assert_close(FastConcatELU()(xi), ConcatELU()(xi))
        assert torch.autograd.gradcheck(FastConcatELU(), (xi,))


def test_fast_layer_norm_matches_reference():
    ref = LayerNormChannels(6)
    with torch.no_grad():
        ref.gamma.normal_()
        ref.beta.normal_()
    fast = FastLayerNormChannels(6)
    fast.load_state_dict(ref.state_dict())
    x = (3 + 2 * torch.randn(2, 6, 5, 5, dtype=torch.double)).requires_grad_()
    ref.double(), fast.double()
    for xi in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(fast(xi), ref(xi))
        g = torch.randn(2, 6, 5, 5, dtype=torch.double)
        gr = torch.autograd.grad(ref(xi), [xi, ref.gamma, ref.beta], g)
        gf = torch.autograd.grad(fast(xi), [xi, fast.gamma, fast.beta], g)
        for a, b in zip(gf, gr, strict=True):
            torch.testing.assert_close(a, b)


def test_fast_is_default_for_training_config():
    from flowmnist.config import Config

    assert Config().fast is True
    assert Config.from_dict({k: v for k, v in Config().to_dict().items() if k != "fast"}).fast  # old configs


def test_bench_runs_and_tables():
    b = run_bench(["simple"], steps=1, batch_size=2, memory=False, reps=1, eval_batch=4)
    r = b["results"]["simple"]
    for path in ("plain", "eager", "compiled", "default"):
        assert r[path]["train_img_per_s"] > 0 and r[path]["eval_ms_per_64"] > 0 and r[path]["sample_ms_per_64"] > 0
    assert set(r["speedup"]) == {"eager", "compiled", "default"}
    assert set(r["speedup"]["default"]) == {"train", "eval", "sample"}
    assert r["compiled"]["train_precision"] == "float32"
    table = bench_table(b)
    assert "| simple | plain |" in table and "| simple | compiled |" in table and "1 (baseline)" in table
    json.dumps(b)  # --json must be serialisable


def test_peak_memory_is_per_subprocess():
    # The parent holds 1.2 GB more; a child's figure must not inherit it (Linux carries ru_maxrss across
    # fork+exec). A child (torch + a tiny training step) needs a few hundred MB.
    hog = torch.ones(300_000_000)
    mb = peak_memory("simple", "default", batch_size=2)
    assert 50 < mb < 900
    del hog


def test_cli_bench_rejects_unknown_model(capsys):
    assert main(["bench", "--models", "simple,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_elu_helper_matches_formula():
    # The backward of FastConcatELU reads ELU'(u) from ELU(u): 1 for u > 0, ELU(u) + 1 otherwise.
    u = torch.linspace(-3, 3, 13, dtype=torch.double)
    y = F.elu(u)
    d = torch.ops.aten.elu_backward(torch.ones_like(u), 1.0, 1, 1.0, True, y)
    torch.testing.assert_close(d, torch.where(u > 0, torch.ones_like(u), y + 1))


def test_gated_conv_fast_matches_reference_and_gradchecks():
    from flowmnist.nets import GatedConv, _GateFn

    torch.manual_seed(0)
    ref = GatedConv(4, 4).double()
    fast = GatedConv(4, 4, fast=True).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 3, 3, dtype=torch.double, requires_grad=True)
    g = torch.randn(2, 4, 3, 3, dtype=torch.double)
    torch.testing.assert_close(fast(x), ref(x))
    for a, b in zip(
        torch.autograd.grad(fast(x), [x, *fast.parameters()], g),
        torch.autograd.grad(ref(x), [x, *ref.parameters()], g),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
    h = torch.randn(2, 8, 3, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(_GateFn.apply, (x, h))


def test_one_exp_concat_elu_is_concat_elu():
    from flowmnist.nets import concat_elu_one_exp

    x = torch.randn(2, 3, 4, 5, dtype=torch.double, requires_grad=True)
    torch.testing.assert_close(concat_elu_one_exp(x), ConcatELU()(x))
    assert torch.autograd.gradcheck(concat_elu_one_exp, (x,))
    x0 = torch.zeros(1, 2, 1, 1, dtype=torch.double)  # ELU(0) = 0 from either branch
    assert torch.equal(concat_elu_one_exp(x0), torch.zeros(1, 4, 1, 1, dtype=torch.double))


def test_compiled_nets_compute_the_reference_function():
    """torch.compile'd fast nets (plain ops fused by inductor) match the eager reference: log-likelihood
    within 1e-4 relative, gradients up to float32 rounding, in training and in inference mode; the
    parameter names do not change, so checkpoints load either way."""
    from flowmnist.nets import compile_nets

    ref, fast = _pair("simple")
    names = list(fast.state_dict())
    assert compile_nets(fast) == 8
    assert list(fast.state_dict()) == names
    x = _images(4)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    lp_ref, lp_fast = ref.log_prob_single(x, u), fast.log_prob_single(x, u)
    torch.testing.assert_close(lp_fast, lp_ref, rtol=1e-4, atol=0)
    lp_ref.mean().backward()
    lp_fast.mean().backward()
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    g_fast = torch.cat([p.grad.flatten() for p in fast.parameters()])
    assert g_ref.norm() > 0 and (g_fast - g_ref).norm() / g_ref.norm() < 1e-3
    with torch.inference_mode():
        torch.testing.assert_close(fast.log_prob_single(x, u), lp_ref.detach(), rtol=1e-4, atol=0)


def test_native_bf16_is_a_bool_and_auto_resolves():
    from flowmnist.runtime import native_bf16
    from flowmnist.train import resolve_precision

    cpu = torch.device("cpu")
    assert isinstance(native_bf16(cpu), bool)
    assert resolve_precision("auto", cpu) == ("bfloat16" if native_bf16(cpu) else "float32")
    assert resolve_precision("float32", cpu) == "float32"
    assert native_bf16("meta") is False


def test_conv_by_taps_is_the_convolution():
    """The GEMM-and-shifted-sum form of the output convolution computes F.conv2d (padding 1), borders
    included; OutConv takes it only without gradients and where it pays (9 c_out <= c_in)."""
    from flowmnist.nets import OutConv, conv3x3_by_taps

    g = torch.Generator().manual_seed(0)
    for n, c, h, w, o in ((2, 6, 5, 7, 2), (1, 3, 1, 4, 1), (3, 16, 4, 4, 8)):
        x = torch.randn(n, c, h, w, generator=g, dtype=torch.double)
        wt = torch.randn(o, c, 3, 3, generator=g, dtype=torch.double)
        b = torch.randn(o, generator=g, dtype=torch.double)
        torch.testing.assert_close(conv3x3_by_taps(x, wt, b), F.conv2d(x, wt, b, padding=1))
    calls = []
    conv = OutConv(18, 2, kernel_size=3, padding=1)
    conv.by_taps = lambda *a: calls.append(1) or conv3x3_by_taps(*a)
    x = torch.randn(2, 18, 5, 5)
    y = conv(x)  # with gradients: the convolution
    assert calls == [] and y.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(conv(x), y.detach(), rtol=1e-5, atol=1e-5)
    assert calls == [1]
    wide = OutConv(16, 2, kernel_size=3, padding=1)  # 9 * 2 > 16: the convolution even without gradients
    wide.by_taps = conv.by_taps
    with torch.no_grad():
        wide(torch.randn(1, 16, 3, 3))
    assert calls == [1]


def test_allocator_tuned_for_inference_commands_not_train(monkeypatch, tmp_path):
    import platform

    import flowmnist.runtime as runtime

    monkeypatch.setenv("FLOWMNIST_MALLOC", "system")
    assert runtime.tune_allocator() is False
    monkeypatch.delenv("FLOWMNIST_MALLOC")
    assert runtime.tune_allocator() is (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
    calls = []
    monkeypatch.setattr(runtime, "tune_allocator", lambda: calls.append(1) or True)
    assert main(["bench", "--models", "nope"]) == 2  # tuned, then refused
    assert calls == [1]
    assert main(["train", "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "run")]) != 0
    assert calls == [1]  # train keeps glibc's own policy
