"""The fast path computes the reference's function, with interchangeable weights; the bench runs."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import PARAMS, perturb

from flowmnist.bench import bench_table, peak_memory, run_bench
from flowmnist.cli import main
from flowmnist.models import MODELS, build_model, count_params
from flowmnist.runtime import cpu_kind


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
    assert f"CPU: {cpu_kind()}" in table and b["conditions"]["cpu_bf16"] is cpu_kind().bf16
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


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_native_bf16_and_a_choice_stays(native, monkeypatch):
    import flowmnist.train as T

    monkeypatch.setattr(T, "native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert T.resolve_precision("auto", cpu) == ("bfloat16", "float32")[not native]
    assert T.resolve_precision("float32", cpu) == "float32" and T.resolve_precision("bfloat16", cpu) == "bfloat16"


def test_native_bf16_agrees_with_the_cpu_flags():
    """AVX512-BF16 or AMX means native bf16 kernels; a CPU without AVX-512 has none."""
    from flowmnist.runtime import cpu_kind, native_bf16

    kind = cpu_kind()
    if kind.bf16:
        assert native_bf16("cpu") is True
    if kind.features and "avx512f" not in kind.features:
        assert native_bf16("cpu") is False
    assert native_bf16("meta") is False


EPYC = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512bw\n"
AVX2 = "processor\t: 0\nmodel name\t: Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_cpu_kind_reads_model_and_features():
    from flowmnist.runtime import cpu_kind

    epyc, avx2 = cpu_kind(EPYC), cpu_kind(AVX2)
    assert (epyc.model, epyc.features, epyc.bf16) == ("AMD EPYC 9R14", ("avx2", "avx512f", "avx512_bf16"), True)
    assert (avx2.model, avx2.features, avx2.bf16) == ("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz", ("avx2",), False)
    assert str(epyc) == "AMD EPYC 9R14 (avx2, avx512f, avx512_bf16; with AVX512-BF16/AMX)"
    assert str(avx2).endswith("(avx2; without AVX512-BF16/AMX)")
    assert cpu_kind("").features == ()


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
