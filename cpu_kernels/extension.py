"""The CPU kernels (affine_matmul.cpp: products with mlx-lm's affine-quantized weights;
decode_attention.cpp: attention of decode-sized blocks over the KV cache, and two-stage
selection's masses), compiled on first use.

PyTorch builds it with the host's C++ compiler into its extensions cache (TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions) once per machine and PyTorch version; later processes load the
built library. Where it cannot be built (no compiler, a CPU without AVX2/FMA/F16C), `kernel()`
returns None with the reason in `unavailable_reason()`, and the caller falls back to PyTorch's own
int4 kernel or to decoding the weights at load. On CPUs with AMX the kernel multiplies 4-bit weights
with int8 activations on the tile units (`STS_EDGE_CPU_AMX=0` keeps it on the AVX2 loops).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("affine_matmul.cpp", "decode_attention.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("amx.h", "simd.h")]
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # -fopenmp: at::parallel_for runs on PyTorch's OpenMP pool
_reason: str | None = None


def cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return {"avx2", "fma", "f16c"} <= set(flags.split(":", 1)[1].split())


@functools.cache
def kernel():
    """torch.ops.sts_edge_cpu.affine_matmul(x, words, scales, biases, bits, group_size), or None."""
    global _reason
    _reason = None
    if os.environ.get("STS_EDGE_CPU_KERNELS", "1") == "0":
        _reason = "STS_EDGE_CPU_KERNELS=0"
        return None
    if not cpu_has_avx2():
        _reason = "the CPU lacks AVX2/FMA/F16C"
        return None
    try:
        from torch.utils.cpp_extension import load

        # PyTorch rebuilds when a source changes, not a header: the name carries the headers' hash.
        digest = hashlib.sha256(b"".join(header.read_bytes() for header in HEADERS)).hexdigest()[:10]
        load(name=f"sts_edge_cpu_{digest}", sources=[str(source) for source in SOURCES], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
    except Exception as err:  # no compiler, no ninja, a failed build: PyTorch's kernels remain
        _reason = f"the CPU kernel did not build ({str(err).splitlines()[0][:200]})"
        log.warning("sts-edge: %s; quantized layers use PyTorch's kernels instead", _reason)
        return None
    return torch.ops.sts_edge_cpu.affine_matmul


@functools.cache
def attention_kernel():
    """torch.ops.sts_edge_cpu.decode_attention(q, cache_k, cache_v, start, indices, scores, score_max,
    score_per_head), or None where the library cannot be built or STS_EDGE_CPU_ATTENTION=0 (read at
    first use: then attention takes PyTorch's operations)."""
    if os.environ.get("STS_EDGE_CPU_ATTENTION", "1") == "0" or kernel() is None:
        return None
    return torch.ops.sts_edge_cpu.decode_attention


@functools.cache
def candidate_mass_kernel():
    """torch.ops.sts_edge_cpu.candidate_mass(q, cache_k, start, nominated): two-stage selection's
    masses, where attention_kernel() is available (its passes without the values), else None."""
    return None if attention_kernel() is None else torch.ops.sts_edge_cpu.candidate_mass


def unavailable_reason() -> str | None:
    kernel()
    return _reason


def amx_ready() -> bool:
    """Whether 4-bit products with int8 activations in groups of 64 or 128 can run on AMX tiles here
    (STS_EDGE_CPU_AMX=0 says no)."""
    return os.environ.get("STS_EDGE_CPU_AMX", "1") != "0" and kernel() is not None and torch.ops.sts_edge_cpu.amx_ready()
