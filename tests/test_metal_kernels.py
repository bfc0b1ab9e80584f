"""The Metal kernels (metal_kernels/*.metal), executed on the CPU by the Linux executor
(metal_kernels/emulator), against the plain MLX path and numpy; bugs planted in copies of their
bodies must make the executor's run fail; the MLX backend picks them only where Metal is present."""

import re

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from sts_edge.backend import ScoreSpec, load_model  # noqa: E402
from sts_edge.backends.mlx import attention as plain  # noqa: E402
from sts_edge.mask import MaskPolicy  # noqa: E402
from sts_edge.metal_kernels import attention as metal  # noqa: E402
from sts_edge.metal_kernels import emulator  # noqa: E402
from sts_edge.sampling import SamplingParams  # noqa: E402
from sts_edge.speculative import generate_tokens  # noqa: E402

pytestmark = pytest.mark.skipif(not emulator.compiler_available(), reason="no C++ compiler (g++) to run the Metal executor")

DTYPES = {"float16": (mx.float16, 4e-3), "bfloat16": (mx.bfloat16, 2e-2)}


@pytest.fixture(scope="module")
def kernels():
    return metal.Kernels.build(emulator.metal_kernel)


def cache(rng, kv_heads, capacity, head_dim, dtype):
    """A random cache [1, kv_heads, capacity, head_dim] in dtype, and its values in float64."""
    values = mx.array(rng.standard_normal((1, kv_heads, capacity, head_dim)).astype(np.float32)).astype(dtype)
    return values, np.array(values.astype(mx.float32)).astype(np.float64)


