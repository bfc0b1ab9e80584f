"""A Metal executor for Linux: runs kernels written for ``mx.fast.metal_kernel`` on the CPU.

``metal_kernel(...)`` has the signature and the return of ``mx.fast.metal_kernel``, so a
launcher can take either as its factory. A call generates the kernel source exactly as MLX
does (``write_signature`` in mlx/backend/common/metal_kernel.cpp), rewrites the Metal-only
constructs into C++ (the text keeps its line numbers, so compiler messages and run-time
reports point at lines of the generated source), compiles it with g++ against
``metal_compat.h`` (-std=c++17 -O1 -Wall -Werror; cached by content under
$STS_EDGE_CACHE/metal_emulator or ~/.cache/sts-edge/metal_emulator) and runs the grid:

* threadgroups run one at a time, in a random order; inside one, every thread is a fibre and
  a seeded random scheduler switches between them at each barrier or simd collective, so an
  access that depends on a missing barrier sees another ordering (and poison) rather than luck;
  ``seed=`` on the call picks the order (default: fixed, so runs repeat);
* ``threadgroup`` memory and outputs without ``init_value`` start as poison (NaN, 0xFF..);
  writes just outside a threadgroup array hit poisoned guard bytes and are reported;
* every access through a ``device``/``constant`` pointer is checked against its buffer's
  bounds and Metal's alignment (a float4 on 16 bytes); the report names the buffer, the
  element, the thread and the kernel line;
* deadlocks (threads at different barriers), lanes of a simdgroup at different collectives,
  threads that return while others wait at a threadgroup_barrier, more than 32 KB of
  threadgroup memory, and Metal constructs the emulator lacks raise :class:`MetalEmulatorError`.

Supported: the MLX signature (inputs, `_shape`/`_strides`/`_ndim`, outputs, templates on
dtypes/ints/bools, every thread attribute but grid_origin, non-uniform edge threadgroups);
address spaces device/constant (checked pointers: + - += -= ++ -- [] * -> comparisons, casts
between element types), threadgroup (arrays of any rank, scalars, plain pointers into them),
thread; program-scope ``constant`` values; half / bfloat16 (16-bit, rounding to nearest even
like Metal and numpy, arithmetic through float), vectors of 2-4 elements with Metal's sizes
(.x .y .z .w and [], + - * /, dot; no swizzles, no vector comparisons), packed_* vectors as
storage; the metal:: math functions (precise:: and fast:: are the exact ones), numeric_limits,
as_type; threadgroup_barrier, simdgroup_barrier and the simd_* collectives over the lanes that
take part (a lane that returned, or that waits at a threadgroup_barrier on the other side of a
branch, does not); MLX's Limits, WorkPerThread, ceildiv, elem_to_loc*.

Not supported (refused with the construct named): atomics and atomic_outputs, simdgroup
matrices, quad collectives, simd_ballot, textures, function constants, other #includes.
Not detected: data races through device memory, and memory-ordering bugs (memory is coherent
here, so mem_flags are not checked); a stack overflow, an access out of a ``thread`` array or
through a raw ``threadgroup`` pointer far outside its array, or an integer division by zero
crashes or corrupts like C++ (each fibre has 256 KB of stack with a guard page).

``compiler_available()`` says whether the emulator can run (Linux and g++);
``compat_identifiers()`` lists the MSL and MLX names the compatibility header provides.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["MetalEmulatorError", "compat_identifiers", "compiler_available", "metal_kernel"]

_HERE = Path(__file__).resolve().parent
_COMPAT_H = _HERE / "metal_compat.h"
_RUNTIME_H = _HERE / "runtime.h"
_RUNTIME_CPP = _HERE / "runtime.cpp"
_ABI = 5  # runtime.h's STS_EMU_ABI

# Kernel code must compile cleanly under these; the harness adds nothing that warns.
_KERNEL_FLAGS = ("-std=c++17", "-O1", "-g1", "-Wall", "-Werror", "-shared", "-fPIC",
                 "-fvisibility=hidden")
_RUNTIME_FLAGS = ("-std=c++17", "-O2", "-Wall", "-Werror", "-shared", "-fPIC",
                  "-fvisibility=hidden")
_DEFAULT_SEED = 0
_ERR_CAP = 4096


class MetalEmulatorError(RuntimeError):
    """A Metal kernel failed to compile or misbehaved when run by the emulator."""


def compiler_available() -> bool:
    """Whether the emulator can run here: Linux (it is the Metal executor for machines without
    Metal; elsewhere `g++` may be another compiler) with g++ on PATH."""
    return sys.platform.startswith("linux") and shutil.which(_cxx()) is not None


def _cxx() -> str:
    return os.environ.get("STS_EDGE_METAL_EMU_CXX", "g++")


# ---------------------------------------------------------------------------------------
# Types and attributes, as MLX names them

# mx.Dtype name -> (MSL type string as in MLX's get_type_string, numpy storage dtype)
_DTYPES = {
    "float32": ("float", np.float32),
    "float16": ("float16_t", np.float16),
    "bfloat16": ("bfloat16_t", np.uint16),  # numpy has no bfloat16: carried as its bits
    "int8": ("int8_t", np.int8),
    "int16": ("int16_t", np.int16),
    "int32": ("int32_t", np.int32),
    "int64": ("int64_t", np.int64),
    "uint8": ("uint8_t", np.uint8),
    "uint16": ("uint16_t", np.uint16),
    "uint32": ("uint32_t", np.uint32),
    "uint64": ("uint64_t", np.uint64),
    "bool": ("bool", np.bool_),
}

# (attribute, MSL type, C++ expression over the ThreadCtx `t`), in MLX's order. None: not
# supported.
_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint", "t.dispatch_quads_per_tg"),
    ("dispatch_simdgroups_per_threadgroup", "uint", "t.dispatch_simds_per_tg"),
    ("dispatch_threads_per_threadgroup", "uint3", "sts_emu::attr3(t.dispatch_threads_per_tg)"),
    ("grid_origin", "uint3", None),
    ("grid_size", "uint3", "sts_emu::attr3(t.threads_per_grid)"),
    ("quadgroup_index_in_threadgroup", "uint", "t.quad_index"),
    ("quadgroups_per_threadgroup", "uint", "t.quads_per_tg"),
    ("simdgroup_index_in_threadgroup", "uint", "t.simd_index"),
    ("simdgroups_per_threadgroup", "uint", "t.simds_per_tg"),
    ("thread_execution_width", "uint", "32u"),
    ("thread_index_in_quadgroup", "uint", "t.quad_lane"),
    ("thread_index_in_simdgroup", "uint", "t.simd_lane"),
    ("thread_index_in_threadgroup", "uint", "t.index_in_tg"),
    ("thread_position_in_grid", "uint3", "sts_emu::attr3(t.pos_in_grid)"),
    ("thread_position_in_threadgroup", "uint3", "sts_emu::attr3(t.pos_in_tg)"),
    ("threadgroup_position_in_grid", "uint3", "sts_emu::attr3(t.tg_pos)"),
    ("threadgroups_per_grid", "uint3", "sts_emu::attr3(t.tgs_per_grid)"),
    ("threads_per_grid", "uint3", "sts_emu::attr3(t.threads_per_grid)"),
    ("threads_per_simdgroup", "uint", "32u"),
    ("threads_per_threadgroup", "uint3", "sts_emu::attr3(t.threads_per_tg)"),
)

_MAX_CONSTANT_ARRAY_SIZE = 8  # MLX passes smaller inputs in the constant address space

# Metal names the emulator does not provide; a kernel using one is refused before compiling.
_UNSUPPORTED = {
    **{n: "atomics" for n in (
        "atomic", "atomic_int", "atomic_uint", "atomic_bool", "atomic_float",
        "atomic_store_explicit", "atomic_load_explicit", "atomic_exchange_explicit",
        "atomic_compare_exchange_weak_explicit", "atomic_fetch_add_explicit",
        "atomic_fetch_sub_explicit", "atomic_fetch_max_explicit", "atomic_fetch_min_explicit",
        "atomic_fetch_and_explicit", "atomic_fetch_or_explicit", "atomic_fetch_xor_explicit",
        "memory_order_relaxed", "atomic_thread_fence")},
    **{n: "simdgroup matrices" for n in (
        "simdgroup_matrix", "simdgroup_float8x8", "simdgroup_half8x8", "simdgroup_bfloat8x8",
        "simdgroup_load", "simdgroup_store", "simdgroup_multiply",
        "simdgroup_multiply_accumulate", "make_filled_simdgroup_matrix")},
    **{n: "quadgroup functions" for n in (
        "quad_sum", "quad_max", "quad_min", "quad_product", "quad_broadcast", "quad_shuffle",
        "quad_shuffle_up", "quad_shuffle_down", "quad_shuffle_xor", "quad_all", "quad_any",
        "quad_ballot", "quad_prefix_exclusive_sum", "quad_prefix_inclusive_sum")},
    **{n: "simd votes" for n in ("simd_ballot", "simd_vote", "simd_active_threads_mask")},
    **{n: "fill shuffles" for n in ("simd_shuffle_and_fill_down", "simd_shuffle_and_fill_up")},
    **{n: "textures and samplers" for n in (
        "texture1d", "texture2d", "texture3d", "texture_buffer", "sampler", "depth2d")},
    **{n: "function constants" for n in ("function_constant",)},
    **{n: "imageblocks" for n in ("imageblock", "threadgroup_imageblock")},
    **{n: "complex numbers" for n in ("complex64_t",)},
}


def compat_identifiers() -> list[str]:
    """The MSL / MLX names metal_compat.h defines for kernel code (qualified where MSL
    qualifies them: ``metal::exp``, ``metal::fast::exp``; macros in capitals)."""
    math = ("exp", "exp2", "exp10", "log", "log2", "log10", "sqrt", "rsqrt", "sin", "cos",
            "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "tanh", "asinh", "acosh",
            "atanh", "pow", "powr", "floor", "ceil", "round", "rint", "trunc", "fract", "fabs",
            "abs", "fmod", "fmax", "fmin", "max", "min", "clamp", "saturate", "sign", "step",
            "copysign", "fdim", "fma", "mix", "select", "isnan", "isinf", "isfinite", "signbit",
            "divide", "dot")
    precise = ("exp", "exp2", "exp10", "log", "log2", "log10", "sqrt", "rsqrt", "sin", "cos",
               "tan", "tanh", "sinh", "cosh", "asin", "acos", "atan", "atan2", "pow", "powr",
               "fabs", "floor", "ceil", "round", "rint", "trunc", "fract", "fmax", "fmin",
               "max", "min", "clamp", "saturate", "divide")
    vectors = [f"{t}{n}" for t in ("float", "half", "bfloat", "int", "uint", "short", "ushort",
                                   "char", "uchar", "long", "ulong", "bool") for n in (2, 3, 4)]
    packed = [f"packed_{t}{n}" for t in ("float", "half") for n in (2, 3, 4)]
    simd = ("simd_sum", "simd_product", "simd_max", "simd_min", "simd_and", "simd_or",
            "simd_xor", "simd_broadcast", "simd_broadcast_first", "simd_shuffle",
            "simd_shuffle_down", "simd_shuffle_up", "simd_shuffle_xor",
            "simd_shuffle_rotate_down", "simd_shuffle_rotate_up", "simd_prefix_exclusive_sum",
            "simd_prefix_inclusive_sum", "simd_prefix_exclusive_product",
            "simd_prefix_inclusive_product", "simd_all", "simd_any", "simd_is_first")
    return [
        "half", "bfloat", "float16_t", "bfloat16_t", "uint", "ushort", "uchar", "ulong",
        *vectors, *packed, "vec",
        "threadgroup_barrier", "simdgroup_barrier", "mem_flags", *simd,
        *(f"metal::{m}" for m in math),
        *(f"metal::precise::{m}" for m in precise),
        *(f"metal::fast::{m}" for m in precise),
        "metal::numeric_limits", "as_type",
        "metal::is_floating_point_v", "metal::is_integral_v", "metal::is_same_v",
        "metal::enable_if_t", "metal::conditional_t",
        # MLX (mlx/backend/metal/kernels/utils.h)
        "Limits", "WorkPerThread", "ceildiv", "elem_to_loc", "elem_to_loc_1", "elem_to_loc_2",
        "elem_to_loc_3", "log1p", "METAL_FUNC", "MLX_MTL_PRAGMA_UNROLL",
    ]


# ---------------------------------------------------------------------------------------
# The source MLX generates

@dataclass
class _Generated:
    kernel_name: str
    source: str                # exactly what MLX would compile (after its utils header)
    args: list[str] = field(default_factory=list)  # the harness's C++ argument per parameter
    template_inst: str = ""    # `<float, 4, true>` for the harness's call
    mlx_template: str = ""     # `<float, 4, 1>` as MLX writes it


def _template_def(template: list) -> tuple[str, str, str, str]:
    """(MLX's `template <...>` line, MLX's name suffix, the C++ instantiation `<...>`, MLX's
    spelling of the instantiation)."""
    if not template:
        return "", "", "", ""
    kinds, mlx_vals, cpp_vals = [], [], []
    for name, value in template:
        if isinstance(value, (bool, np.bool_)):
            kinds.append(f"bool {name}")
            mlx_vals.append("1" if value else "0")  # MLX streams a bool as 0/1
            cpp_vals.append("true" if value else "false")
        elif isinstance(value, (int, np.integer)):
            kinds.append(f"int {name}")
            mlx_vals.append(str(int(value)))
            cpp_vals.append(str(int(value)))
        else:
            kinds.append(f"typename {name}")
            tstr = _type_string(value)
            mlx_vals.append(tstr)
            cpp_vals.append(tstr)
    template_def = "<" + ", ".join(mlx_vals) + ">"
    # make_template_hash: '<' and '>' -> '_', ", " -> '_', and the last character dropped.
    suffix = template_def.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
    return ("template <" + ", ".join(kinds) + ">\n", "_" + suffix,
            "<" + ", ".join(cpp_vals) + ">", template_def)


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _type_string(dtype) -> str:
    name = _dtype_name(dtype)
    if name == "complex64":
        raise MetalEmulatorError("complex64 arrays are not supported by the Metal emulator")
    if name not in _DTYPES:
        raise MetalEmulatorError(f"dtype {dtype} is not supported by the Metal emulator")
    return _DTYPES[name][0]


@dataclass
class _Input:
    name: str
    array: np.ndarray     # row-contiguous storage (bfloat16 as uint16 bits)
    type_string: str


def _generate(name, output_names, source, header, inputs: list[_Input], output_dtypes,
              template) -> _Generated:
    """Mirror of MLX's write_signature (and of how the kernel name is formed)."""
    tmpl_line, tmpl_suffix, tmpl_inst, mlx_template = _template_def(template)
    kernel_name = "custom_kernel_" + name + tmpl_suffix
    for x in inputs:
        kernel_name += "_" + x.type_string
        if x.array.ndim == 0:
            kernel_name += "s"
        elif x.array.size < _MAX_CONSTANT_ARRAY_SIZE:
            kernel_name += "c"
    out_types = [_type_string(d) for d in output_dtypes]
    for t in out_types:
        kernel_name += "_" + t

    attributes = []
    for attr, mtype, expr in _ATTRIBUTES:
        if attr in source:
            if expr is None:
                raise MetalEmulatorError(
                    f"the Metal attribute '{attr}' (used in the source of kernel '{name}') is "
                    "not supported by the Metal emulator")
            attributes.append((attr, mtype, expr))

    args: list[str] = []
    lines = [header, tmpl_line, "[[kernel]] void ", kernel_name, "(\n"]
    index = 0
    for x in inputs:
        location = "constant" if x.array.size < _MAX_CONSTANT_ARRAY_SIZE else "device"
        ref = "&" if x.array.ndim == 0 else "*"
        lines.append(f"  const {location} {x.type_string}{ref} {x.name} [[buffer({index})]],\n")
        getter = "arg_ref" if x.array.ndim == 0 else "arg_ptr"
        args.append(f"sts_emu::{getter}<{x.type_string}>(L, {index})")
        index += 1
        if x.array.ndim > 0:
            for suffix, decl, getter, ctype in (
                    ("_shape", "const constant int*", "arg_ptr", "int"),
                    ("_strides", "const constant int64_t*", "arg_ptr", "int64_t"),
                    ("_ndim", "const constant int&", "arg_ref", "int")):
                if x.name + suffix in source:
                    lines.append(f"  {decl} {x.name}{suffix} [[buffer({index})]],\n")
                    args.append(f"sts_emu::{getter}<{ctype}>(L, {index})")
                    index += 1
    for i, (oname, otype) in enumerate(zip(output_names, out_types)):
        lines.append(f"  device {otype}* {oname} [[buffer({index})]]")
        args.append(f"sts_emu::arg_ptr<{otype}>(L, {index})")
        last = i == len(output_names) - 1 and not attributes
        lines.append(") {\n" if last else ",\n")
        index += 1
    for i, (attr, mtype, expr) in enumerate(attributes):
        lines.append(f"  {mtype} {attr} [[{attr}]]")
        lines.append(") {\n" if i == len(attributes) - 1 else ",\n")
        args.append(expr)
    lines += [source, "\n}\n"]
    return _Generated(kernel_name, "".join(lines), args, tmpl_inst, mlx_template)


