// metal_compat.h: the part of the Metal Shading Language and of MLX's kernel utilities that
// kernels written for mx.fast.metal_kernel use, in C++17, for the emulator (see __init__.py).
//
// Kernel-facing names live where MSL and MLX put them (namespace metal, brought in with
// `using namespace metal;` as MLX's headers do, and MLX's own names at global scope);
// everything else is in namespace sts_emu. The Python side rewrites the kernel text first:
// `device T*` / `constant T*` become the bounds-checked sts_emu::dptr<T> / cdptr<T>,
// `threadgroup` declarations become references into per-threadgroup poisoned memory, `thread`
// disappears and [[attributes]] are dropped.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <limits>
#include <type_traits>

#include "runtime.h"

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;

#define METAL_FUNC inline
#define MLX_MTL_PRAGMA_UNROLL

namespace sts_emu {

// ---- half and bfloat16: 16-bit storage, float arithmetic, round to nearest even ------------

constexpr uint16_t float_to_half_bits(float f) {
  uint32_t x = __builtin_bit_cast(uint32_t, f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u)  // inf, NaN (kept quiet, payload's top bits kept)
    return (uint16_t)(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u | ((ax >> 13) & 0x3FFu) : 0u));
  if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half, in units of 2^-24
    float v = __builtin_bit_cast(float, ax) * 16777216.0f;
    float r = (v + 8388608.0f) - 8388608.0f;  // rounds to an integer, ties to even
    return (uint16_t)(sign | (uint32_t)r);
  }
  uint32_t m = ax - 0x38000000u;  // rebias the exponent (127 -> 15)
  m += 0xFFFu + ((m >> 13) & 1u);  // round to nearest even on the 13 dropped bits
  return (uint16_t)(sign | (m >> 13));
}

constexpr float half_bits_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1F) return __builtin_bit_cast(float, sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    float v = (float)m * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return __builtin_bit_cast(float, sign | ((e + 112u) << 23) | (m << 13));
}

constexpr uint16_t float_to_bfloat_bits(float f) {
  uint32_t x = __builtin_bit_cast(uint32_t, f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7FFFu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}

constexpr float bfloat_bits_to_float(uint16_t b) {
  return __builtin_bit_cast(float, (uint32_t)b << 16);
}

template <class T>
using if_integral = std::enable_if_t<std::is_integral<T>::value || std::is_enum<T>::value, int>;

// Tag-dispatched so that both types share one definition.
template <int Kind>
struct lowp {
  uint16_t bits;

  static constexpr uint16_t encode(float f) {
    return Kind == 0 ? float_to_half_bits(f) : float_to_bfloat_bits(f);
  }
  static constexpr float decode(uint16_t b) {
    return Kind == 0 ? half_bits_to_float(b) : bfloat_bits_to_float(b);
  }

  lowp() = default;  // uninitialised, like any Metal scalar
  constexpr lowp(float f) : bits(encode(f)) {}
  template <class D, std::enable_if_t<std::is_same<D, double>::value, int> = 0>
  constexpr lowp(D d) : bits(encode((float)d)) {}
  template <class I, if_integral<I> = 0>
  constexpr lowp(I i) : bits(encode((float)i)) {}
  constexpr lowp(lowp<1 - Kind> o) : bits(encode((float)o)) {}

  static constexpr lowp from_bits(uint16_t b) {
    lowp r{};
    r.bits = b;
    return r;
  }

  // Implicit to floating-point types only: an implicit path to int as well would make
  // `c ? h : 0` ambiguous.
  template <class F, std::enable_if_t<std::is_floating_point<F>::value, int> = 0>
  constexpr operator F() const {
    return (F)decode(bits);
  }
  template <class I, if_integral<I> = 0>
  explicit constexpr operator I() const {
    return (I)decode(bits);
  }
};

using half_t = lowp<0>;
using bfloat_t = lowp<1>;

template <class T>
struct is_lowp : std::false_type {};
template <int K>
struct is_lowp<lowp<K>> : std::true_type {};

// A scalar kernel type: arithmetic or half/bfloat.
template <class T>
constexpr bool is_scalar_v = std::is_arithmetic<T>::value || is_lowp<T>::value;

template <int K>
constexpr lowp<K> operator-(lowp<K> a) {
  return lowp<K>::from_bits((uint16_t)(a.bits ^ 0x8000u));
}
template <int K>
constexpr lowp<K> operator+(lowp<K> a) {
  return a;
}

// Metal's rules: half op half -> half; half op float -> float; half op int -> half.
// Exact-match overloads for every pairing, so the built-in operators (reachable through the
// conversion to float) never compete.
#define STS_EMU_LOWP_BINOP(op)                                                              \
  template <int K>                                                                         \
  constexpr lowp<K> operator op(lowp<K> a, lowp<K> b) {                                    \
    return lowp<K>((float)a op(float) b);                                                  \
  }                                                                                        \
  template <int K>                                                                         \
  constexpr float operator op(lowp<K> a, lowp<1 - K> b) {                                  \
    return (float)a op(float) b;                                                           \
  }                                                                                        \
  template <int K>                                                                         \
  constexpr float operator op(lowp<K> a, float b) {                                        \
    return (float)a op b;                                                                  \
  }                                                                                        \
  template <int K>                                                                         \
  constexpr float operator op(float a, lowp<K> b) {                                        \
    return a op(float) b;                                                                  \
  }                                                                                        \
  template <int K>                                                                         \
  constexpr float operator op(lowp<K> a, double b) {                                       \
    return (float)a op(float) b;                                                           \
  }                                                                                        \
  template <int K>                                                                         \
  constexpr float operator op(double a, lowp<K> b) {                                       \
    return (float)a op(float) b;                                                           \
  }                                                                                        \
  template <int K, class I, if_integral<I> = 0>                                            \
  constexpr lowp<K> operator op(lowp<K> a, I b) {                                          \
    return lowp<K>((float)a op(float) b);                                                  \
  }                                                                                        \
  template <int K, class I, if_integral<I> = 0>                                            \
  constexpr lowp<K> operator op(I a, lowp<K> b) {                                          \
    return lowp<K>((float)a op(float) b);                                                  \
  }                                                                                        \
  template <int K, class U, std::enable_if_t<is_scalar_v<U>, int> = 0>                     \
  constexpr lowp<K>& operator op##=(lowp<K>& a, U b) {                                     \
    return a = lowp<K>(a op b);                                                            \
  }                                                                                        \
  template <int K>                                                                         \
  constexpr float& operator op##=(float& a, lowp<K> b) {                                   \
    return a = a op(float) b;                                                              \
  }

