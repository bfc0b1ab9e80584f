"""Tests of the Metal emulator (metal_kernels/emulator) on small kernels written here.

The emulator must pass correct kernels and fail wrong ones: a missing barrier, a wrong
shuffle mask, an out-of-bounds access, a deadlock, a divergent collective.
"""

import re
import time

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from sts_edge.metal_kernels.emulator import (  # noqa: E402
    MetalEmulatorError,
    compat_identifiers,
    compiler_available,
    metal_kernel,
)

pytestmark = pytest.mark.skipif(
    not compiler_available(), reason="the Metal emulator needs Linux and g++ (it compiles kernels with it)")


def f32(a):
    return np.array(a.astype(mx.float32))


# ---------------------------------------------------------------------------------------
# MLX's documentation example

EXP_SOURCE = """
    uint elem = thread_position_in_grid.x;
    T tmp = inp[elem];
    out[elem] = metal::exp(tmp);
"""

EXP_STRIDED_SOURCE = """
    uint elem = thread_position_in_grid.x;
    // Utils from `mlx/backend/metal/kernels/utils.h` are automatically included
    uint loc = elem_to_loc(elem, inp_shape, inp_strides, inp_ndim);
    T tmp = inp[loc];
    // Output arrays are always row contiguous
    out[elem] = metal::exp(tmp);
"""


def test_mlx_doc_example_exp():
    kernel = metal_kernel(name="myexp", input_names=["inp"], output_names=["out"],
                          source=EXP_SOURCE)
    a = mx.random.normal(shape=(4, 16)).astype(mx.float16)
    b = kernel(inputs=[a], template=[("T", mx.float32)], grid=(a.size, 1, 1),
               threadgroup=(256, 1, 1), output_shapes=[a.shape], output_dtypes=[a.dtype])[0]
    assert b.dtype == mx.float16 and b.shape == a.shape
    np.testing.assert_allclose(f32(b), np.exp(f32(a)).astype(np.float16).astype(np.float32),
                               rtol=1e-3)


def test_mlx_doc_example_strided():
    kernel = metal_kernel(name="myexp_strided", input_names=["inp"], output_names=["out"],
                          source=EXP_STRIDED_SOURCE, ensure_row_contiguous=False)
    a = mx.random.normal(shape=(8, 16)).astype(mx.float16)[::2]
    b = kernel(inputs=[a], template=[("T", mx.float32)], grid=(a.size, 1, 1),
               threadgroup=(256, 1, 1), output_shapes=[a.shape], output_dtypes=[a.dtype])[0]
    assert mx.allclose(b, mx.exp(a)).item()


def test_generated_signature_mirrors_mlx(capsys):
    kernel = metal_kernel(name="myexp_strided", input_names=["inp"], output_names=["out"],
                          source=EXP_STRIDED_SOURCE)
    a = mx.zeros((4, 16), dtype=mx.float16)
    kernel(inputs=[a], template=[("T", mx.float32)], grid=(a.size, 1, 1),
           threadgroup=(256, 1, 1), output_shapes=[a.shape], output_dtypes=[a.dtype],
           verbose=True)
    printed = capsys.readouterr().out
    expected = (
        "template <typename T>\n"
        "[[kernel]] void custom_kernel_myexp_strided__float_float16_t_float16_t(\n"
        "  const device float16_t* inp [[buffer(0)]],\n"
        "  const constant int* inp_shape [[buffer(1)]],\n"
        "  const constant int64_t* inp_strides [[buffer(2)]],\n"
        "  const constant int& inp_ndim [[buffer(3)]],\n"
        "  device float16_t* out [[buffer(4)]],\n"
        "  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\n"
        + EXP_STRIDED_SOURCE + "\n}\n")
    assert expected in printed


# ---------------------------------------------------------------------------------------
# A threadgroup reduction: threadgroup memory, a barrier, two simd_sums