def _mlx_instantiation(gen: _Generated) -> str:
    """The explicit instantiation MLX appends for a templated kernel (shown when verbose)."""
    if not gen.mlx_template:
        return ""
    inst = gen.kernel_name + gen.mlx_template
    return (f'\ntemplate [[host_name("{gen.kernel_name}")]] [[kernel]] decltype({inst}) '
            f'{inst};\n')


# ---------------------------------------------------------------------------------------
# Metal -> C++ rewriting (token based; every line keeps its number)

_TOKEN_RE = re.compile(r"""
    (?P<nl>\n)
  | (?P<ws>[ \t\r\f\v]+|\\\n)
  | (?P<comment>//[^\n]*|/\*.*?\*/)
  | (?P<string>"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')
  | (?P<number>\.?\d(?:[eEpP][+-]|[\w.'])*)
  | (?P<ident>[A-Za-z_]\w*)
  | (?P<punct>::|.)
""", re.S | re.X)

_SPACES = ("device", "constant", "threadgroup", "thread")
_BUILTIN_TYPE_WORDS = {"unsigned", "signed", "short", "long", "int", "char", "float", "double",
                       "bool", "void"}
# C++ attributes that stay; every other [[...]] is a Metal attribute and is dropped.
_CXX_ATTRIBUTES = {"maybe_unused", "nodiscard", "fallthrough", "likely", "unlikely",
                   "noreturn", "deprecated", "gnu"}