STS_EMU_LOWP_BINOP(+)
STS_EMU_LOWP_BINOP(-)
STS_EMU_LOWP_BINOP(*)
STS_EMU_LOWP_BINOP(/)
#undef STS_EMU_LOWP_BINOP

#define STS_EMU_LOWP_CMP(op)                                                 \
  template <int K>                                                         \
  constexpr bool operator op(lowp<K> a, lowp<K> b) {                       \
    return (float)a op(float) b;                                           \
  }                                                                        \
  template <int K>                                                         \
  constexpr bool operator op(lowp<K> a, lowp<1 - K> b) {                   \
    return (float)a op(float) b;                                           \
  }                                                                        \
  template <int K, class U, std::enable_if_t<std::is_arithmetic<U>::value, int> = 0> \
  constexpr bool operator op(lowp<K> a, U b) {                             \
    return (float)a op b;                                                  \
  }                                                                        \
  template <int K, class U, std::enable_if_t<std::is_arithmetic<U>::value, int> = 0> \
  constexpr bool operator op(U a, lowp<K> b) {                             \
    return a op(float) b;                                                  \
  }

STS_EMU_LOWP_CMP(==)
STS_EMU_LOWP_CMP(!=)
STS_EMU_LOWP_CMP(<)
STS_EMU_LOWP_CMP(<=)
STS_EMU_LOWP_CMP(>)
STS_EMU_LOWP_CMP(>=)
#undef STS_EMU_LOWP_CMP

template <int K>
constexpr lowp<K>& operator++(lowp<K>& a) {
  return a = a + 1;
}
template <int K>
constexpr lowp<K>& operator--(lowp<K>& a) {
  return a = a - 1;
}
template <int K>
constexpr lowp<K> operator++(lowp<K>& a, int) {
  lowp<K> r = a;
  a = a + 1;
  return r;
}
template <int K>
constexpr lowp<K> operator--(lowp<K>& a, int) {
  lowp<K> r = a;
  a = a - 1;
  return r;
}

// ---- bounds-checked device / constant pointers -------------------------------------------

// Out of line and cold, so the check costs a compare and a branch; the return address lets
// Python name the kernel line (addr2line).
[[noreturn]] __attribute__((noinline, cold)) inline void out_of_bounds(const Buffer* b,
                                                                      uintptr_t addr,
                                                                      int64_t size,
                                                                      int64_t align) {
  fail_oob(b, reinterpret_cast<const void*>(addr), size, align, __builtin_return_address(0));
}

template <class T>
inline const Buffer* buffer_of(const T* raw) {
  if (!raw) return nullptr;
  const Buffer* b = find_buffer(raw);
  if (!b) fail_no_buffer(raw, __builtin_return_address(0));
  return b;
}

// `const device T*` / `constant T*`: the address (kept as an integer, so that stepping
// outside the buffer is not undefined behaviour) and the buffer it came from. Every access
// is checked against the buffer; arithmetic is free.
template <class T>
struct cdptr {
  uintptr_t a = 0;
  const Buffer* buf = nullptr;

  cdptr() = default;
  constexpr cdptr(std::nullptr_t) {}
  cdptr(const T* raw) : a(reinterpret_cast<uintptr_t>(raw)), buf(buffer_of(raw)) {}
  // Reinterpreting casts: (const device float4*)p.
  template <class U>
  explicit cdptr(const cdptr<U>& o) : a(o.a), buf(o.buf) {}