REDUCE_SOURCE = """
    threadgroup float partial[32];
    uint i = thread_position_in_grid.x;
    float v = i < uint(x_shape[0]) ? float(x[i]) : 0.0f;
    v = simd_sum(v);
    if (thread_index_in_simdgroup == 0) {
        partial[simdgroup_index_in_threadgroup] = v;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (simdgroup_index_in_threadgroup == 0) {
        float w = thread_index_in_simdgroup < simdgroups_per_threadgroup
            ? partial[thread_index_in_simdgroup] : 0.0f;
        w = simd_sum(w);
        if (thread_index_in_threadgroup == 0) {
            out[threadgroup_position_in_grid.x] = static_cast<T>(w);
        }
    }
"""


def reduce(source, x, tg=256, seed=None, name="tg_reduce"):
    kernel = metal_kernel(name=name, input_names=["x"], output_names=["out"], source=source)
    groups = -(-x.size // tg)
    return kernel(inputs=[x], template=[("T", x.dtype)], grid=(x.size, 1, 1),
                  threadgroup=(tg, 1, 1), output_shapes=[(groups,)],
                  output_dtypes=[x.dtype], seed=seed)[0]


def reduce_reference(x, tg):
    xs = f32(x)
    return np.add.reduceat(xs, np.arange(0, xs.size, tg))


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-5), (mx.float16, 2e-3),
                                       (mx.bfloat16, 1e-2)])
def test_threadgroup_reduction_matches_numpy(dtype, tol):
    # 1000 = 3 * 256 + 232: the last threadgroup is partial, and so is its last simdgroup.
    x = mx.random.normal(shape=(1000,), key=mx.random.key(1)).astype(dtype)
    got = f32(reduce(REDUCE_SOURCE, x))
    ref = reduce_reference(x, 256)
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * 16)


def test_reduction_without_its_barrier_fails():
    source = REDUCE_SOURCE.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", "")
    assert source != REDUCE_SOURCE
    x = mx.random.normal(shape=(1000,), key=mx.random.key(2))
    ref = reduce_reference(x, 256)
    for seed in (None, 1, 2, 3, 4, 5):
        got = f32(reduce(source, x, seed=seed, name="tg_reduce_no_barrier"))
        assert not np.allclose(got, ref, rtol=1e-4, atol=1e-4), f"seed {seed} passed"


def test_same_seed_same_schedule():
    source = REDUCE_SOURCE.replace("threadgroup_barrier(mem_flags::mem_threadgroup);", "")
    x = mx.random.normal(shape=(1000,), key=mx.random.key(3))
    runs = [f32(reduce(source, x, seed=7, name="tg_reduce_no_barrier")) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])


# ---------------------------------------------------------------------------------------
# simd functions

BUTTERFLY_SOURCE = """
    uint i = thread_position_in_grid.x;
    float v = x[i];
    for (ushort offset = 16; offset > 0; offset /= 2) {
        v += simd_shuffle_xor(v, MASK);
    }
    out[i] = v;
"""


def butterfly(mask, name):
    kernel = metal_kernel(name=name, input_names=["x"], output_names=["out"],
                          source=BUTTERFLY_SOURCE.replace("MASK", mask))
    x = mx.random.normal(shape=(64,), key=mx.random.key(4))
    got = kernel(inputs=[x], grid=(64, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(64,)],
                 output_dtypes=[mx.float32])[0]
    ref = np.repeat(f32(x).reshape(2, 32).sum(axis=1), 32)
    return f32(got), ref