# Barriers and simd collectives: the rewriter passes each call its call site.
_SITE_FUNCTIONS = {
    "threadgroup_barrier", "simdgroup_barrier", "simd_sum", "simd_product", "simd_max",
    "simd_min", "simd_and", "simd_or", "simd_xor", "simd_broadcast", "simd_broadcast_first",
    "simd_shuffle", "simd_shuffle_down", "simd_shuffle_up", "simd_shuffle_xor",
    "simd_shuffle_rotate_down", "simd_shuffle_rotate_up", "simd_prefix_exclusive_sum",
    "simd_prefix_inclusive_sum", "simd_prefix_exclusive_product",
    "simd_prefix_inclusive_product", "simd_all", "simd_any", "simd_is_first"}
_HALF_LITERAL = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?P<suffix>[hH]|bf)")
_PRAGMA_RE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+(?:unroll|nounroll|clang|METAL|once)\b.*$",
                        re.M)
_INCLUDE_RE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*([<\"][^>\"]*[>\"]).*$", re.M)


class _Unsupported(Exception):
    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


class _Rewriter:
    """Rewrites the Metal-only constructs of a kernel source into C++ for metal_compat.h."""

    def __init__(self, text: str):
        text = _PRAGMA_RE.sub("", text)  # unroll hints: g++ would warn about clang's pragmas
        text = _INCLUDE_RE.sub(self._include, text)
        self.toks: list[tuple[str, str, int, int]] = []  # (kind, text, line, column)
        line, line_start = 1, 0
        for m in _TOKEN_RE.finditer(text):
            self.toks.append((m.lastgroup, m.group(), line, m.start() - line_start + 1))
            newlines = m.group().count("\n")
            if newlines:
                line += newlines
                line_start = m.start() + m.group().rindex("\n") + 1
        self.sig = [i for i, t in enumerate(self.toks) if t[0] not in ("nl", "ws", "comment")]
        self.edits: list[tuple[int, int, str]] = []  # (first sig index, end sig index, text)

    @staticmethod
    def _include(m: re.Match) -> str:
        what = m.group(1)
        if re.fullmatch(r"<metal_\w+>", what):
            return ""  # the MSL standard headers: metal_compat.h stands in for them
        line = m.string.count("\n", 0, m.start()) + 1
        raise _Unsupported(f"#include {what} (only <metal_*> headers are provided)", line)

    # -- token access
    def t(self, k: int) -> str:
        return self.toks[self.sig[k]][1] if 0 <= k < len(self.sig) else ""

    def kind(self, k: int) -> str:
        return self.toks[self.sig[k]][0] if 0 <= k < len(self.sig) else ""

    def line(self, k: int) -> int:
        return self.toks[self.sig[min(k, len(self.sig) - 1)]][2] if self.sig else 1

    def site(self, k: int) -> int:
        """The call site the runtime reports: line * 4096 + column."""
        _, _, line, col = self.toks[self.sig[k]]
        return line * 4096 + min(col, 4095)

    def is_ident(self, k: int) -> bool:
        return self.kind(k) == "ident"

    def text(self, a: int, b: int) -> str:
        return " ".join(self.t(j) for j in range(a, b))

    def edit(self, a: int, b: int, text: str) -> None:
        self.edits.append((a, b, text))

    # -- skipping balanced brackets
    def skip_group(self, k: int, open_: str, close: str) -> int:
        depth = 0
        while k < len(self.sig):
            x = self.t(k)
            if x == open_:
                depth += 1
            elif x == close:
                depth -= 1
                if depth == 0:
                    return k + 1
            k += 1
        raise _Unsupported(f"unbalanced '{open_}'", self.line(k))

    def skip_angles(self, k: int) -> int | None:
        depth = paren = 0
        while k < len(self.sig):
            x = self.t(k)
            if x in ("(", "[", "{"):
                paren += 1
            elif x in (")", "]", "}"):
                paren -= 1
                if paren < 0:
                    return None
            elif paren == 0 and x == "<":
                depth += 1
            elif paren == 0 and x == ">":
                depth -= 1
                if depth == 0:
                    return k + 1
            elif x == ";":
                return None
            k += 1
        return None

    def parse_type(self, k: int) -> tuple[int, str, bool] | None:
        """A type after an address-space keyword: (end, text without cv, has const)."""
        const = False
        while self.t(k) in ("const", "volatile"):
            const |= self.t(k) == "const"
            k += 1
        start = k
        if self.t(k) == "typename":
            k += 1
        if self.t(k) in _BUILTIN_TYPE_WORDS:
            while self.t(k) in _BUILTIN_TYPE_WORDS:
                k += 1
        else:
            if self.t(k) == "::":
                k += 1
            if not self.is_ident(k):
                return None
            k += 1
            while True:
                if self.t(k) == "<":
                    end = self.skip_angles(k)
                    if end is None:
                        return None
                    k = end
                if self.t(k) == "::" and self.is_ident(k + 1):
                    k += 2
                    continue
                break
        type_text = self.text(start, k)
        while self.t(k) in ("const", "volatile"):
            const |= self.t(k) == "const"
            k += 1
        return k, type_text, const

    # -- the rules
    def run(self) -> str:
        k = 0
        while k < len(self.sig):
            k = self.visit(k)
        return self.render()

    def visit(self, k: int) -> int:
        x, kind = self.t(k), self.kind(k)
        if x == "[" and self.t(k + 1) == "[":
            return self.attribute(k)
        if kind == "ident":
            if x in _UNSUPPORTED:
                raise _Unsupported(f"'{x}' ({_UNSUPPORTED[x]})", self.line(k))
            if x in _SPACES:
                return self.address_space(k)
            if x in _SITE_FUNCTIONS and self.t(k + 1) == "(" and self.t(k - 1) != ".":
                close = self.skip_group(k + 1, "(", ")") - 1
                sep = "" if close == k + 2 else ", "
                self.edit(close, close + 1, f"{sep}{self.site(k)})")
            if x == "_Pragma" and self.t(k + 1) == "(" and self.kind(k + 2) == "string" \
                    and self.t(k + 3) == ")":
                self.edit(k, k + 4, "")  # _Pragma("clang loop unroll(full)"): hints g++ lacks
                return k + 4
            if x == "kernel" and self.t(k + 1) == "void":
                self.edit(k, k + 1, "")
            elif x == "reinterpret_cast" and self.t(k + 1) == "<" and (
                    self.t(k + 2) in ("device", "constant")
                    or (self.t(k + 2) == "const" and self.t(k + 3) in ("device", "constant"))):
                self.edit(k, k + 1, "sts_emu::ptr_cast")
        elif kind == "number" and (m := _HALF_LITERAL.fullmatch(x)):
            suffix = m.group("suffix")  # 1.5h, 1.5bf: no such literals in C++
            self.edit(k, k + 1, f"{'bfloat' if suffix == 'bf' else 'half'}({x[:-len(suffix)]})")
        return k + 1

    def attribute(self, k: int) -> int:
        end = self.skip_group(k, "[", "]")
        word = self.t(k + 2)
        if word in _UNSUPPORTED:
            raise _Unsupported(f"[[{word}]] ({_UNSUPPORTED[word]})", self.line(k))
        if word not in _CXX_ATTRIBUTES:
            self.edit(k, end, "")
        return end

    def address_space(self, k: int) -> int:
        kw = self.t(k)
        if kw == "thread":
            self.edit(k, k + 1, "")
            return k + 1
        if kw == "constant" and self.t(k + 1) == "constexpr":
            self.edit(k, k + 1, "")
            return k + 1
        parsed = self.parse_type(k + 1)
        if parsed is None:
            raise _Unsupported(f"'{kw}' not followed by a type the emulator can parse",
                               self.line(k))
        end, type_text, post_const = parsed
        pre_const = self.t(k - 1) == "const"
        after = self.t(end)
        if after == "*":
            if self.t(end + 1) == "*" or self.t(end + 1) in _SPACES:
                raise _Unsupported(f"a pointer to a pointer in the {kw} address space",
                                   self.line(k))
            if kw == "threadgroup":
                self.edit(k, k + 1, "")  # a plain pointer into the threadgroup arena
                return k + 1
            cls = "cdptr" if (pre_const or post_const or kw == "constant") else "dptr"
            self.edit(k - 1 if pre_const else k, end + 1, f"sts_emu::{cls}<{type_text}>")
            return end + 1
        if after == "&":
            self.edit(k, k + 1, "")  # a reference needs no address space
            return k + 1
        if kw == "threadgroup" and self.is_ident(end):
            return self.threadgroup_declaration(k, end, type_text, post_const or pre_const)
        if kw == "constant" and self.is_ident(end):
            # A program-scope constant: `constant T x = ...;` is const in MSL.
            already = self.t(k - 1) in ("const", "constexpr") or post_const
            self.edit(k, k + 1, "" if already else "const")
            return k + 1
        if kw == "device" and self.is_ident(end):
            raise _Unsupported("a 'device' variable that is not a pointer or reference",
                               self.line(k))
        self.edit(k, k + 1, "")
        return k + 1

    def threadgroup_declaration(self, k: int, name_k: int, type_text: str, const: bool) -> int:
        name = self.t(name_k)
        j = name_k + 1
        dims = []
        while self.t(j) == "[":
            close = self.skip_group(j, "[", "]")
            dims.append(self.text(j + 1, close - 1))
            j = close
        if self.t(j) != ";":
            raise _Unsupported(
                f"threadgroup declaration of '{name}' with an initializer or several "
                "declarators", self.line(k))
        if const:
            raise _Unsupported(f"const threadgroup variable '{name}'", self.line(k))
        arr = "".join(f"[{d}]" for d in dims)
        slot = f'sts_emu::threadgroup_var<{type_text}{arr}, __COUNTER__>("{name}")'
        decl = f"{type_text} (&{name}){arr}" if dims else f"{type_text}& {name}"
        self.edit(k, j, f"[[maybe_unused]] {decl} = {slot}")
        return j

    def render(self) -> str:
        out = []
        edits = sorted(self.edits)
        e = 0
        pos = 0  # next full-token index to copy
        while e < len(edits):
            a, b, text = edits[e]
            if e and a < edits[e - 1][1]:
                raise AssertionError(f"overlapping rewrites at line {self.line(a)}")
            first = self.sig[a] if a < len(self.sig) else len(self.toks)
            last = self.sig[b - 1] if b - 1 < len(self.sig) else len(self.toks) - 1
            out.extend(t[1] for t in self.toks[pos:first])
            removed = "".join(t[1] for t in self.toks[first:last + 1])
            out.append(text + "\n" * removed.count("\n"))
            pos = last + 1
            e += 1
        out.extend(t[1] for t in self.toks[pos:])
        return "".join(out)


def _rewrite(text: str, kernel: str) -> str:
    try:
        return _Rewriter(text).run()
    except _Unsupported as e:
        lines = text.split("\n")
        where = lines[e.line - 1].strip() if 0 < e.line <= len(lines) else ""
        raise MetalEmulatorError(
            f"Metal kernel '{kernel}' uses {e} at line {e.line} of the generated source, "
            f"which the Metal emulator does not support: `{where}`") from None


# ---------------------------------------------------------------------------------------
# Compiling and caching

def _cache_dir() -> Path:
    root = os.environ.get("STS_EDGE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "sts-edge"
    path = base / "metal_emulator"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _runtime_flags() -> tuple[str, ...]:
    if os.environ.get("STS_EDGE_METAL_EMU_UCONTEXT"):
        return _RUNTIME_FLAGS + ("-DSTS_EMU_UCONTEXT",)
    return _RUNTIME_FLAGS


def _compile(args: list[str], what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, check=False,
                              cwd=_cache_dir())
    except FileNotFoundError:
        raise MetalEmulatorError(f"{_cxx()} is needed to {what} and was not found") from None


def _atomic_build(target: Path, build) -> None:
    """Builds into a temporary name and renames, so concurrent processes never see half a
    file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=target.suffix)
    os.close(fd)
    try:
        build(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_runtime_lib: Path | None = None


def _runtime_library() -> Path:
    """The scheduler, built once into a shared library that kernel libraries link to."""
    global _runtime_lib
    flags = _runtime_flags()
    key = _digest(_RUNTIME_CPP.read_text(), _RUNTIME_H.read_text(), " ".join(flags), _cxx())
    target = _cache_dir() / f"runtime-{key}.so"
    if _runtime_lib == target and target.exists():
        return target
    if not target.exists():
        def build(tmp):
            r = _compile([_cxx(), *flags, str(_RUNTIME_CPP), "-o", tmp, "-ldl"],
                         "build the Metal emulator's runtime")
            if r.returncode != 0:
                raise MetalEmulatorError("the Metal emulator's runtime does not compile:\n"
                                         + r.stderr[-3000:])
        _atomic_build(target, build)
    _runtime_lib = target
    return target


@dataclass
class _Library:
    path: Path
    entry: object
    file_name: str  # the name kernel lines carry in g++'s messages and debug info


_libraries: dict[str, _Library] = {}       # by the hash of everything g++ sees
_by_source: dict[tuple, _Library] = {}     # by the generated kernel and its harness
_lock = threading.Lock()


def _translation_unit(gen: _Generated, file_name: str) -> tuple[str, str]:
    """(C++ text, the rewritten kernel text)."""
    rewritten = _rewrite(gen.source, file_name[:-len(".metal")])
    call_args = ",\n      ".join(gen.args)
    tu = (f'#include "{_COMPAT_H}"\n'
          f'#line 1 "{file_name}"\n'
          f"{rewritten}"
          f'\n#line 1 "sts_emu_harness.cpp"\n'
          "namespace {\n"
          "void sts_emu_thread(const sts_emu::Launch& L, const sts_emu::ThreadCtx& t) {\n"
          "  (void)L;\n  (void)t;\n"
          f"  {gen.kernel_name}{gen.template_inst}(\n      {call_args});\n"
          "}\n"
          "}  // namespace\n"
          'extern "C" __attribute__((visibility("default"))) '
          "int sts_emu_entry(sts_emu::Launch* L) {\n"
          "  return sts_emu::run(L, &sts_emu_thread);\n"
          "}\n")
    return tu, rewritten


def _library(gen: _Generated, name: str) -> _Library:
    """The compiled kernel: from this process's cache, the cache folder, or g++."""
    memo = (name, gen.source, gen.kernel_name, gen.template_inst,
            tuple(gen.args), os.environ.get("STS_EDGE_METAL_EMU_UCONTEXT"))
    if memo not in _by_source:
        _by_source[memo] = _build_library(gen, name)
    return _by_source[memo]


def _build_library(gen: _Generated, name: str) -> _Library:
    file_name = f"{name}.metal"
    tu, rewritten = _translation_unit(gen, file_name)
    runtime = _runtime_library()
    key = _digest(tu, _COMPAT_H.read_text(), _RUNTIME_H.read_text(), runtime.name,
                  " ".join(_KERNEL_FLAGS), _cxx())
    if key in _libraries:
        return _libraries[key]
    cache = _cache_dir()
    target = cache / f"kernel-{key}.so"
    if not target.exists():
        cpp = cache / f"kernel-{key}.cpp"
        _atomic_build(cpp, lambda tmp: Path(tmp).write_text(tu))

        # Linked to the runtime by its full path: the loader shares one copy between kernels.
        def build(tmp):
            r = _compile([_cxx(), *_KERNEL_FLAGS, str(cpp), str(runtime), "-o", tmp],
                         "compile Metal kernels for the emulator")
            if r.returncode != 0:
                raise MetalEmulatorError(_compile_error(name, r.stderr, gen.source, rewritten,
                                                        file_name))
        _atomic_build(target, build)
    lib = ctypes.CDLL(str(target))
    if lib.sts_emu_abi_version() != _ABI:
        raise MetalEmulatorError(f"{target} was built for another emulator ABI")
    entry = lib.sts_emu_entry
    entry.argtypes = [ctypes.c_void_p]
    entry.restype = ctypes.c_int
    _libraries[key] = _Library(target, entry, file_name)
    return _libraries[key]


def _compile_error(name: str, stderr: str, source: str, rewritten: str, file_name: str) -> str:
    lines = stderr.splitlines()
    first = next((i for i, ln in enumerate(lines) if re.search(r": (?:fatal )?error: ", ln)), 0)
    shown = lines[max(0, first - 3):first + 12]
    msg = [f"g++ could not compile Metal kernel '{name}' (emulator):", *shown]
    m = re.search(re.escape(file_name) + r":(\d+):(?:\d+:)? (?:fatal )?error", stderr) or \
        re.search(re.escape(file_name) + r":(\d+):", stderr)
    if m:
        n = int(m.group(1))
        src, rew = source.split("\n"), rewritten.split("\n")
        if 0 < n <= len(src):
            msg.append(f"offending line {n} of the generated kernel source:\n    {src[n - 1]}")
            if n <= len(rew) and rew[n - 1].strip() != src[n - 1].strip():
                msg.append(f"which the emulator rewrote to:\n    {rew[n - 1]}")
    return "\n".join(msg)


# ---------------------------------------------------------------------------------------
# Running

class _Buffer(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("nbytes", ctypes.c_int64),
                ("elem_size", ctypes.c_int64), ("name", ctypes.c_char_p),
                ("space", ctypes.c_char_p), ("type", ctypes.c_char_p)]


class _Launch(ctypes.Structure):
    _fields_ = [("nbufs", ctypes.c_int32), ("bufs", ctypes.POINTER(_Buffer)),
                ("grid", ctypes.c_uint32 * 3), ("tg", ctypes.c_uint32 * 3),
                ("seed", ctypes.c_uint64), ("err", ctypes.c_void_p), ("err_cap", ctypes.c_int32),
                ("pad_", ctypes.c_int32), ("err_pc", ctypes.c_uint64),
                ("switches", ctypes.c_uint64)]


def _mx():
    import mlx.core as mx
    return mx


def _aligned_copy(arr: np.ndarray) -> np.ndarray:
    """A row-contiguous copy at a 64-byte aligned address: Metal buffers are page aligned, and
    accesses are checked for Metal's alignment (numpy only promises 16 bytes)."""
    raw = np.empty(arr.nbytes + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start:start + arr.nbytes].view(arr.dtype).reshape(arr.shape)
    out[...] = arr
    return out


def _to_input(name: str, value) -> _Input:
    mx = _mx()
    if isinstance(value, np.ndarray):
        value = mx.array(value)
    elif not isinstance(value, mx.array):
        value = mx.array(value)  # a Python scalar, as MLX accepts
    dname = _dtype_name(value.dtype)
    tstr = _type_string(value.dtype)
    if dname == "bfloat16":
        value = value.view(mx.uint16)
    arr = _aligned_copy(np.asarray(value))
    return _Input(name, arr, tstr)


def _output_array(shape, dtype, init_value) -> np.ndarray:
    mx = _mx()
    dname = _dtype_name(dtype)
    _type_string(dtype)
    storage = _DTYPES[dname][1]
    if init_value is None:
        out = _aligned_copy(np.empty(tuple(shape), dtype=storage))
        out.reshape(-1).view(np.uint8).fill(0xFF)  # poison: NaN for floats, all ones for ints
        return out
    filled = mx.full(tuple(shape), init_value, dtype=dtype)
    if dname == "bfloat16":
        filled = filled.view(mx.uint16)
    return _aligned_copy(np.asarray(filled))


def _from_output(arr: np.ndarray, dtype):
    mx = _mx()
    out = mx.array(arr)
    return out.view(mx.bfloat16) if _dtype_name(dtype) == "bfloat16" else out


_SITE_MARK = re.compile(r"@S(\d+)@")  # a call site from the runtime: line * 4096 + column


def _explain(message: str, gen: _Generated, lib: _Library, err_pc: int) -> str:
    src = gen.source.split("\n")

    def line_text(n: int, col: str = "") -> str:
        return f"line {n}{col}: `{src[n - 1].strip()}`" if 0 < n <= len(src) else f"line {n}"

    sites = {int(m) for m in _SITE_MARK.findall(message)}

    def site_text(m: re.Match) -> str:
        site = int(m.group(1))
        line, col = site >> 12, site & 4095
        # Two sites on one line (`a = simd_sum(a); b = simd_max(b);`) need the column too.
        twin = any(s >> 12 == line and s != site for s in sites)
        return line_text(line, f" column {col}" if twin else "")

    message = _SITE_MARK.sub(site_text, message)
    if err_pc:
        n = _pc_line(lib, err_pc)
        if n:
            message += f"; at {line_text(n)}"
    return message


def _pc_line(lib: _Library, pc: int) -> int | None:
    """The kernel line of a code offset, from the library's line tables (addr2line)."""
    tool = shutil.which("addr2line")
    if not tool:
        return None
    try:
        r = subprocess.run([tool, "-i", "-e", str(lib.path), hex(pc - 1)], capture_output=True,
                           text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    for ln in r.stdout.splitlines():
        m = re.search(r"(?:^|/)" + re.escape(lib.file_name) + r":(\d+)", ln.strip())
        if m:
            return int(m.group(1))
    return None


class _Kernel:
    """What metal_kernel returns: call it like the callable of mx.fast.metal_kernel."""

    def __init__(self, name, input_names, output_names, source, header, ensure_row_contiguous,
                 atomic_outputs):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous  # inputs are always copied here
        self.atomic_outputs = atomic_outputs

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup,
                 template=None, init_value=None, verbose=False, stream=None,
                 seed: int | None = None):
        del stream  # the emulator runs on the CPU, synchronously
        for got, want, what in ((len(inputs), len(self.input_names), "inputs"),
                                (len(output_shapes), len(self.output_names), "output_shapes"),
                                (len(output_dtypes), len(self.output_names), "output_dtypes")):
            if got != want:
                raise ValueError(f"[metal_kernel] Expected `{what}` to have size {want} but got "
                                 f"size {got}.")
        if self.atomic_outputs:
            raise NotImplementedError("the Metal emulator does not support atomic_outputs=True "
                                      "(atomic<T> outputs and the atomic_* functions)")
        grid, threadgroup = tuple(int(v) for v in grid), tuple(int(v) for v in threadgroup)
        if len(grid) != 3 or len(threadgroup) != 3:
            raise ValueError("[metal_kernel] grid and threadgroup must have three dimensions")
        if threadgroup[0] * threadgroup[1] * threadgroup[2] > 1024:
            raise ValueError(f"Thread group size ({threadgroup[0] * threadgroup[1] * threadgroup[2]}"
                             ") is greater than  the maximum allowed threads per threadgroup "
                             "(1024).")
        if min(grid) < 0 or min(threadgroup) <= 0:
            raise ValueError("[metal_kernel] grid must be non-negative and threadgroup positive")

        ins = [_to_input(n, x) for n, x in zip(self.input_names, inputs)]
        gen = _generate(self.name, self.output_names, self.source, self.header, ins,
                        output_dtypes, list(template or []))
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{gen.source}"
                  f"{_mlx_instantiation(gen)}\n```")
        outs = [_output_array(s, d, init_value) for s, d in zip(output_shapes, output_dtypes)]
        with _lock:
            lib = _library(gen, self.name)
            self._run(lib, gen, ins, outs, output_dtypes, grid, threadgroup,
                      _DEFAULT_SEED if seed is None else int(seed))
        return [_from_output(o, d) for o, d in zip(outs, output_dtypes)]

    def _run(self, lib, gen, ins, outs, output_dtypes, grid, threadgroup, seed):
        arrays: list[tuple[np.ndarray, str, str, str]] = []  # (array, name, space, type)
        for x in ins:
            space = "constant" if x.array.size < _MAX_CONSTANT_ARRAY_SIZE else "device"
            arrays.append((x.array, x.name, space, x.type_string))
            if x.array.ndim > 0:
                shape = np.array(x.array.shape, dtype=np.int32)
                strides = np.array([s // x.array.itemsize for s in x.array.strides], np.int64)
                for suffix, arr, tstr in (("_shape", shape, "int"), ("_strides", strides, "int64_t"),
                                          ("_ndim", np.array([x.array.ndim], np.int32), "int")):
                    if x.name + suffix in self.source:
                        arrays.append((_aligned_copy(arr), x.name + suffix, "constant", tstr))
        for o, oname, d in zip(outs, self.output_names, output_dtypes):
            arrays.append((o, oname, "device", _type_string(d)))
        keep = []  # the bytes the C side points to must outlive the call
        bufs = (_Buffer * len(arrays))()
        for i, (arr, bname, space, tstr) in enumerate(arrays):
            names = (bname.encode(), space.encode(), tstr.encode())
            keep.append(names)
            bufs[i] = _Buffer(arr.ctypes.data, arr.nbytes, arr.itemsize, *names)
        err = ctypes.create_string_buffer(_ERR_CAP)
        launch = _Launch(len(arrays), bufs, (ctypes.c_uint32 * 3)(*grid),
                         (ctypes.c_uint32 * 3)(*threadgroup), seed & (2**64 - 1),
                         ctypes.cast(err, ctypes.c_void_p), _ERR_CAP, 0, 0, 0)
        rc = lib.entry(ctypes.byref(launch))
        if rc != 0:
            message = err.value.decode(errors="replace")
            raise MetalEmulatorError(f"Metal kernel '{self.name}': "
                                     + _explain(message, gen, lib, launch.err_pc))


def metal_kernel(name: str, input_names, output_names, source: str, header: str = "",
                 ensure_row_contiguous: bool = True, atomic_outputs: bool = False,
                 compile_options=None):
    """Same signature and return as ``mx.fast.metal_kernel``; the returned callable runs
    the kernel on the CPU (see the module docstring). It takes one keyword more than MLX's:
    ``seed`` (int or None) picks the scheduling order; None is a fixed default, so runs are
    reproducible."""
    del compile_options  # math is IEEE here whatever the mode
    return _Kernel(name, input_names, output_names, source, header, ensure_row_contiguous,
                   atomic_outputs)