  // Checks that the whole element lies in the buffer and is aligned as Metal requires.
  const T& at(ptrdiff_t i) const {
    uintptr_t q = a + (uintptr_t)(i * (ptrdiff_t)sizeof(T));
    uintptr_t lo = buf ? reinterpret_cast<uintptr_t>(buf->data) : 1;
    uintptr_t hi = buf ? lo + (uintptr_t)buf->nbytes : 0;
    if (__builtin_expect(q < lo || q > hi - sizeof(T) || hi < sizeof(T) ||
                             (q & (alignof(T) - 1)) != 0,
                         0))
      out_of_bounds(buf, q, (int64_t)sizeof(T), (int64_t)alignof(T));
    return *reinterpret_cast<const T*>(q);
  }
  template <class I, if_integral<I> = 0>
  const T& operator[](I i) const {
    return at((ptrdiff_t)i);
  }
  const T& operator*() const { return at(0); }
  const T* operator->() const { return &at(0); }
  explicit operator bool() const { return a != 0; }

#define STS_EMU_PTR_ARITH(Self)                                                        \
  template <class I, if_integral<I> = 0>                                               \
  Self operator+(I i) const {                                                          \
    Self r = *this;                                                                    \
    r.a += (uintptr_t)((ptrdiff_t)i * (ptrdiff_t)sizeof(T));                           \
    return r;                                                                          \
  }                                                                                    \
  template <class I, if_integral<I> = 0>                                               \
  friend Self operator+(I i, const Self& p) {                                          \
    return p + i;                                                                      \
  }                                                                                    \
  template <class I, if_integral<I> = 0>                                               \
  Self operator-(I i) const {                                                          \
    Self r = *this;                                                                    \
    r.a -= (uintptr_t)((ptrdiff_t)i * (ptrdiff_t)sizeof(T));                           \
    return r;                                                                          \
  }                                                                                    \
  ptrdiff_t operator-(const cdptr<T>& o) const {                                       \
    return (ptrdiff_t)(this->a - o.a) / (ptrdiff_t)sizeof(T);                          \
  }                                                                                    \
  template <class I, if_integral<I> = 0>                                               \
  Self& operator+=(I i) {                                                              \
    this->a += (uintptr_t)((ptrdiff_t)i * (ptrdiff_t)sizeof(T));                       \
    return *this;                                                                      \
  }                                                                                    \
  template <class I, if_integral<I> = 0>                                               \
  Self& operator-=(I i) {                                                              \
    this->a -= (uintptr_t)((ptrdiff_t)i * (ptrdiff_t)sizeof(T));                       \
    return *this;                                                                      \
  }                                                                                    \
  Self& operator++() { return *this += 1; }                                            \
  Self& operator--() { return *this -= 1; }                                            \
  Self operator++(int) {                                                               \
    Self r = *this;                                                                    \
    *this += 1;                                                                        \
    return r;                                                                          \
  }                                                                                    \
  Self operator--(int) {                                                               \
    Self r = *this;                                                                    \
    *this -= 1;                                                                        \
    return r;                                                                          \
  }

  STS_EMU_PTR_ARITH(cdptr)
};

// `device T*`: the same, writable. Derives from cdptr<T> so that a template parameter
// `const device T*` (cdptr<T>) deduces T from a dptr<T> argument, as it would for pointers.
template <class T>
struct dptr : cdptr<T> {
  dptr() = default;
  constexpr dptr(std::nullptr_t) {}
  dptr(T* raw) : cdptr<T>(raw) {}
  template <class U>
  explicit dptr(const dptr<U>& o) {
    this->a = o.a;
    this->buf = o.buf;
  }

  template <class I, if_integral<I> = 0>
  T& operator[](I i) const {
    return const_cast<T&>(this->at((ptrdiff_t)i));
  }
  T& operator*() const { return const_cast<T&>(this->at(0)); }
  T* operator->() const { return const_cast<T*>(&this->at(0)); }

  STS_EMU_PTR_ARITH(dptr)
};
#undef STS_EMU_PTR_ARITH

#define STS_EMU_PTR_CMP(op)                                       \
  template <class T>                                             \
  bool operator op(const cdptr<T>& x, const cdptr<T>& y) {       \
    return x.a op y.a;                                           \
  }
STS_EMU_PTR_CMP(==)
STS_EMU_PTR_CMP(!=)
STS_EMU_PTR_CMP(<)
STS_EMU_PTR_CMP(<=)
STS_EMU_PTR_CMP(>)
STS_EMU_PTR_CMP(>=)
#undef STS_EMU_PTR_CMP
template <class T>
bool operator==(const cdptr<T>& x, std::nullptr_t) {
  return x.a == 0;
}
template <class T>
bool operator!=(const cdptr<T>& x, std::nullptr_t) {
  return x.a != 0;
}

// reinterpret_cast<device T*>(p) is rewritten to this.
template <class To, class From>
To ptr_cast(const From& p) {
  return To(p);
}

// ---- threadgroup memory ------------------------------------------------------------------

// One slot per declaration site (and type) per threadgroup, poisoned when first reached.
template <class T, int Site>
inline T& threadgroup_var(const char* name) {
  static const int key = new_threadgroup_key();
  return *static_cast<T*>(threadgroup_slot(key, sizeof(T), alignof(T), name));
}

// ---- kernel arguments (used by the generated harness) ------------------------------------

template <class T>
inline dptr<T> arg_ptr(const Launch& L, int i) {
  dptr<T> p;
  p.a = reinterpret_cast<uintptr_t>(L.bufs[i].data);
  p.buf = buffer_arg(L, i);
  return p;
}

template <class T>
inline const T& arg_ref(const Launch& L, int i) {
  return *static_cast<const T*>(L.bufs[i].data);
}

}  // namespace sts_emu

typedef sts_emu::half_t half;
typedef sts_emu::bfloat_t bfloat;
typedef half float16_t;
typedef bfloat bfloat16_t;

