"""Process set-up: what the machine offers and how the process should use it (bfloat16 support, TF32
on GPUs, glibc's malloc policy). The math modules know none of this; commands and the training loop
call it."""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the flags that decide the nets' CPU speed
BF16_FEATURES = ("avx512_bf16", "amx_bf16")  # either gives oneDNN native bfloat16 convolutions


@dataclass(frozen=True)
class CpuKind:
    """A CPU's model name and which of ``CPU_FEATURES`` it has."""

    model: str
    features: tuple[str, ...]

    @property
    def bf16(self) -> bool:
        """AVX512-BF16 or AMX: bfloat16 training steps run natively (else emulated, slower)."""
        return any(f in self.features for f in BF16_FEATURES)

    def __str__(self) -> str:
        bf16 = "with AVX512-BF16/AMX" if self.bf16 else "without AVX512-BF16/AMX"
        return f"{self.model} ({', '.join(self.features) or 'no AVX2'}; {bf16})"


def cpu_kind(cpuinfo: str | None = None) -> CpuKind:
    """This machine's CPU kind, from ``cpuinfo`` (the text of /proc/cpuinfo; read when None). Off
    Linux the model is ``platform.processor()`` and the features unknown (none listed)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)  # the last CPU's lines
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    model = fields.get("model name") or platform.processor() or "unknown CPU"
    return CpuKind(model, tuple(f for f in CPU_FEATURES if f in flags))


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 convolutions natively (faster than float32): CUDA GPUs with
    bf16 support (Ampere and later), CPUs whose oneDNN has bf16 kernels (AVX512-BF16 or AMX).
    Elsewhere bfloat16 is emulated and slower, so ``precision="auto"`` keeps float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN
            return False
    return False


def set_tf32(enabled: bool) -> None:
    """TF32 tensor-core math for float32 convolutions and matmuls (Ampere and newer): about 10 mantissa
    bits instead of 23, several times faster. Off means true float32 for both (PyTorch's own default
    allows TF32 for convolutions only). No effect without a GPU."""
    mode = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:  # pragma: no cover - older torch
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def tune_allocator() -> bool:
    """Let glibc's malloc keep freed activation buffers for the next batch; True if applied.

    PyTorch's CPU tensors come from malloc. glibc serves blocks above its mmap threshold (128 KiB when a
    process starts, raised only as such blocks are freed) with fresh pages, which the kernel zeroes and
    maps again on first touch, and hands the heap's free top back above the trim threshold. A batch of
    samples or an evaluation batch allocates and frees hundreds of MB in 1-30 MB blocks, so much of its
    time went to page faults. ``mallopt`` sets the mmap threshold to glibc's maximum (32 MiB) and the
    trim threshold out of reach: the blocks come from the heap and are reused while still mapped.
    ``python benchmarks/malloc_effect.py`` (each figure in a fresh process) measures what it buys:
    sampling and evaluation ms per 64 images, plain and compiled paths, untuned vs tuned.

    Called by every ``flowmnist`` command except ``train`` (so ``bench`` times all paths tuned): in
    training, glibc's own threshold rises within the first steps, and the tuned heap's fragmentation
    raises the peak memory of a training step (docs/speed.md has the figures). A no-op off glibc, or with
    FLOWMNIST_MALLOC=system in the environment.
    """
    if os.environ.get("FLOWMNIST_MALLOC") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