def test_shuffle_xor_butterfly():
    got, ref = butterfly("offset", "butterfly")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_shuffle_xor_butterfly_with_a_wrong_mask_is_wrong():
    got, ref = butterfly("offset * 2", "butterfly_wrong")
    assert not np.allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_simd_functions_on_a_partial_simdgroup():
    # 40 threads: simdgroup 1 has 8 lanes. Lanes 20.. of simdgroup 0 return before the
    # collectives, which then run over the 20 active lanes only.
    source = """
        uint lane = thread_index_in_simdgroup;
        uint sg = simdgroup_index_in_threadgroup;
        uint i = thread_position_in_grid.x;
        if (sg == 0 && lane >= 20) {
            for (int k = 0; k < 8; k++) out[i * 8 + k] = -1;
            return;
        }
        float v = x[i];
        out[i * 8 + 0] = simd_sum(v);
        out[i * 8 + 1] = simd_max(v);
        out[i * 8 + 2] = simd_prefix_exclusive_sum(v);
        out[i * 8 + 3] = simd_prefix_inclusive_sum(v);
        out[i * 8 + 4] = simd_broadcast(v, 3);
        out[i * 8 + 5] = simd_shuffle_down(v, 1);
        out[i * 8 + 6] = simd_shuffle_up(v, 2);
        out[i * 8 + 7] = simd_all(v > -100.0f) + 2 * simd_any(v > 6.5f) + 4 * simd_is_first();
    """
    kernel = metal_kernel(name="simd_funcs", input_names=["x"], output_names=["out"],
                          source=source)
    xs = np.arange(40, dtype=np.float32) * 0.5
    got = np.array(kernel(inputs=[mx.array(xs)], grid=(40, 1, 1), threadgroup=(40, 1, 1),
                          output_shapes=[(40 * 8,)], output_dtypes=[mx.float32])[0])
    got = got.reshape(40, 8)
    for lanes in (range(0, 20), range(32, 40)):
        v = xs[list(lanes)]
        n = len(v)
        for j, i in enumerate(lanes):
            row = got[i]
            assert row[0] == pytest.approx(v.sum())
            assert row[1] == v.max()
            assert row[2] == pytest.approx(v[:j].sum())
            assert row[3] == pytest.approx(v[:j + 1].sum())
            assert row[4] == v[3]
            if j + 1 < n:
                assert row[5] == v[j + 1]
            if j >= 2:
                assert row[6] == v[j - 2]
            else:
                assert row[6] == v[j]  # the source lane is below 0: the lane keeps its own
            assert row[7] == 1 + 2 * bool((v > 6.5).any()) + 4 * (j == 0)
    assert (got[20:32] == -1).all()
    # Lane 19 shuffles down from lane 20, which returned: undefined, so poison.
    assert np.isnan(got[19, 5])


# ---------------------------------------------------------------------------------------
# Errors

def run_simple(source, n=64, tg=32, name="err", **kw):
    kernel = metal_kernel(name=name, input_names=["x"], output_names=["out"], source=source,
                          **kw)
    x = mx.arange(n).astype(mx.float32)
    return kernel(inputs=[x], grid=(n, 1, 1), threadgroup=(tg, 1, 1), output_shapes=[(n,)],
                  output_dtypes=[mx.float32])[0]


def test_off_by_one_read_raises():
    source = """
        uint i = thread_position_in_grid.x;
        float s = 0;
        for (uint j = 0; j <= 4; j++) s += x[i * 4 + j];
        out[i] = s;
    """
    with pytest.raises(MetalEmulatorError) as e:
        run_simple(source, n=64, name="off_by_one")  # threads 0..15 each read 4 elements
    msg = str(e.value)
    assert "device buffer 'x'" in msg and "it has 64 elements" in msg
    assert re.search(r"element index \d+", msg)
    assert "thread_position_in_grid" in msg and "of threadgroup" in msg
    assert "j <= 4" in msg  # the kernel line, from the debug line tables


def test_write_past_an_output_raises():
    with pytest.raises(MetalEmulatorError, match=r"device buffer 'out': element index 64"):
        run_simple("uint i = thread_position_in_grid.x;\nout[i + 1] = x[i];", name="past_out")


def test_small_inputs_are_constant_and_checked():
    source = """
        uint i = thread_position_in_grid.x;
        out[i] = x[i] * scale + table[i % 4] + table[4];
    """
    kernel = metal_kernel(name="const_oob", input_names=["x", "scale", "table"],
                          output_names=["out"], source=source)
    with pytest.raises(MetalEmulatorError, match=r"constant buffer 'table': element index 4"):
        kernel(inputs=[mx.arange(8).astype(mx.float32), mx.array(2.0),
                       mx.array([1.0, 2.0, 3.0, 4.0])],
               grid=(8, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(8,)],
               output_dtypes=[mx.float32])
    ok = metal_kernel(name="const_ok", input_names=["x", "scale", "table"],
                      output_names=["out"], source=source.replace(" + table[4]", ""))
    got = ok(inputs=[mx.arange(8).astype(mx.float32), mx.array(2.0),
                     mx.array([1.0, 2.0, 3.0, 4.0])],
             grid=(8, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(8,)],
             output_dtypes=[mx.float32])[0]
    np.testing.assert_array_equal(np.array(got), np.arange(8) * 2 + np.tile([1, 2, 3, 4], 2))