namespace metal {

// ---- vectors -----------------------------------------------------------------------------

template <class T, int N>
struct vec;

#define STS_EMU_VEC_COMMON(N)                                                           \
  vec() = default;                                                                      \
  template <class S, std::enable_if_t<sts_emu::is_scalar_v<S>, int> = 0>                \
  constexpr vec(S s) {                                                                  \
    for (int i = 0; i < N; i++) (*this)[i] = T(s);                                      \
  }                                                                                     \
  template <class U>                                                                    \
  explicit constexpr vec(const vec<U, N>& o) {                                          \
    for (int i = 0; i < N; i++) (*this)[i] = T(o[i]);                                   \
  }                                                                                     \
  constexpr T& operator[](int i) { return (&x)[i]; }                                    \
  constexpr const T& operator[](int i) const { return (&x)[i]; }

// Metal's sizes and alignments: a 3-vector takes the room of a 4-vector (sizeof(float3) ==
// 16), and every vector is aligned to its size, which device accesses are checked against.
template <class T>
struct alignas(2 * sizeof(T)) vec<T, 2> {
  T x, y;
  STS_EMU_VEC_COMMON(2)
  constexpr vec(T x_, T y_) : x(x_), y(y_) {}
};
template <class T>
struct alignas(4 * sizeof(T)) vec<T, 3> {
  T x, y, z;
  STS_EMU_VEC_COMMON(3)
  constexpr vec(T x_, T y_, T z_) : x(x_), y(y_), z(z_) {}
  constexpr vec(vec<T, 2> a, T z_) : x(a.x), y(a.y), z(z_) {}
  constexpr vec(T x_, vec<T, 2> b) : x(x_), y(b.x), z(b.y) {}
};
template <class T>
struct alignas(4 * sizeof(T)) vec<T, 4> {
  T x, y, z, w;
  STS_EMU_VEC_COMMON(4)
  constexpr vec(T x_, T y_, T z_, T w_) : x(x_), y(y_), z(z_), w(w_) {}
  constexpr vec(vec<T, 2> a, vec<T, 2> b) : x(a.x), y(a.y), z(b.x), w(b.y) {}
  constexpr vec(vec<T, 3> a, T w_) : x(a.x), y(a.y), z(a.z), w(w_) {}
  constexpr vec(T x_, vec<T, 3> b) : x(x_), y(b.x), z(b.y), w(b.z) {}
  constexpr vec(vec<T, 2> a, T z_, T w_) : x(a.x), y(a.y), z(z_), w(w_) {}
};
#undef STS_EMU_VEC_COMMON

#define STS_EMU_VEC_BINOP(op)                                                         \
  template <class T, int N>                                                           \
  constexpr vec<T, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {           \
    vec<T, N> r{};                                                                    \
    for (int i = 0; i < N; i++) r[i] = T(a[i] op b[i]);                               \
    return r;                                                                         \
  }                                                                                   \
  template <class T, int N, class S, std::enable_if_t<sts_emu::is_scalar_v<S>, int> = 0> \
  constexpr vec<T, N> operator op(const vec<T, N>& a, S b) {                          \
    return a op vec<T, N>(T(b));                                                      \
  }                                                                                   \
  template <class T, int N, class S, std::enable_if_t<sts_emu::is_scalar_v<S>, int> = 0> \
  constexpr vec<T, N> operator op(S a, const vec<T, N>& b) {                          \
    return vec<T, N>(T(a)) op b;                                                      \
  }                                                                                   \
  template <class T, int N, class U>                                                  \
  constexpr vec<T, N>& operator op##=(vec<T, N>& a, const U& b) {                     \
    return a = a op b;                                                                \
  }
STS_EMU_VEC_BINOP(+)
STS_EMU_VEC_BINOP(-)
STS_EMU_VEC_BINOP(*)
STS_EMU_VEC_BINOP(/)
#undef STS_EMU_VEC_BINOP

template <class T, int N>
constexpr vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r{};
  for (int i = 0; i < N; i++) r[i] = -a[i];
  return r;
}

template <class T, int N>
constexpr T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T r = a[0] * b[0];
  for (int i = 1; i < N; i++) r = T(r + a[i] * b[i]);
  return r;
}

// packed_float3 and friends: the scalars' alignment, no padding. Only storage: read the
// components, or convert to and from the vector type for arithmetic.
template <class T, int N>
struct packed_vec {
  T v[N];
  packed_vec() = default;
  constexpr packed_vec(const vec<T, N>& o) : v{} {
    for (int i = 0; i < N; i++) v[i] = o[i];
  }
  constexpr operator vec<T, N>() const {
    vec<T, N> r{};
    for (int i = 0; i < N; i++) r[i] = v[i];
    return r;
  }
  constexpr T& operator[](int i) { return v[i]; }
  constexpr const T& operator[](int i) const { return v[i]; }
};

#define STS_EMU_VEC_TYPES(T, name)              \
  typedef vec<T, 2> name##2;                    \
  typedef vec<T, 3> name##3;                    \
  typedef vec<T, 4> name##4;                    \
  typedef packed_vec<T, 2> packed_##name##2;    \
  typedef packed_vec<T, 3> packed_##name##3;    \
  typedef packed_vec<T, 4> packed_##name##4;
STS_EMU_VEC_TYPES(float, float)
STS_EMU_VEC_TYPES(half, half)
STS_EMU_VEC_TYPES(bfloat, bfloat)
STS_EMU_VEC_TYPES(int, int)
STS_EMU_VEC_TYPES(uint, uint)
STS_EMU_VEC_TYPES(short, short)
STS_EMU_VEC_TYPES(ushort, ushort)
STS_EMU_VEC_TYPES(char, char)
STS_EMU_VEC_TYPES(uchar, uchar)
STS_EMU_VEC_TYPES(long, long)
STS_EMU_VEC_TYPES(ulong, ulong)
STS_EMU_VEC_TYPES(bool, bool)
#undef STS_EMU_VEC_TYPES

// ---- type traits, limits, bit casts ------------------------------------------------------

