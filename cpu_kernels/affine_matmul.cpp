// Products with mlx-lm's affine-quantized weights on x86 CPUs with AVX2 and FMA.
//
// W [outputs, inputs] is stored as mlx-lm stores it: uint32 words [outputs, inputs * bits / 32],
// values from the least significant bits up, and per group of `group_size` consecutive inputs a
// scale and a bias (W = scale * q + bias) in the checkpoint's float dtype. Nothing is repacked.
//
// Why a kernel of our own: PyTorch's CPU int4 kernel decodes with bfloat16 arithmetic that AVX2
// emulates, its float32 path is a scalar loop, and it has no form of this layout for 8 bits;
// decoding a whole model to float32 would multiply the bytes every decode step reads by 4-8.
//
// Decode sizes (up to 8 rows: a draft step, a verification block) have three forms:
// - float32 (`decode_rows`): eight consecutive words are one AVX2 register; shifting it by `bits`
//   each step yields, in lane j, value k of word j. The activations are permuted once per call
//   into that order (`permuted`), so a step is shift, mask, convert and one FMA per row; each
//   chunk's sum of q * x is scaled by its group's scale, and the biases enter as bias * (the
//   group's sum of x).
// - int8 activations, 4-bit weights (`decode_rows_int8`, see `Int8Activations`).
// - At most 4 rows per pass keep their sums in registers; more rows decode W again.
// Every row is computed with the same operations in the same order whatever the number of rows,
// so a verification block's logits equal the single steps' bit for bit.
//
// Larger blocks (prefill chunks) decode a tile of W to float32 at a time, in the permuted order,
// and multiply with at::mm: there the arithmetic, not the bytes, is the cost.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMaxDecodeRows = 8;
constexpr int64_t kPassRows = 4;
constexpr int64_t kTileOutputs = 256;

template <typename T>
void to_float(const T* src, float* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>(src[i]);
}

// x [rows, inputs] into [rows][chunks][per_word][8]: lane j of step k of chunk c holds input
// c * 8 * per_word + j * per_word + k, the value the kernel decodes in that lane and step.
at::Tensor permuted(const at::Tensor& x, int64_t bits) {
  const int64_t per_word = 32 / bits;
  const int64_t rows = x.size(0), inputs = x.size(1);
  return x.view({rows, inputs / (8 * per_word), 8, per_word}).transpose(2, 3).contiguous();
}

inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// Each lane's scale (or bias) in chunk `chunk`: one group spans one or more chunks, except 4-bit
// values in groups of 32, where a chunk (64 values) holds two groups, lanes 0-3 and 4-7.
inline __m256 lane_values(const float* per_group, int64_t chunk, int64_t chunk_values, int64_t group_size) {
  if (chunk_values <= group_size) return _mm256_set1_ps(per_group[chunk * chunk_values / group_size]);
  return _mm256_setr_m128(_mm_set1_ps(per_group[2 * chunk]), _mm_set1_ps(per_group[2 * chunk + 1]));
}

// Output o of each row: its accumulated products plus each group's bias times the group's sum of
// that row's activations (exact float sums, so the biases see x itself).
template <int ROWS>
inline void store_row(const __m256* acc, const float* biases, const float* group_sums, int64_t groups, float* out,
                      int64_t outputs) {
  for (int r = 0; r < ROWS; ++r) {
    float bias_term = 0.f;
    for (int64_t g = 0; g < groups; ++g) bias_term += biases[g] * group_sums[r * groups + g];
    out[r * outputs] = horizontal_sum(acc[r]) + bias_term;
  }
}

// Calls pass(first_row, std::integral_constant<int, R>) for consecutive passes of R <= kPassRows
// rows, as even as they come (5 rows: 2 + 3), R a compile-time constant for the register arrays.
template <typename Pass>
void in_passes(int64_t rows, Pass pass) {
  const int64_t passes = (rows + kPassRows - 1) / kPassRows;
  for (int64_t done = 0, p = 0; p < passes; ++p) {
    const int64_t count = (rows - done) / (passes - p);
    switch (count) {
      case 1: pass(done, std::integral_constant<int, 1>{}); break;
      case 2: pass(done, std::integral_constant<int, 2>{}); break;
      case 3: pass(done, std::integral_constant<int, 3>{}); break;
      case 4: pass(done, std::integral_constant<int, 4>{}); break;
    }
    done += count;
  }
}