def test_vector_layout_and_misaligned_access():
    source = """
        uint i = thread_position_in_grid.x;
        const device packed_float3* p = (const device packed_float3*)(x);
        float3 v = p[i];
        out[i] = v.x + v.y + v.z + sizeof(float3) * 100 + sizeof(packed_float3) * 1000;
        if (MISALIGNED) {
            out[i] += ((const device float4*)(x + 1))[0].x;
        }
    """
    kernel = metal_kernel(name="vector_layout", input_names=["x"], output_names=["out"],
                          source=source)
    args = dict(inputs=[mx.arange(12).astype(mx.float32)], grid=(4, 1, 1),
                threadgroup=(4, 1, 1), output_shapes=[(4,)], output_dtypes=[mx.float32])
    got = kernel(template=[("MISALIGNED", False)], **args)[0]
    np.testing.assert_array_equal(np.array(got), np.arange(12).reshape(4, 3).sum(1) + 13600)
    with pytest.raises(MetalEmulatorError, match=r"misaligned access to device buffer 'x': "
                       r"16 bytes at byte offset 4, which Metal needs aligned to 16 bytes"):
        kernel(template=[("MISALIGNED", True)], **args)


def test_divergent_collective_raises():
    source = """
        uint i = thread_position_in_grid.x;
        float v = x[i];
        if (thread_index_in_simdgroup < 16) {
            v = simd_sum(v);
        } else {
            v = simd_max(v);
        }
        out[i] = v;
    """
    with pytest.raises(MetalEmulatorError, match=r"divergent simd collective.*lanes 0-15 at "
                       r"simd_sum.*lanes 16-31 at simd_max"):
        run_simple(source, name="divergent")


def test_collective_in_a_branch_runs_over_the_lanes_of_the_branch():
    # As on a GPU: the lanes on the other side of the branch are not active in the collective.
    source = """
        uint i = thread_position_in_grid.x;
        float v = x[i];
        if (thread_index_in_simdgroup < 16) {
            v = simd_sum(v);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[i] = v;
    """
    got = np.array(run_simple(source, name="branch_collective"))
    xs = np.arange(64, dtype=np.float32)
    ref = xs.copy()
    for base in (0, 32):
        ref[base:base + 16] = xs[base:base + 16].sum()
    np.testing.assert_array_equal(got, ref)


def test_divergent_collectives_on_one_line_raise():
    source = """
        uint i = thread_position_in_grid.x;
        float v = x[i];
        v = thread_index_in_simdgroup < 16 ? simd_sum(v) : simd_sum(v + 1);
        out[i] = v;
    """
    with pytest.raises(MetalEmulatorError, match=r"divergent simd collective.*column"):
        run_simple(source, name="divergent_one_line")


def test_deadlock_raises():
    source = """
        uint i = thread_position_in_grid.x;
        if (i % 2) {
            threadgroup_barrier(mem_flags::mem_threadgroup);
        } else {
            threadgroup_barrier(mem_flags::mem_device);
        }
        out[i] = x[i];
    """
    with pytest.raises(MetalEmulatorError, match=r"deadlock.*different barriers"):
        run_simple(source, name="deadlock")


def test_return_while_others_wait_at_a_barrier_raises():
    source = """
        uint i = thread_position_in_grid.x;
        if (i >= 60) return;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[i] = x[i];
    """
    with pytest.raises(MetalEmulatorError, match=r"returned.*threadgroup_barrier"):
        run_simple(source, name="early_return")