using std::conditional_t;
using std::enable_if_t;
using std::is_same_v;
template <class T>
constexpr bool is_floating_point_v = std::is_floating_point<T>::value || sts_emu::is_lowp<T>::value;
template <class T>
constexpr bool is_integral_v = std::is_integral<T>::value;
template <class T>
constexpr bool is_signed_v = std::is_signed<T>::value || is_floating_point_v<T>;
template <class T>
constexpr bool is_arithmetic_v = sts_emu::is_scalar_v<T>;

template <class T>
struct numeric_limits : std::numeric_limits<T> {};

#define STS_EMU_LOWP_LIMITS(T, MIN, MAX, INF, NAN_, EPS, DENORM)                        \
  template <>                                                                          \
  struct numeric_limits<T> {                                                           \
    static constexpr bool is_specialized = true;                                       \
    static constexpr bool is_signed = true;                                            \
    static constexpr bool is_integer = false;                                          \
    static constexpr bool has_infinity = true;                                         \
    static constexpr bool has_quiet_NaN = true;                                        \
    static constexpr T min() { return T::from_bits(MIN); }                             \
    static constexpr T max() { return T::from_bits(MAX); }                             \
    static constexpr T lowest() { return T::from_bits(MAX | 0x8000); }                 \
    static constexpr T infinity() { return T::from_bits(INF); }                        \
    static constexpr T quiet_NaN() { return T::from_bits(NAN_); }                      \
    static constexpr T epsilon() { return T::from_bits(EPS); }                         \
    static constexpr T denorm_min() { return T::from_bits(DENORM); }                   \
  };
STS_EMU_LOWP_LIMITS(half, 0x0400, 0x7BFF, 0x7C00, 0x7E00, 0x1400, 0x0001)
STS_EMU_LOWP_LIMITS(bfloat, 0x0080, 0x7F7F, 0x7F80, 0x7FC0, 0x3C00, 0x0001)
#undef STS_EMU_LOWP_LIMITS

template <class To, class From>
constexpr To as_type(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "as_type: the types differ in size");
  return __builtin_bit_cast(To, from);
}

// ---- math --------------------------------------------------------------------------------

// float is the working type; half and bfloat compute in float and round the result.
#define STS_EMU_MATH1(name, expr)                                  \
  inline float name(float x) { return expr; }                      \
  inline half name(half x) { return half(name((float)x)); }        \
  inline bfloat name(bfloat x) { return bfloat(name((float)x)); }  \
  template <class T, int N>                                        \
  inline vec<T, N> name(const vec<T, N>& v) {                      \
    vec<T, N> r{};                                                 \
    for (int i = 0; i < N; i++) r[i] = name(v[i]);                 \
    return r;                                                      \
  }
STS_EMU_MATH1(exp, __builtin_expf(x))
STS_EMU_MATH1(exp2, __builtin_exp2f(x))
STS_EMU_MATH1(exp10, __builtin_powf(10.0f, x))
STS_EMU_MATH1(log, __builtin_logf(x))
STS_EMU_MATH1(log2, __builtin_log2f(x))
STS_EMU_MATH1(log10, __builtin_log10f(x))
STS_EMU_MATH1(sqrt, __builtin_sqrtf(x))
STS_EMU_MATH1(rsqrt, 1.0f / __builtin_sqrtf(x))
STS_EMU_MATH1(sin, __builtin_sinf(x))
STS_EMU_MATH1(cos, __builtin_cosf(x))
STS_EMU_MATH1(tan, __builtin_tanf(x))
STS_EMU_MATH1(asin, __builtin_asinf(x))
STS_EMU_MATH1(acos, __builtin_acosf(x))
STS_EMU_MATH1(atan, __builtin_atanf(x))
STS_EMU_MATH1(sinh, __builtin_sinhf(x))
STS_EMU_MATH1(cosh, __builtin_coshf(x))
STS_EMU_MATH1(tanh, __builtin_tanhf(x))
STS_EMU_MATH1(asinh, __builtin_asinhf(x))
STS_EMU_MATH1(acosh, __builtin_acoshf(x))
STS_EMU_MATH1(atanh, __builtin_atanhf(x))
STS_EMU_MATH1(floor, __builtin_floorf(x))
STS_EMU_MATH1(ceil, __builtin_ceilf(x))
STS_EMU_MATH1(round, __builtin_roundf(x))
STS_EMU_MATH1(rint, __builtin_rintf(x))
STS_EMU_MATH1(trunc, __builtin_truncf(x))
STS_EMU_MATH1(fabs, __builtin_fabsf(x))
STS_EMU_MATH1(fract, x - __builtin_floorf(x))
STS_EMU_MATH1(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f))
STS_EMU_MATH1(sign, x > 0.0f ? 1.0f : x < 0.0f ? -1.0f : x == x ? 0.0f * x : x)
#undef STS_EMU_MATH1

// abs: fabs for floating types, the integer one for integers.
inline float abs(float x) { return __builtin_fabsf(x); }
inline half abs(half x) { return half::from_bits((uint16_t)(x.bits & 0x7FFFu)); }
inline bfloat abs(bfloat x) { return bfloat::from_bits((uint16_t)(x.bits & 0x7FFFu)); }
template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
constexpr I abs(I x) {
  return x < 0 ? I(-x) : x;
}

#define STS_EMU_MATH2(name, expr)                                                   \
  inline float name(float x, float y) { return expr; }                             \
  inline half name(half x, half y) { return half(name((float)x, (float)y)); }      \
  inline bfloat name(bfloat x, bfloat y) { return bfloat(name((float)x, (float)y)); }