def reference(q, k, v, start, lists, heads_per_list):
    """float64 attention of q [heads, n, d] over each list's rows plus the block, causally."""
    heads, n, head_dim = q.shape
    group = heads // k.shape[0]
    out = np.zeros_like(q)
    for h in range(heads):
        rows = np.concatenate([lists[h // heads_per_list], np.arange(start, start + n)]).astype(int)
        logits = q[h] @ k[h // group, rows].T / np.sqrt(head_dim)
        logits[:, len(rows) - n:] = np.where(np.tril(np.ones((n, n), dtype=bool)), logits[:, len(rows) - n:], -np.inf)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        out[h] = probs / probs.sum(axis=-1, keepdims=True) @ v[h // group, rows]
    return out


def csr(lists):
    offsets = np.concatenate([[0], np.cumsum([len(rows) for rows in lists])]).astype(np.int32)
    indices = np.concatenate([np.asarray(rows, dtype=np.int32) for rows in lists])
    return mx.array(indices if indices.size else np.zeros(1, np.int32)), mx.array(offsets)


def ragged_lists(rng, units, start):
    """Sorted positions < start per unit: an empty list, a single row, the whole context, and random lengths."""
    lengths = [0, 1, start] + list(rng.integers(0, start, max(0, units - 3)))
    return [np.sort(rng.choice(start, length, replace=False)) for length in lengths[:units]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("gamma", range(1, 9))
def test_sparse_kernel_matches_reference_on_ragged_lists(kernels, dtype, head_dim, group, gamma, monkeypatch):
    mx_dtype, tolerance = DTYPES[dtype]
    rng = np.random.default_rng(group * 100 + gamma)
    kv_heads, start, n = 4, 75, gamma + 1  # 75 rows fill no tile of 8 simdgroups or 16-row splits
    monkeypatch.setattr(metal, "ROWS_PER_SPLIT", 16 if gamma == 3 else metal.ROWS_PER_SPLIT)  # several splits
    k, k64 = cache(rng, kv_heads, start + n + 5, head_dim, mx_dtype)
    v, v64 = cache(rng, kv_heads, start + n + 5, head_dim, mx_dtype)
    q, q64 = cache(rng, kv_heads * group, n, head_dim, mx_dtype)
    lists = ragged_lists(rng, kv_heads, start)
    indices, offsets = csr(lists)
    out = metal.sparse_attention(q, k, v, start, indices, offsets, head_dim**-0.5, max_rows=start, kernels=kernels)
    expected = reference(q64[0], k64[0], v64[0], start, lists, group)
    assert out.dtype == mx_dtype
    np.testing.assert_allclose(np.array(out[0].astype(mx.float32)), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("granularity", ["kv", "query"])
def test_sparse_kernel_matches_the_plain_path(kernels, granularity):
    rng = np.random.default_rng(3)
    kv_heads, group, start, n, head_dim = 2, 4, 61, 5, 64
    k, _ = cache(rng, kv_heads, 80, head_dim, mx.bfloat16)
    v, _ = cache(rng, kv_heads, 80, head_dim, mx.bfloat16)
    q, _ = cache(rng, kv_heads * group, n, head_dim, mx.bfloat16)
    units = kv_heads if granularity == "kv" else kv_heads * group
    sets = mx.array(np.sort(np.stack([rng.choice(start, 20, replace=False) for _ in range(units)]), axis=-1).astype(np.int32))
    offsets = mx.arange(0, (units + 1) * 20, 20, dtype=mx.int32)
    out = metal.sparse_attention(q, k, v, start, sets.reshape(-1), offsets, 0.125, max_rows=20, kernels=kernels)
    expected = plain.sparse_attend(q, k, v, start, sets, 0.125)
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), np.array(expected.astype(mx.float32)), atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("n", [1, 5])
def test_dense_kernel_matches_the_plain_path(kernels, dtype, head_dim, group, n):
    mx_dtype, tolerance = DTYPES[dtype]
    rng = np.random.default_rng(n)
    kv_heads, start = 2, 99
    k, _ = cache(rng, kv_heads, 128, head_dim, mx_dtype)
    v, _ = cache(rng, kv_heads, 128, head_dim, mx_dtype)
    q, _ = cache(rng, kv_heads * group, n, head_dim, mx_dtype)
    out = metal.dense_attention(q, k, v, start, head_dim**-0.5, kernels=kernels)
    expected = plain.dense_attend(q, k[:, :, : start + n], v[:, :, : start + n], start, head_dim**-0.5)
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), np.array(expected.astype(mx.float32)),
                               atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("granularity", ["kv", "query"])
@pytest.mark.parametrize("aggregation", ["max", "sum"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("dtype,head_dim,group", [("float16", 64, 4), ("bfloat16", 128, 8), ("float16", 128, 1)])
def test_scored_kernel_matches_the_plain_path(kernels, granularity, aggregation, n, dtype, head_dim, group, monkeypatch):
    mx_dtype, tolerance = DTYPES[dtype]
    rng = np.random.default_rng(7)
    kv_heads, start, capacity = 2, 70, 96
    monkeypatch.setattr(metal, "ROWS_PER_SPLIT", 24)  # three splits
    k, _ = cache(rng, kv_heads, capacity, head_dim, mx_dtype)
    v, _ = cache(rng, kv_heads, capacity, head_dim, mx_dtype)
    q, _ = cache(rng, kv_heads * group, n, head_dim, mx_dtype)
    units = kv_heads if granularity == "kv" else kv_heads * group
    before = rng.random((2, units, capacity)).astype(np.float32) * 0.05  # earlier steps' scores
    buffer = plain.ScoreBuffer(mx.array(before), ScoreSpec(granularity, aggregation))
    scale = head_dim**-0.5
    expected = plain.attend_and_score(q, k[:, :, : start + n], v[:, :, : start + n], start, scale, buffer, 1)
    out, folded = metal.dense_attention_with_scores(q, k, v, start, scale, mx.array(before[1, :, : start + n]),
                                                    aggregation, kernels=kernels)
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), np.array(expected.astype(mx.float32)), atol=tolerance)
    np.testing.assert_allclose(np.array(folded), np.array(buffer.buffer[1, :, : start + n]), atol=1e-5, rtol=1e-4)


# --- the executor is not a rubber stamp: planted bugs fail ----------------------------------------


def planted(source: str, old: str, new: str) -> str:
    assert source.count(old) >= 1, f"the kernel no longer contains {old!r}: update the planted bug"
    return source.replace(old, new, 1)


def sparse_case(kernels, seed=0):
    rng = np.random.default_rng(11)
    kv_heads, group, start, n, head_dim = 4, 4, 45, 3, 64  # lists of 0, 1, 45 and 9 rows: 45 take three chunks
    k, k64 = cache(rng, kv_heads, 64, head_dim, mx.float16)
    v, v64 = cache(rng, kv_heads, 64, head_dim, mx.float16)
    q, q64 = cache(rng, kv_heads * group, n, head_dim, mx.float16)
    lists = ragged_lists(rng, kv_heads, start)
    indices, offsets = csr(lists)
    out = metal.sparse_attention(q, k, v, start, indices, offsets, head_dim**-0.5, max_rows=start, kernels=kernels)
    return np.array(out[0].astype(mx.float32)), reference(q64[0], k64[0], v64[0], start, lists, group)


def test_the_unplanted_kernels_pass_the_bug_case(kernels):
    out, expected = sparse_case(kernels)
    np.testing.assert_allclose(out, expected, atol=4e-3, rtol=4e-3)


BUGS = {
    "off-by-one loop bound": ("split", "const int rows_here = min(CHUNK, last - base);",
                              "const int rows_here = min(CHUNK, last - base + 1);"),
    "missing threadgroup_barrier": ("split", "  threadgroup_barrier(mem_flags::mem_threadgroup);\n  for (int r = 0;",
                                    "  for (int r = 0;"),
    "missing barrier before threadgroup memory is reused": (
        "split", "  threadgroup_barrier(mem_flags::mem_threadgroup);  // the next chunk overwrites these rows\n", ""),
    "simd reduction over 16 of 32 lanes": ("split", "logit = simd_sum(logit);",
                                           "for (int mask = 8; mask > 0; mask /= 2) { logit += simd_shuffle_xor(logit, mask); }"),
    "read past a buffer": ("merge", "for (int s = 0; s < parts; s++) {\n  top", "for (int s = 0; s <= parts; s++) {\n  top"),
}


@pytest.mark.parametrize("bug", BUGS)
def test_a_planted_bug_fails_the_run(bug):
    which, old, new = BUGS[bug]
    sources = {"split": metal.SPLIT_SOURCE, "merge": metal.MERGE_SOURCE, "fold": metal.FOLD_SOURCE}
    sources[which] = planted(sources[which], old, new)
    buggy = metal.Kernels.build(emulator.metal_kernel, **sources)
    try:
        out, expected = sparse_case(buggy)
    except emulator.MetalEmulatorError as error:
        assert bug != "read past a buffer" or "lse_part" in str(error)
        return
    assert not np.allclose(out, expected, atol=4e-3, rtol=4e-3, equal_nan=False)


# --- the executor compiles our sources under -Wall -Werror with names from Metal and MLX only ---------

# Every name the compatibility header may offer kernel code. From the Metal Shading Language
# specification: scalar and vector types, address spaces, math (and its fast:: and precise::
# variants), type traits, simd-group and synchronisation functions.
MSL_NAMES = set("""
device constant thread threadgroup kernel half bfloat float int uint short ushort char uchar long ulong bool size_t
ptrdiff_t int8_t int16_t int32_t int64_t uint8_t uint16_t uint32_t uint64_t vec
float2 float3 float4 half2 half3 half4 bfloat2 bfloat3 bfloat4 int2 int3 int4 uint2 uint3 uint4 short2 short3 short4
ushort2 ushort3 ushort4 char2 char3 char4 uchar2 uchar3 uchar4 long2 long3 long4 ulong2 ulong3 ulong4 bool2 bool3 bool4
packed_float2 packed_float3 packed_float4 packed_half2 packed_half3 packed_half4
metal fast precise exp exp2 exp10 log log2 log10 max min fmax fmin abs fabs sqrt rsqrt floor ceil round trunc rint fract
fmod clamp saturate step select isinf isnan isfinite signbit copysign fdim pow powr fma mix sign divide
sin cos tan asin acos atan atan2 sinh cosh tanh asinh acosh atanh dot as_type numeric_limits
is_floating_point_v is_integral_v is_same_v enable_if_t conditional_t
simd_sum simd_max simd_min simd_product simd_prod simd_and simd_or simd_xor simd_broadcast simd_broadcast_first
simd_shuffle simd_shuffle_down simd_shuffle_up simd_shuffle_xor simd_shuffle_rotate_down simd_shuffle_rotate_up
simd_prefix_exclusive_sum simd_prefix_inclusive_sum simd_prefix_exclusive_product simd_prefix_inclusive_product
simd_all simd_any simd_is_first threadgroup_barrier simdgroup_barrier mem_flags mem_none mem_device mem_threadgroup
mem_texture mem_threadgroup_imageblock INFINITY NAN HUGE_VALF FLT_MAX FLT_MIN M_PI_F M_LN2_F M_LOG2E_F
""".split())
# From MLX's kernel headers, which MLX compiles before every custom kernel
# (mlx/backend/metal/kernels/utils.h, bf16.h, defines.h).
MLX_NAMES = set("""
float16_t bfloat16_t Limits WorkPerThread ceildiv elem_to_loc elem_to_loc_1 elem_to_loc_2 elem_to_loc_3 log1p
METAL_FUNC MLX_MTL_PRAGMA_UNROLL
""".split())


def test_the_executor_defines_only_metal_and_mlx_names():
    names = emulator.compat_identifiers()
    assert names
    unknown = [name for name in names if name.split("::")[-1] not in MSL_NAMES | MLX_NAMES]
    assert not unknown, f"the compatibility header defines names that Metal and MLX do not have: {unknown}"


def test_kernel_sources_use_only_what_the_executor_defines():
    """Identifiers in our kernel bodies are C++ keywords, our own names, the attributes MLX passes, or
    names the executor defines (which the test above ties to Metal and MLX)."""
    keywords = set("const constexpr int float bool for if else return true false size_t static_cast thread "
                   "threadgroup device continue break while".split())
    attributes = {"threadgroup_position_in_grid", "thread_position_in_grid", "simdgroup_index_in_threadgroup",
                  "thread_index_in_simdgroup", "thread_index_in_threadgroup", "x", "y", "z"}
    defined = {name.split("::")[-1] for name in emulator.compat_identifiers()}
    for source, inputs, outputs, template in [
        (metal.SPLIT_SOURCE, "q k v indices offsets params scale", "o_part lse_part logits", "T D BN DENSE SCORES"),
        (metal.MERGE_SOURCE, "o_part lse_part params", "out lse", "T D"),
        (metal.FOLD_SOURCE, "logits lse live params", "scores", "MAX"),
    ]:
        code = re.sub(r"//[^\n]*", "", source)
        declared = set(re.findall(r"\b(?:int|float|bool|size_t|T)\s*\*?\s+(\w+)", code)) | set(re.findall(r",\s*(\w+)\s*=", code))
        declared |= set(re.findall(r"\]\s*(\w+)", code)) | {"mem_flags", "mem_threadgroup"}
        known = keywords | attributes | defined | declared | set(f"{inputs} {outputs} {template}".split())
        unknown = sorted(set(re.findall(r"\b[A-Za-z_]\w*\b", code)) - known)
        assert not unknown, f"names outside Metal, MLX and the kernel's own: {unknown}"


# --- the MLX backend picks the kernels only where Metal is present ------------------------------------


class Spy:
    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.kernel(*args, **kwargs)


def test_on_linux_the_backend_takes_the_plain_path():
    q = mx.zeros((1, 8, 1, 64), dtype=mx.float16)
    assert not metal.usable(q)  # no Metal here: mx.metal.is_available() is False


def test_the_backend_runs_the_kernels_where_metal_is_available(kernels, make_model, monkeypatch):
    # head_dim 64, a size the kernels take (the shared fixtures' heads are 16 wide)
    target_dir = make_model("llama3", seed=0, head_dim=64)
    draft_dir = make_model("llama3", seed=1, head_dim=64, num_hidden_layers=2)
    prompt = np.random.default_rng(5).integers(0, 320, 90).tolist()
    policy = MaskPolicy("sts", budget=12, sink=2, window=8)

    def run():
        target = load_model(target_dir, "mlx", max_seq_len=160, dtype="float32")
        draft = load_model(draft_dir, "mlx", max_seq_len=160, dtype="float32")
        return list(generate_tokens(target, prompt, SamplingParams(), 6, draft=draft, gamma=3, policy=policy))

    expected = run()
    spies = metal.Kernels(Spy(kernels.split), Spy(kernels.merge), Spy(kernels.fold))
    monkeypatch.setattr(metal, "KERNELS", spies)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    plain_paths = {name: Spy(getattr(plain, name)) for name in ("sparse_attend", "attend_and_score")}
    for name, spy in plain_paths.items():
        monkeypatch.setattr(plain, name, spy)
    assert run() == expected
    assert spies.split.calls and spies.merge.calls and spies.fold.calls
    assert not any(spy.calls for spy in plain_paths.values())
    monkeypatch.setattr(metal, "ENABLED", False)  # STS_EDGE_METAL_KERNELS=0
    calls = spies.split.calls
    assert run() == expected
    assert spies.split.calls == calls
    assert all(spy.calls for spy in plain_paths.values())


def test_the_mlx_kernel_benchmark_runs_through_the_executor(tmp_path):
    """scripts/bench_kernels_mlx.py (bench_kernels.py's MLX mode), on tiny shapes through the
    executor: every case checked against its reference, the CUDA mode's fields, times labelled."""
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels_mlx.py"
    out = tmp_path / "kernels.json"
    argv = sys.argv
    sys.argv = [str(script), "--emulate", "--contexts", "40", "--queries", "2", "--budgets", "16", "--repeats", "1",
                "--out", str(out)]
    try:
        with pytest.raises(SystemExit) as exit_code:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_code.value.code == 0
    record = json.loads(out.read_text())
    assert "times mean nothing" in record["device"] and record["backend"] == "mlx"
    dense, sparse = record["verify"]
    assert {"kernel", "context", "queries", "kept", "time_us", "bandwidth_gbs", "copy_fraction", "sdpa_us", "vs_sdpa",
            "rel_error"} <= set(dense)
    assert {"budget", "bytes_read", "vs_dense", "vs_gather", "gather_us"} <= set(sparse)
    assert max(dense["rel_error"], sparse["rel_error"], record["draft"][0]["rel_error"]) < 1e-2
    assert record["draft"][0]["scores_rel_error"] < 1e-4


@pytest.mark.parametrize("value,enabled", [("0", False), ("1", True)])
def test_the_environment_switch_is_read_at_import(value, enabled):
    import os
    import subprocess
    import sys

    code = "from sts_edge.metal_kernels import attention; print(attention.ENABLED)"
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "STS_EDGE_METAL_KERNELS": value},
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(enabled)