def test_compile_error_raises_with_gxx_message():
    source = "uint i = thread_position_in_grid.x;\nout[i] = x[i] + undefined_thing;"
    with pytest.raises(MetalEmulatorError) as e:
        run_simple(source, name="does_not_compile")
    msg = str(e.value)
    assert "error" in msg and "undefined_thing" in msg
    assert "out[i] = x[i] + undefined_thing;" in msg.split("offending line")[1]


def test_kernel_code_compiles_under_wall_werror():
    source = "int i = thread_position_in_grid.x;\nout[i] = x[i];\nint unused = 3;"
    with pytest.raises(MetalEmulatorError, match="unused"):
        run_simple(source, name="warns")


def test_unsupported_attribute_raises():
    source = "uint i = thread_position_in_grid.x + grid_origin.x;\nout[i] = x[i];"
    with pytest.raises(MetalEmulatorError, match="grid_origin"):
        run_simple(source, name="grid_origin")


def test_unsupported_constructs_raise():
    source = "atomic_fetch_add_explicit(&out[0], x[0], memory_order_relaxed);"
    with pytest.raises(MetalEmulatorError, match="atomic_fetch_add_explicit"):
        run_simple(source, name="atomics")
    with pytest.raises(NotImplementedError, match="atomic_outputs"):
        run_simple("out[0] = 1;", name="atomic_outputs", atomic_outputs=True)


def test_threadgroup_write_out_of_bounds_raises():
    source = """
        threadgroup float a[32];
        threadgroup float b[32];
        uint t = thread_position_in_threadgroup.x;
        a[t + 1] = x[thread_position_in_grid.x];
        b[t] = 0;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = a[t] + b[t];
    """
    with pytest.raises(MetalEmulatorError, match=r"threadgroup memory.*'a' and 'b'"):
        run_simple(source, name="tg_oob")


def test_threadgroup_memory_over_32k_raises():
    source = """
        threadgroup float big[9000];
        big[thread_position_in_threadgroup.x] = 1;
        out[thread_position_in_grid.x] = x[thread_position_in_grid.x];
    """
    with pytest.raises(MetalEmulatorError, match="exceeds Metal's 32768 bytes"):
        run_simple(source, name="tg_big")


# ---------------------------------------------------------------------------------------
# Poison

def test_outputs_and_threadgroup_memory_start_poisoned():
    source = """
        threadgroup float scratch[64];
        uint i = thread_position_in_grid.x;
        if (i % 2 == 0) out[i] = scratch[thread_position_in_threadgroup.x];
        ints[i] = i % 3 == 0 ? int(i) : ints[i];
    """
    kernel = metal_kernel(name="poison", input_names=["x"], output_names=["out", "ints"],
                          source=source)
    out, ints = kernel(inputs=[mx.zeros(1)], grid=(64, 1, 1), threadgroup=(64, 1, 1),
                       output_shapes=[(64,), (64,)], output_dtypes=[mx.float32, mx.int32])
    assert np.isnan(np.array(out)).all()
    ints = np.array(ints)
    assert (ints[::3] == np.arange(0, 64, 3)).all() and (ints[1::3] == -1).all()
    out2 = kernel(inputs=[mx.zeros(1)], grid=(64, 1, 1), threadgroup=(64, 1, 1),
                  output_shapes=[(64,), (64,)], output_dtypes=[mx.float32, mx.int32],
                  init_value=5)[1]
    assert (np.array(out2)[1::3] == 5).all()


# ---------------------------------------------------------------------------------------
# Dispatch geometry, templates, types