STS_EMU_MATH2(pow, __builtin_powf(x, y))
STS_EMU_MATH2(powr, __builtin_powf(x, y))
STS_EMU_MATH2(fmod, __builtin_fmodf(x, y))
STS_EMU_MATH2(atan2, __builtin_atan2f(x, y))
STS_EMU_MATH2(copysign, __builtin_copysignf(x, y))
STS_EMU_MATH2(fdim, __builtin_fdimf(x, y))
STS_EMU_MATH2(fmax, __builtin_fmaxf(x, y))
STS_EMU_MATH2(fmin, __builtin_fminf(x, y))
STS_EMU_MATH2(step, y < x ? 0.0f : 1.0f)
STS_EMU_MATH2(divide, x / y)
#undef STS_EMU_MATH2

inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline half fma(half a, half b, half c) { return half(__builtin_fmaf(a, b, c)); }
inline bfloat fma(bfloat a, bfloat b, bfloat c) { return bfloat(__builtin_fmaf(a, b, c)); }

// The type a mixed max/min/... computes in: float beats half beats bfloat beats integers.
template <class A, class B>
using mixed_t = std::conditional_t<
    std::is_floating_point<A>::value || std::is_floating_point<B>::value, float,
    std::conditional_t<std::is_same<A, half>::value || std::is_same<B, half>::value, half,
                       std::conditional_t<std::is_same<A, bfloat>::value ||
                                              std::is_same<B, bfloat>::value,
                                          bfloat, std::common_type_t<A, B>>>>;

// max/min of floats ignore a NaN operand (fmax), as Metal's do.
template <class T, std::enable_if_t<sts_emu::is_scalar_v<T>, int> = 0>
constexpr T max(T a, T b) {
  if constexpr (is_floating_point_v<T>)
    return T(__builtin_fmaxf((float)a, (float)b));
  else
    return a < b ? b : a;
}
template <class T, std::enable_if_t<sts_emu::is_scalar_v<T>, int> = 0>
constexpr T min(T a, T b) {
  if constexpr (is_floating_point_v<T>)
    return T(__builtin_fminf((float)a, (float)b));
  else
    return b < a ? b : a;
}
template <class A, class B,
          std::enable_if_t<!std::is_same<A, B>::value && sts_emu::is_scalar_v<A> &&
                               sts_emu::is_scalar_v<B>,
                           int> = 0>
constexpr mixed_t<A, B> max(A a, B b) {
  return max(mixed_t<A, B>(a), mixed_t<A, B>(b));
}
template <class A, class B,
          std::enable_if_t<!std::is_same<A, B>::value && sts_emu::is_scalar_v<A> &&
                               sts_emu::is_scalar_v<B>,
                           int> = 0>
constexpr mixed_t<A, B> min(A a, B b) {
  return min(mixed_t<A, B>(a), mixed_t<A, B>(b));
}
template <class T, int N>
constexpr vec<T, N> max(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> r{};
  for (int i = 0; i < N; i++) r[i] = max(a[i], b[i]);
  return r;
}
template <class T, int N>
constexpr vec<T, N> min(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> r{};
  for (int i = 0; i < N; i++) r[i] = min(a[i], b[i]);
  return r;
}

template <class T, class L, class H>
constexpr T clamp(T x, L lo, H hi) {
  return min(max(x, T(lo)), T(hi));
}
template <class T, class U>
constexpr T mix(T x, U y, float a) {
  return T(x + (y - x) * a);
}
template <class T, class U>
constexpr T select(T a, U b, bool c) {
  return c ? b : a;
}

#define STS_EMU_PRED(name, expr)                                  \
  inline bool name(float x) { return expr; }                      \
  inline bool name(half x) { return name((float)x); }             \
  inline bool name(bfloat x) { return name((float)x); }
STS_EMU_PRED(isnan, __builtin_isnan(x))
STS_EMU_PRED(isinf, __builtin_isinf(x))
STS_EMU_PRED(isfinite, __builtin_isfinite(x))
STS_EMU_PRED(signbit, __builtin_signbit(x))
#undef STS_EMU_PRED

// metal::precise:: and metal::fast:: are the same exact functions here.
#define STS_EMU_MATH_NAMES                                                                  \
  using metal::exp;                                                                         \
  using metal::exp2;                                                                        \
  using metal::exp10;                                                                       \
  using metal::log;                                                                         \
  using metal::log2;                                                                        \
  using metal::log10;                                                                       \
  using metal::sqrt;                                                                        \
  using metal::rsqrt;                                                                       \
  using metal::sin;                                                                         \
  using metal::cos;                                                                         \
  using metal::tan;                                                                         \
  using metal::tanh;                                                                        \
  using metal::sinh;                                                                        \
  using metal::cosh;                                                                        \
  using metal::asin;                                                                        \
  using metal::acos;                                                                        \
  using metal::atan;                                                                        \
  using metal::atan2;                                                                       \
  using metal::pow;                                                                         \
  using metal::powr;                                                                        \
  using metal::fabs;                                                                        \
  using metal::floor;                                                                       \
  using metal::ceil;                                                                        \
  using metal::round;                                                                       \
  using metal::rint;                                                                        \
  using metal::trunc;                                                                       \
  using metal::fract;                                                                       \
  using metal::fmax;                                                                        \
  using metal::fmin;                                                                        \
  using metal::max;                                                                         \
  using metal::min;                                                                         \
  using metal::clamp;                                                                       \
  using metal::saturate;                                                                    \
  using metal::divide;
namespace precise {
STS_EMU_MATH_NAMES
}
namespace fast {
STS_EMU_MATH_NAMES
}
#undef STS_EMU_MATH_NAMES

// ---- barriers and simdgroup functions ----------------------------------------------------