template <int BITS, int ROWS, typename T>
void decode_rows(const float* x_permuted, const float* group_sums, const uint32_t* words, const T* scales,
                 const T* biases, float* out, int64_t inputs, int64_t outputs, int64_t group_size,
                 int64_t first, int64_t last) {
  constexpr int kPerWord = 32 / BITS;
  constexpr int kChunkValues = 8 * kPerWord;
  const int64_t chunks = inputs / kChunkValues, groups = inputs / group_size;
  const int64_t words_per_row = inputs / kPerWord;
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  std::vector<float> row_scales(groups), row_biases(groups);
  for (int64_t o = first; o < last; ++o) {
    to_float(scales + o * groups, row_scales.data(), groups);
    to_float(biases + o * groups, row_biases.data(), groups);
    const uint32_t* row_words = words + o * words_per_row;
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row_words + 8 * c));
      const float* xc = x_permuted + c * kChunkValues;
      // A chunk's sums of q * x start from zero, so that its FMAs do not wait on the last chunk's.
      __m256 dot[ROWS];
      for (int r = 0; r < ROWS; ++r) dot[r] = _mm256_setzero_ps();
#pragma GCC unroll 8
      for (int k = 0; k < kPerWord; ++k) {
        const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(w, mask));
        w = _mm256_srli_epi32(w, BITS);
        for (int r = 0; r < ROWS; ++r) dot[r] = _mm256_fmadd_ps(q, _mm256_loadu_ps(xc + r * inputs + 8 * k), dot[r]);
      }
      const __m256 s = lane_values(row_scales.data(), c, kChunkValues, group_size);
      for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_fmadd_ps(s, dot[r], acc[r]);
    }
    store_row<ROWS>(acc, row_biases.data(), group_sums, groups, out + o, outputs);
  }
}

template <int BITS, typename T>
void decode_product(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales, const at::Tensor& biases,
                    at::Tensor& out, int64_t group_size) {
  const int64_t rows = x.size(0), inputs = x.size(1), outputs = words.size(0);
  const at::Tensor x_permuted = permuted(x, BITS);
  const at::Tensor group_sums = x.view({rows, inputs / group_size, group_size}).sum(-1).contiguous();
  const float* xp = x_permuted.data_ptr<float>();
  const int64_t groups = inputs / group_size;
  const auto* w = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  const T* s = scales.data_ptr<T>();
  const T* b = biases.data_ptr<T>();
  float* y = out.data_ptr<float>();
  at::parallel_for(0, outputs, 16, [&](int64_t first, int64_t last) {
    in_passes(rows, [&](int64_t row, auto count) {
      decode_rows<BITS, decltype(count)::value, T>(xp + row * inputs, group_sums.data_ptr<float>() + row * groups, w, s,
                                                  b, y + row * outputs, inputs, outputs, group_size, first, last);
    });
  });
}

// Activations for integer products with 4-bit weights, as llama.cpp multiplies its 4-bit formats:
// each group of x rounded to int8 with its own scale (max |x| / 127). The products of a 4-bit
// value and an int8 are exact in 16-bit integers, so a chunk of 64 values costs two
// multiply-add instructions per row instead of eight float FMAs; what is lost is the activations'
// rounding, about 0.4% of a group's largest value.
struct Int8Activations {
  at::Tensor values;       // int8 [rows][chunks][64]: a chunk's even inputs, then its odd ones
  at::Tensor lane_scales;  // float [rows][chunks][8]: the activation scale of each word's group
  at::Tensor group_sums;   // float [rows][groups]: exact sums of x, for the biases
};