def test_grid_geometry_and_partial_threadgroups():
    source = """
        uint3 g = thread_position_in_grid;
        uint idx = (g.z * threads_per_grid.y + g.y) * threads_per_grid.x + g.x;
        out[idx * 4 + 0] = threads_per_threadgroup.x * 100 + threads_per_threadgroup.y;
        out[idx * 4 + 1] = threadgroup_position_in_grid.x * 10 + threadgroup_position_in_grid.y;
        out[idx * 4 + 2] = thread_index_in_threadgroup;
        out[idx * 4 + 3] = threadgroups_per_grid.x * 10 + threadgroups_per_grid.y;
    """
    kernel = metal_kernel(name="geometry", input_names=["x"], output_names=["out"],
                          source=source)
    gx, gy, gz = 10, 5, 2
    out = kernel(inputs=[mx.zeros(1)], grid=(gx, gy, gz), threadgroup=(4, 4, 1),
                 output_shapes=[(gz, gy, gx, 4)], output_dtypes=[mx.int32])[0]
    out = np.array(out)
    for z in range(gz):
        for y in range(gy):
            for x in range(gx):
                tx = 4 if x < 8 else 2
                ty = 4 if y < 4 else 1
                lx, ly = x % 4, y % 4
                assert list(out[z, y, x]) == [tx * 100 + ty, (x // 4) * 10 + y // 4,
                                              lx + ly * tx, 3 * 10 + 2]


def test_templates_helpers_and_types():
    header = """
    template <typename T>
    METAL_FUNC float twice(const device T* p, int i) { return p[i] * 2; }
    constant int OFFSETS[4] = {0, 1, 2, 3};
    constant constexpr float SCALE = 0.5f;
    """
    source = """
        uint i = thread_position_in_grid.x;
        thread float4 v = float4(x[i], 1.0f, 2.0f, 3.0f);
        float4 w = v * SCALE + 1;
        half h = half(x[i]);
        half h2 = h * 2 + h;
        float f = h * 1.5f;
        T t = i % 2 ? T(x[i]) : T(0);
        device float* o = &out[i];
        const device float4* x4 = (const device float4*)(y);
        float extra = (i < 2) ? x4[i].w : 0.0f;
        if (USE_EXTRA) {
            *o = dot(w, float4(1)) + float(h2) + f + float(t) + twice(x, i) + OFFSETS[i % 4]
                 + metal::precise::exp(0.0f) + fast::exp2(0.0f) + extra * N;
        }
    """
    kernel = metal_kernel(name="types", input_names=["x", "y"], output_names=["out"],
                          source=source, header=header)
    x = mx.arange(8).astype(mx.float16)
    y = mx.arange(8).astype(mx.float32)
    got = kernel(inputs=[x, y], template=[("T", mx.bfloat16), ("N", 10), ("USE_EXTRA", True)],
                 grid=(8, 1, 1), threadgroup=(8, 1, 1), output_shapes=[(8,)],
                 output_dtypes=[mx.float32])[0]
    i = np.arange(8)
    ref = (i / 2 + 7) + 3 * i + 1.5 * i + np.where(i % 2, i, 0) + 2 * i + i % 4 + 2
    ref = ref + np.where(i < 2, [3, 7] + [0] * 6, 0) * 10
    np.testing.assert_allclose(np.array(got), ref)


def test_half_and_bfloat16_round_like_numpy_and_mlx():
    rng = np.random.default_rng(0)
    vals = np.concatenate([
        (rng.standard_normal(5000) * 10.0 ** rng.integers(-9, 6, 5000)).astype(np.float32),
        np.array([0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, 6e-8, 2.98e-8, 3.4e38],
                 np.float32)])
    kernel = metal_kernel(name="convert", input_names=["x"], output_names=["h", "b"],
                          source="""
        uint i = thread_position_in_grid.x;
        h[i] = x[i];
        b[i] = static_cast<bfloat16_t>(x[i]);
    """)
    x = mx.array(vals)
    h, b = kernel(inputs=[x], grid=(vals.size, 1, 1), threadgroup=(256, 1, 1),
                  output_shapes=[vals.shape] * 2, output_dtypes=[mx.float16, mx.bfloat16])
    with np.errstate(over="ignore"):
        ref_h = vals.astype(np.float16)
    np.testing.assert_array_equal(np.array(h).view(np.uint16), ref_h.view(np.uint16))
    np.testing.assert_array_equal(np.array(b.view(mx.uint16)),
                                  np.array(x.astype(mx.bfloat16).view(mx.uint16)))


SDPA_SOURCE = """
    // After MLX's sdpa_vector (mlx/backend/metal/kernels/sdpa_vector.h), one query per
    // threadgroup, keys in BN = 32 simdgroups, the head dimension over the 32 lanes.
    constexpr int BN = 32;
    constexpr int BD = 32;
    constexpr int qk_per_thread = D / BD;
    constexpr int v_per_thread = D / BD;
    uint3 tid = threadgroup_position_in_grid;
    uint simd_gid = simdgroup_index_in_threadgroup;
    uint simd_lid = thread_index_in_simdgroup;
    int inner_k_stride = BN * D;
    typedef float U;

    thread U q[qk_per_thread];
    thread U k[qk_per_thread];
    thread U o[v_per_thread];

    threadgroup U outputs[BN * BD];
    threadgroup U max_scores[BN];
    threadgroup U sum_exp_scores[BN];

    const int q_batch_head_idx = tid.x;
    const int kv_head_idx = q_batch_head_idx / gqa_factor;
    queries += q_batch_head_idx * D + simd_lid * qk_per_thread;
    keys += kv_head_idx * N * D + simd_gid * D + simd_lid * qk_per_thread;
    values += kv_head_idx * N * D + simd_gid * D + simd_lid * v_per_thread;
    out += q_batch_head_idx * D + simd_gid * v_per_thread;

    for (int i = 0; i < qk_per_thread; i++) {
        q[i] = static_cast<U>(scale) * queries[i];
    }
    for (int i = 0; i < v_per_thread; i++) {
        o[i] = 0;
    }

    U max_score = Limits<U>::finite_min;
    U sum_exp_score = 0;
    for (int i = simd_gid; i < N; i += BN) {
        for (int j = 0; j < qk_per_thread; j++) {
            k[j] = keys[j];
        }
        U score = 0;
        for (int j = 0; j < qk_per_thread; j++) {
            score += q[j] * k[j];
        }
        score = simd_sum(score);
        U new_max = max(max_score, score);
        U factor = fast::exp(max_score - new_max);
        U exp_score = fast::exp(score - new_max);
        max_score = new_max;
        sum_exp_score = sum_exp_score * factor + exp_score;
        for (int j = 0; j < v_per_thread; j++) {
            o[j] = o[j] * factor + exp_score * values[j];
        }
        // MLX steps the pointers past the end after the last key: allowed, as long as
        // nothing is read there.
        keys += inner_k_stride;
        values += inner_k_stride;
    }

    if (simd_lid == 0) {
        max_scores[simd_gid] = max_score;
        sum_exp_scores[simd_gid] = sum_exp_score;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    max_score = max_scores[simd_lid];
    U new_max = simd_max(max_score);
    U factor = fast::exp(max_score - new_max);
    sum_exp_score = simd_sum(sum_exp_scores[simd_lid] * factor);

    for (int i = 0; i < v_per_thread; i++) {
        outputs[simd_lid * BD + simd_gid] = o[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        o[i] = simd_sum(outputs[simd_gid * BD + simd_lid] * factor);
        o[i] = sum_exp_score == 0 ? o[i] : (o[i] / sum_exp_score);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    if (simd_lid == 0) {
        for (int i = 0; i < v_per_thread; i++) {
            out[i] = static_cast<T>(o[i]);
        }
    }
"""


@pytest.mark.parametrize("dtype,tol", [(mx.float16, 2e-3), (mx.bfloat16, 2e-2)])
def test_sdpa_vector_style_kernel(dtype, tol):
    hq, hk, n, d = 4, 2, 100, 64
    keys = mx.random.split(mx.random.key(5), 3)
    q = mx.random.normal((hq, d), key=keys[0]).astype(dtype)
    k = mx.random.normal((hk, n, d), key=keys[1]).astype(dtype)
    v = mx.random.normal((hk, n, d), key=keys[2]).astype(dtype)
    scale = d ** -0.5
    kernel = metal_kernel(name="sdpa_vector_like",
                          input_names=["queries", "keys", "values", "gqa_factor", "N", "scale"],
                          output_names=["out"], source=SDPA_SOURCE)
    got = kernel(inputs=[q, k, v, mx.array(hq // hk), mx.array(n), mx.array(scale)],
                 template=[("T", dtype), ("D", d)], grid=(hq * 1024, 1, 1),
                 threadgroup=(1024, 1, 1), output_shapes=[(hq, d)], output_dtypes=[dtype])[0]
    qf, kf, vf = f32(q), f32(k), f32(v)
    kh = np.repeat(kf, hq // hk, axis=0)
    vh = np.repeat(vf, hq // hk, axis=0)
    s = np.einsum("hd,hnd->hn", qf, kh) * scale
    p = np.exp(s - s.max(axis=1, keepdims=True))
    ref = np.einsum("hn,hnd->hd", p / p.sum(axis=1, keepdims=True), vh)
    np.testing.assert_allclose(f32(got), ref, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------
# The API

def test_compat_identifiers_are_plain_and_defined():
    names = compat_identifiers()
    assert names and len(set(names)) == len(names)
    for name in names:
        assert re.fullmatch(r"[A-Za-z_]\w*(::[A-Za-z_]\w*)*", name), name
        assert not name.startswith("sts_emu")
    # Each name resolves in kernel code: a using-declaration for each, #ifdef for macros.
    decls, macros = [], []
    for name in names:
        if name.isupper() or name.startswith("MLX_") or name == "METAL_FUNC":
            macros.append(f"#ifndef {name}\n#error {name} missing\n#endif\n")
        else:
            decls.append(f"using {name if '::' in name else '::' + name};")
    header = "".join(macros) + "namespace probe {\n" + "\n".join(decls) + "\n}\n"
    kernel = metal_kernel(name="identifiers", input_names=["x"], output_names=["out"],
                          source="out[0] = x[0];", header=header)
    out = kernel(inputs=[mx.ones(1)], grid=(1, 1, 1), threadgroup=(1, 1, 1),
                 output_shapes=[(1,)], output_dtypes=[mx.float32])[0]
    assert np.array(out)[0] == 1


def test_kernel_is_compiled_once_and_fast():
    source = """
        uint i = thread_position_in_grid.x;
        float acc = 0;
        for (int j = 0; j < 48; j++) acc += x[(i + j) % 2048] * 0.5f;
        out[i] = acc;
    """
    kernel = metal_kernel(name="speed", input_names=["x"], output_names=["out"], source=source)
    x = mx.random.normal(shape=(2048,))
    args = dict(inputs=[x], grid=(2048, 1, 1), threadgroup=(256, 1, 1),
                output_shapes=[(2048,)], output_dtypes=[mx.float32])
    kernel(**args)
    start = time.perf_counter()
    out = kernel(**args)[0]  # 8 threadgroups x 256 threads x ~100 K loads and FMAs in all
    assert time.perf_counter() - start < 1.0
    xs = f32(x)
    ref = sum(xs[(np.arange(2048) + j) % 2048] * 0.5 for j in range(48))
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-4, atol=1e-4)


def test_ucontext_fallback_runs_the_same(monkeypatch):
    monkeypatch.setenv("STS_EDGE_METAL_EMU_UCONTEXT", "1")
    x = mx.random.normal(shape=(300,), key=mx.random.key(6))
    got = f32(reduce(REDUCE_SOURCE, x, tg=128))
    np.testing.assert_allclose(got, reduce_reference(x, 128), rtol=1e-5, atol=1e-4)


def test_argument_checks_mirror_mlx():
    kernel = metal_kernel(name="args", input_names=["x"], output_names=["out"],
                          source="out[0] = x[0];")
    with pytest.raises(ValueError, match="inputs"):
        kernel(inputs=[], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
               output_dtypes=[mx.float32])
    with pytest.raises(ValueError, match="Thread group size"):
        kernel(inputs=[mx.ones(1)], grid=(2048, 1, 1), threadgroup=(2048, 1, 1),
               output_shapes=[(1,)], output_dtypes=[mx.float32])
    with pytest.raises(ValueError, match="at least one output"):
        metal_kernel(name="none", input_names=[], output_names=[], source="")