enum class mem_flags : uint32_t {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags((uint32_t)a | (uint32_t)b);
}

// A call site identifies a barrier or collective: lanes at different sites have diverged. The
// Python rewriter passes every call its site (line * 4096 + column); a call it did not see
// gets its line from this default argument (evaluated where the function is called).
#define STS_EMU_SITE (__builtin_LINE() * 4096)

// Memory is coherent in the emulator, so the flags only matter to the GPU.
inline void threadgroup_barrier(mem_flags, int site = STS_EMU_SITE) {
  sts_emu::threadgroup_barrier_wait(site);
}
inline void simdgroup_barrier(mem_flags, int site = STS_EMU_SITE) {
  sts_emu::simd_sync("simdgroup_barrier", site, nullptr, nullptr, 0);
}

}  // namespace metal

namespace sts_emu {

template <class T>
inline const T& lane_in(const SimdSync& s, int lane) {
  return *static_cast<const T*>(s.in[lane]);
}
template <class T>
inline T& lane_out(const SimdSync& s, int lane) {
  return *static_cast<T*>(s.out[lane]);
}
inline bool lane_active(const SimdSync& s, int lane) {
  return lane >= 0 && lane < 32 && (s.mask >> lane & 1u);
}

// Waits until no lane of the simdgroup can run on (every lane has reached this collective,
// returned, or waits at a threadgroup_barrier; lanes at another collective are an error),
// then the first lane to resume computes the results of all lanes that take part.
template <class T, class Compute>
inline T collective(const char* what, int site, const T& value, int32_t arg, Compute compute) {
  T result;
  SimdSync* s = simd_sync(what, site, &value, &result, arg);
  if (!s->done) {
    s->done = true;
    compute(*s);
  }
  return result;
}

// Pairwise (tree) reduction over the active lanes, as a GPU's butterfly would pair them.
template <class T, class Op>
inline void reduce_lanes(const SimdSync& s, Op op) {
  T vals[32];
  int n = 0;
  for (int l = 0; l < 32; l++)
    if (lane_active(s, l)) vals[n++] = lane_in<T>(s, l);
  for (int w = 1; w < n; w *= 2)
    for (int i = 0; i + w < n; i += 2 * w) vals[i] = op(vals[i], vals[i + w]);
  for (int l = 0; l < 32; l++)
    if (lane_active(s, l)) lane_out<T>(s, l) = vals[0];
}

template <class T, class Op>
inline void scan_lanes(const SimdSync& s, Op op, bool inclusive) {
  bool have = false;
  T acc = T(0);
  for (int l = 0; l < 32; l++) {
    if (!lane_active(s, l)) continue;
    T v = lane_in<T>(s, l);
    T next = have ? T(op(acc, v)) : v;
    lane_out<T>(s, l) = inclusive ? next : have ? acc : T(0);
    acc = next;
    have = true;
  }
}

// Lane l reads lane src(l); a source outside the simdgroup keeps the lane's own value (as
// Metal's shuffle_up/down do), a source that is not active reads poison.
template <class T, class Src>
inline void permute_lanes(const SimdSync& s, Src src) {
  for (int l = 0; l < 32; l++) {
    if (!lane_active(s, l)) continue;
    int from = src(l, s.arg[l]);
    T& out = lane_out<T>(s, l);
    if (from < 0 || from >= 32)
      out = lane_in<T>(s, l);
    else if (lane_active(s, from))
      out = lane_in<T>(s, from);
    else
      __builtin_memset(static_cast<void*>(&out), 0xFF, sizeof(T));
  }
}

inline int first_lane(const SimdSync& s) { return __builtin_ctz(s.mask); }

}  // namespace sts_emu

namespace metal {

#define STS_EMU_REDUCTION(name, expr)                                              \
  template <class T>                                                              \
  inline T name(T x, int site = STS_EMU_SITE) {                               \
    return sts_emu::collective(#name, site, x, 0, [](const sts_emu::SimdSync& s) { \
      sts_emu::reduce_lanes<T>(s, [](const T& a, const T& b) { return T(expr); }); \
    });                                                                           \
  }
STS_EMU_REDUCTION(simd_sum, a + b)
STS_EMU_REDUCTION(simd_product, a * b)
STS_EMU_REDUCTION(simd_max, max(a, b))
STS_EMU_REDUCTION(simd_min, min(a, b))
STS_EMU_REDUCTION(simd_and, a & b)
STS_EMU_REDUCTION(simd_or, a | b)
STS_EMU_REDUCTION(simd_xor, a ^ b)
#undef STS_EMU_REDUCTION

#define STS_EMU_SCAN(name, expr, inclusive)                                                \
  template <class T>                                                                      \
  inline T name(T x, int site = STS_EMU_SITE) {                                       \
    return sts_emu::collective(#name, site, x, 0, [](const sts_emu::SimdSync& s) {         \
      sts_emu::scan_lanes<T>(s, [](const T& a, const T& b) { return expr; }, inclusive);  \
    });                                                                                   \
  }
STS_EMU_SCAN(simd_prefix_inclusive_sum, a + b, true)
STS_EMU_SCAN(simd_prefix_exclusive_sum, a + b, false)
STS_EMU_SCAN(simd_prefix_inclusive_product, a * b, true)
STS_EMU_SCAN(simd_prefix_exclusive_product, a * b, false)
#undef STS_EMU_SCAN

#define STS_EMU_PERMUTE(name, src)                                                        \
  template <class T>                                                                     \
  inline T name(T x, uint arg, int site = STS_EMU_SITE) {                            \
    return sts_emu::collective(#name, site, x, (int32_t)arg, [](const sts_emu::SimdSync& s) { \
      sts_emu::permute_lanes<T>(s, [](int l, int32_t a) { return src; });                \
    });                                                                                  \
  }