// Even inputs first because a byte holds two 4-bit values, the even input's in its low nibble:
// masking a register of words gives the even inputs' values in byte order, shifting it the odd.
Int8Activations int8_activations(const at::Tensor& x, int64_t group_size) {
  const int64_t rows = x.size(0), inputs = x.size(1), chunks = inputs / 64, groups = inputs / group_size;
  Int8Activations a{at::empty({rows, inputs}, x.options().dtype(at::kChar)), at::empty({rows, chunks, 8}, x.options()),
                    at::empty({rows, groups}, x.options())};
  const float* xs = x.data_ptr<float>();
  int8_t* values = a.values.data_ptr<int8_t>();
  float* lane_scales = a.lane_scales.data_ptr<float>();
  float* sums = a.group_sums.data_ptr<float>();
  std::vector<float> scale(groups);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = xs + r * inputs + g * group_size;
      float largest = 0.f, sum = 0.f;
      for (int64_t i = 0; i < group_size; ++i) largest = std::max(largest, std::abs(xg[i])), sum += xg[i];
      scale[g] = largest / 127.f;
      sums[r * groups + g] = sum;
      const float inverse = largest > 0.f ? 127.f / largest : 0.f;
      for (int64_t i = 0; i < group_size; ++i) {
        const int64_t input = g * group_size + i, in_chunk = input % 64;
        const int64_t position = in_chunk % 2 == 0 ? in_chunk / 2 : 32 + in_chunk / 2;
        values[r * inputs + input - in_chunk + position] = static_cast<int8_t>(std::nearbyint(xg[i] * inverse));
      }
    }
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t lane = 0; lane < 8; ++lane) lane_scales[(r * chunks + c) * 8 + lane] = scale[(c * 64 + 8 * lane) / group_size];
  }
  return a;
}

template <int ROWS, typename T>
void decode_rows_int8(const int8_t* x_values, const float* x_lane_scales, const float* group_sums,
                      const uint32_t* words, const T* scales, const T* biases, float* out, int64_t inputs,
                      int64_t outputs, int64_t group_size, int64_t first, int64_t last) {
  const int64_t chunks = inputs / 64, groups = inputs / group_size, words_per_row = inputs / 8;
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  std::vector<float> row_scales(groups), row_biases(groups);
  for (int64_t o = first; o < last; ++o) {
    to_float(scales + o * groups, row_scales.data(), groups);
    to_float(biases + o * groups, row_biases.data(), groups);
    const uint32_t* row_words = words + o * words_per_row;
    __m256 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row_words + 8 * c));
      const __m256i even = _mm256_and_si256(v, low_nibbles);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles);
      const __m256 s = lane_values(row_scales.data(), c, 64, group_size);
      for (int r = 0; r < ROWS; ++r) {
        const int8_t* xc = x_values + r * inputs + c * 64;
        const __m256i pairs = _mm256_add_epi16(
            _mm256_maddubs_epi16(even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc))),
            _mm256_maddubs_epi16(odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + 32))));
        const __m256 per_word = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));  // lane j: word j's 8 products
        acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(per_word, s), _mm256_loadu_ps(x_lane_scales + (r * chunks + c) * 8), acc[r]);
      }
    }
    store_row<ROWS>(acc, row_biases.data(), group_sums, groups, out + o, outputs);
  }
}

template <typename T>
void decode_product_int8(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales,
                         const at::Tensor& biases, at::Tensor& out, int64_t group_size) {
  const int64_t rows = x.size(0), inputs = x.size(1), outputs = words.size(0);
  const int64_t chunks = inputs / 64, groups = inputs / group_size;
  const Int8Activations a = int8_activations(x, group_size);
  const auto* w = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  const T* s = scales.data_ptr<T>();
  const T* b = biases.data_ptr<T>();
  float* y = out.data_ptr<float>();
  at::parallel_for(0, outputs, 16, [&](int64_t first, int64_t last) {
    in_passes(rows, [&](int64_t row, auto count) {
      decode_rows_int8<decltype(count)::value, T>(
          a.values.data_ptr<int8_t>() + row * inputs, a.lane_scales.data_ptr<float>() + row * chunks * 8,
          a.group_sums.data_ptr<float>() + row * groups, w, s, b, y + row * outputs, inputs, outputs, group_size,
          first, last);
    });
  });
}

// Rows [first, last) of W into float32, each in the permuted order of `permuted`.
template <int BITS, typename T>
void decode_tile(const uint32_t* words, const T* scales, const T* biases, float* tile, int64_t inputs,
                 int64_t group_size, int64_t first, int64_t last) {
  constexpr int kPerWord = 32 / BITS;
  constexpr int kChunkValues = 8 * kPerWord;
  const int64_t chunks = inputs / kChunkValues, groups = inputs / group_size;
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  at::parallel_for(first, last, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> rs(groups), rb(groups);
    for (int64_t o = begin; o < end; ++o) {
      to_float(scales + o * groups, rs.data(), groups);
      to_float(biases + o * groups, rb.data(), groups);
      const uint32_t* row_words = words + o * (inputs / kPerWord);
      float* dst = tile + (o - first) * inputs;
      for (int64_t c = 0; c < chunks; ++c) {
        __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row_words + 8 * c));
        const __m256 s = lane_values(rs.data(), c, kChunkValues, group_size);
        const __m256 b = lane_values(rb.data(), c, kChunkValues, group_size);
        for (int k = 0; k < kPerWord; ++k) {
          const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(w, mask));
          w = _mm256_srli_epi32(w, BITS);
          _mm256_storeu_ps(dst + c * kChunkValues + 8 * k, _mm256_fmadd_ps(q, s, b));
        }
      }
    }
  });
}

template <int BITS, typename T>
void tiled_product(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales, const at::Tensor& biases,
                   at::Tensor& out, int64_t group_size) {
  const int64_t inputs = x.size(1), outputs = words.size(0);
  const at::Tensor x_permuted = permuted(x, BITS).view({x.size(0), inputs});
  const auto* w = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  at::Tensor tile = at::empty({std::min(kTileOutputs, outputs), inputs}, x.options());
  for (int64_t first = 0; first < outputs; first += kTileOutputs) {
    const int64_t last = std::min(first + kTileOutputs, outputs);
    decode_tile<BITS, T>(w, scales.data_ptr<T>(), biases.data_ptr<T>(), tile.data_ptr<float>(), inputs, group_size,
                         first, last);
    out.narrow(1, first, last - first).copy_(at::mm(x_permuted, tile.narrow(0, 0, last - first).t()));
  }
}

at::Tensor affine_matmul(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales,
                         const at::Tensor& biases, int64_t bits, int64_t group_size, bool int8_activations) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128, "group_size must be 32, 64 or 128");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 [rows, inputs]");
  TORCH_CHECK(words.scalar_type() == at::kInt && words.is_contiguous(), "words must be contiguous int32");
  TORCH_CHECK(scales.is_contiguous() && biases.is_contiguous() && scales.scalar_type() == biases.scalar_type(),
              "scales and biases must be contiguous, of one dtype");
  const int64_t inputs = x.size(1), outputs = words.size(0);
  TORCH_CHECK(words.size(1) * 32 / bits == inputs, "words do not match x's inputs");
  TORCH_CHECK(scales.size(0) == outputs && scales.size(1) * group_size == inputs, "scales do not match the weight");
  at::Tensor out = at::empty({x.size(0), outputs}, x.options());
  if (x.size(0) == 0) return out;
  const bool decode = x.size(0) <= kMaxDecodeRows;
  TORCH_CHECK(!int8_activations || bits == 4, "int8 activations are for 4-bit weights");
#define STS_DISPATCH(BITS, T)                                                                                   \
  if (!decode) return tiled_product<BITS, T>(x, words, scales, biases, out, group_size), out;                   \
  if (BITS == 4 && int8_activations) return decode_product_int8<T>(x, words, scales, biases, out, group_size), out; \
  return decode_product<BITS, T>(x, words, scales, biases, out, group_size), out;
  switch (scales.scalar_type()) {
    case at::kBFloat16:
      if (bits == 4) { STS_DISPATCH(4, at::BFloat16) } else { STS_DISPATCH(8, at::BFloat16) }
    case at::kHalf:
      if (bits == 4) { STS_DISPATCH(4, at::Half) } else { STS_DISPATCH(8, at::Half) }
    case at::kFloat:
      if (bits == 4) { STS_DISPATCH(4, float) } else { STS_DISPATCH(8, float) }
    default:
      TORCH_CHECK(false, "scales must be bfloat16, float16 or float32");
  }
#undef STS_DISPATCH
}

}  // namespace

TORCH_LIBRARY(sts_edge_cpu, m) {
  m.def("affine_matmul(Tensor x, Tensor words, Tensor scales, Tensor biases, int bits, int group_size, "
        "bool int8_activations=False) -> Tensor");
  m.impl("affine_matmul", c10::DispatchKey::CPU, TORCH_FN(affine_matmul));
}