STS_EMU_PERMUTE(simd_shuffle, a)
STS_EMU_PERMUTE(simd_broadcast, a)
STS_EMU_PERMUTE(simd_shuffle_down, l + a)
STS_EMU_PERMUTE(simd_shuffle_up, l - a)
STS_EMU_PERMUTE(simd_shuffle_xor, l ^ a)
STS_EMU_PERMUTE(simd_shuffle_rotate_down, (l + a) & 31)
STS_EMU_PERMUTE(simd_shuffle_rotate_up, (l - a) & 31)
#undef STS_EMU_PERMUTE

template <class T>
inline T simd_broadcast_first(T x, int site = STS_EMU_SITE) {
  return sts_emu::collective("simd_broadcast_first", site, x, 0, [](const sts_emu::SimdSync& s) {
    int f = sts_emu::first_lane(s);
    for (int l = 0; l < 32; l++)
      if (sts_emu::lane_active(s, l)) sts_emu::lane_out<T>(s, l) = sts_emu::lane_in<T>(s, f);
  });
}

inline bool simd_all(bool x, int site = STS_EMU_SITE) {
  return sts_emu::collective("simd_all", site, x, 0, [](const sts_emu::SimdSync& s) {
    sts_emu::reduce_lanes<bool>(s, [](bool a, bool b) { return a && b; });
  });
}
inline bool simd_any(bool x, int site = STS_EMU_SITE) {
  return sts_emu::collective("simd_any", site, x, 0, [](const sts_emu::SimdSync& s) {
    sts_emu::reduce_lanes<bool>(s, [](bool a, bool b) { return a || b; });
  });
}
inline bool simd_is_first(int site = STS_EMU_SITE) {
  return sts_emu::collective("simd_is_first", site, false, 0, [](const sts_emu::SimdSync& s) {
    for (int l = 0; l < 32; l++)
      if (sts_emu::lane_active(s, l)) sts_emu::lane_out<bool>(s, l) = l == sts_emu::first_lane(s);
  });
}

}  // namespace metal

namespace sts_emu {
inline metal::uint3 attr3(const uint32_t v[3]) { return metal::uint3(v[0], v[1], v[2]); }
}  // namespace sts_emu

// ---- MLX's kernel utilities (mlx/backend/metal/kernels/utils.h) ---------------------------

template <typename U>
struct Limits {
  static constexpr U max = metal::numeric_limits<U>::max();
  static constexpr U min = metal::numeric_limits<U>::min();
  static constexpr U finite_max = metal::numeric_limits<U>::max();
  static constexpr U finite_min = metal::numeric_limits<U>::min();
};

#define STS_EMU_FLOAT_LIMITS(T)                                                      \
  template <>                                                                       \
  struct Limits<T> {                                                                \
    static constexpr T max = metal::numeric_limits<T>::infinity();                  \
    static constexpr T min = -metal::numeric_limits<T>::infinity();                 \
    static constexpr T finite_max = metal::numeric_limits<T>::max();                \
    static constexpr T finite_min = -metal::numeric_limits<T>::max();               \
  };
STS_EMU_FLOAT_LIMITS(float)
STS_EMU_FLOAT_LIMITS(half)
STS_EMU_FLOAT_LIMITS(bfloat)
#undef STS_EMU_FLOAT_LIMITS

template <>
struct Limits<bool> {
  static constexpr bool max = true;
  static constexpr bool min = false;
};

template <typename U>
struct WorkPerThread {
  static_assert(sizeof(U) <= 8, "Type too large");
  static constexpr int n = 8 / sizeof(U);
};

template <typename T, typename U>
inline T ceildiv(T N, U M) {
  return (N + M - 1) / M;
}

template <typename IdxT = int64_t>
inline IdxT elem_to_loc(IdxT elem, sts_emu::cdptr<int> shape, sts_emu::cdptr<int64_t> strides,
                        int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}

template <typename IdxT = int64_t>
inline IdxT elem_to_loc(metal::uint3 elem, sts_emu::cdptr<int> shape,
                        sts_emu::cdptr<int64_t> strides, int ndim) {
  IdxT loc = elem.x * IdxT(strides[ndim - 1]) + elem.y * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    loc += (elem.z % shape[d]) * IdxT(strides[d]);
    elem.z /= shape[d];
  }
  return loc;
}

template <typename IdxT = int64_t>
inline IdxT elem_to_loc_1(uint elem, const int64_t& stride) {
  return elem * IdxT(stride);
}

template <typename IdxT = int64_t>
inline IdxT elem_to_loc_2(metal::uint2 elem, sts_emu::cdptr<int64_t> strides) {
  return elem.x * IdxT(strides[1]) + elem.y * IdxT(strides[0]);
}

template <typename IdxT = int64_t>
inline IdxT elem_to_loc_3(metal::uint3 elem, sts_emu::cdptr<int64_t> strides) {
  return elem.x * IdxT(strides[2]) + elem.y * IdxT(strides[1]) + elem.z * IdxT(strides[0]);
}

inline float log1p(float x) {
  float xp1 = 1.0f + x;
  if (xp1 == __builtin_inff()) return __builtin_inff();
  if (xp1 == 1.0f) return x;
  return x * (metal::log(xp1) / (xp1 - 1.0f));
}
inline bfloat log1p(bfloat x) { return bfloat(log1p((float)x)); }

using namespace metal;
