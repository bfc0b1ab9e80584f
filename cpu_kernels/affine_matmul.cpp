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
// and multiply with at::mm (in bfloat16 when the caller asks: `bfloat16_tiles`): there the
// arithmetic, not the bytes, is the cost.
//
// On CPUs with AMX (Intel Sapphire Rapids and later), 4-bit weights with int8 activations in
// groups of 64 or 128 take `amx_product` for every block size instead, prefill chunks included:
// one tile instruction multiplies 16 outputs by 64 inputs for up to 16 rows, so a verification
// block costs about what one row does (the AVX2 loop's arithmetic grows with each row), and a
// prefill chunk needs no float32 copy of the weights. One row takes AVX-512 VNNI (`vnni_row`),
// with the tiles' float operations.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "amx.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using sts_edge_amx::cpu_has_amx;
using sts_edge_amx::TileConfig;
using sts_edge_simd::horizontal_sum;

// Whether 4-bit products with int8 activations can run on the tile units here.
bool amx_ready() {
  static const bool ready = cpu_has_amx() && sts_edge_amx::tiles_permitted();
  return ready;
}

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
  at::Tensor group_scales; // float [rows][groups]: each group's activation scale
};

// Even inputs first because a byte holds two 4-bit values, the even input's in its low nibble:
// masking a register of words gives the even inputs' values in byte order, shifting it the odd.
Int8Activations int8_activations(const at::Tensor& x, int64_t group_size) {
  const int64_t rows = x.size(0), inputs = x.size(1), chunks = inputs / 64, groups = inputs / group_size;
  Int8Activations a{at::empty({rows, inputs}, x.options().dtype(at::kChar)), at::empty({rows, chunks, 8}, x.options()),
                    at::empty({rows, groups}, x.options()), at::empty({rows, groups}, x.options())};
  const float* xs = x.data_ptr<float>();
  int8_t* values = a.values.data_ptr<int8_t>();
  float* lane_scales = a.lane_scales.data_ptr<float>();
  float* sums = a.group_sums.data_ptr<float>();
  float* group_scales = a.group_scales.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    float* scale = group_scales + r * groups;
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

// ---- AMX: 4-bit weights, int8 activations, any number of rows ----
//
// A tile instruction (tdpbusd) multiplies a [16, 64] tile of unsigned bytes by a [64, 16] tile of
// signed ones into [16, 16] int32 sums. The weights are the unsigned side: 16 outputs' 64 inputs of
// one chunk, unpacked from nibbles to bytes as the activations are ordered (the chunk's even
// inputs, then its odd ones; see int8_activations). The activations are the signed side, 16 rows
// in the tile's layout: four consecutive inputs of a row side by side. The sums are exact, so a
// group's sum is scaled once by the weight's and the activations' scales, in the same float
// operations for every row whatever the number of rows: a verification block's logits equal the
// single steps' bit for bit, as in the AVX2 loop (whose float operations differ, so a process uses
// one or the other for a layer, never both).

constexpr int64_t kAmxRows = 16, kAmxOutputs = 16, kAmxChunk = 64;
// Software prefetch distance along an output's row of words (1 KB): a decode step streams the
// weights from memory, where asking ahead measured faster than the hardware prefetchers alone.
constexpr int64_t kPrefetchWords = 256;

__attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-int8")))
void configure_tiles() {
  TileConfig config;
  // 0 and 4 weights, 1 and 5 activations, 2 and 3 sums: two sets, used by alternate groups.
  for (int t = 0; t < 6; ++t) config.rows[t] = 16, config.bytes_per_row[t] = 64;
  _tile_loadconfig(&config);
}

// Activations in the tile layout: [row blocks][chunks][16 quads][16 rows][4], rows past the last
// zero (their sums are computed and dropped); and per [row block][group][16 rows] the activation
// scales and the exact group sums, zero past the last row.
struct AmxActivations {
  std::vector<int8_t> tiles;
  std::vector<float> scales, sums;
};

AmxActivations amx_activations(const Int8Activations& a, int64_t rows, int64_t inputs, int64_t groups) {
  const int64_t chunks = inputs / kAmxChunk, blocks = (rows + kAmxRows - 1) / kAmxRows;
  AmxActivations t{std::vector<int8_t>(blocks * chunks * kAmxChunk * kAmxRows, 0),
                   std::vector<float>(blocks * groups * kAmxRows, 0.f), std::vector<float>(blocks * groups * kAmxRows, 0.f)};
  const int8_t* values = a.values.data_ptr<int8_t>();
  const float* scales = a.group_scales.data_ptr<float>();
  const float* sums = a.group_sums.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t block = r / kAmxRows, lane = r % kAmxRows;
    for (int64_t c = 0; c < chunks; ++c) {
      int8_t* tile = t.tiles.data() + (block * chunks + c) * kAmxChunk * kAmxRows;
      const int8_t* chunk = values + r * inputs + c * kAmxChunk;
      for (int64_t quad = 0; quad < kAmxChunk / 4; ++quad) std::memcpy(tile + (quad * kAmxRows + lane) * 4, chunk + 4 * quad, 4);
    }
    for (int64_t g = 0; g < groups; ++g) {
      t.scales[(block * groups + g) * kAmxRows + lane] = scales[r * groups + g];
      t.sums[(block * groups + g) * kAmxRows + lane] = sums[r * groups + g];
    }
  }
  return t;
}

// A block of 16 outputs' per-group values (scales or biases) in float32, zero past `count`
// outputs: [output][group], or with `group_major` [group][output].
template <typename T>
void block_floats(const T* per_group, int64_t o0, int64_t count, int64_t groups, bool group_major, float* dst) {
  for (int64_t i = 0; i < kAmxOutputs; ++i)
    for (int64_t g = 0; g < groups; ++g)
      dst[group_major ? g * kAmxOutputs + i : i * groups + g] =
          i < count ? static_cast<float>(per_group[(o0 + i) * groups + g]) : 0.f;
}

// 16 outputs' 64 inputs of chunk c as the tile's unsigned bytes, in the activations' order (the
// chunk's even inputs, then its odd ones); outputs past `count` zero.
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline void unpack_chunk(const uint32_t* words, int64_t words_per_row, int64_t count, int64_t c,
                         uint8_t (*tile)[kAmxChunk]) {
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  for (int64_t i = 0; i < kAmxOutputs; ++i) {
    __m512i bytes = _mm512_setzero_si512();
    if (i < count) {
      const uint32_t* chunk_words = words + i * words_per_row + 8 * c;
      _mm_prefetch(reinterpret_cast<const char*>(chunk_words + kPrefetchWords), _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk_words));
      bytes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, low_nibbles)),
                                 _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles), 1);
    }
    _mm512_storeu_si512(tile[i], bytes);
  }
}

// acc[i] (lanes: rows) += the group's exact sums times both scales, plus the group's sums of x
// times the weight's bias: the float operations every path of this file's AMX products shares.
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline void add_group(__m512* acc, const int32_t (*sums)[kAmxRows], __m512 x_scales, __m512 x_sums,
                      const float* weight_scales, const float* weight_biases, int64_t groups, int64_t g) {
  for (int64_t i = 0; i < kAmxOutputs; ++i) {
    const __m512 products = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[i])), x_scales);
    acc[i] = _mm512_fmadd_ps(products, _mm512_set1_ps(weight_scales[i * groups + g]), acc[i]);
    acc[i] = _mm512_fmadd_ps(x_sums, _mm512_set1_ps(weight_biases[i * groups + g]), acc[i]);
  }
}

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-int8")))
void amx_outputs(const AmxActivations& act, const uint32_t* words, const T* scales, const T* biases, float* out,
                 int64_t rows, int64_t inputs, int64_t outputs, int64_t group_size, int64_t first_block,
                 int64_t last_block) {
  const int64_t chunks = inputs / kAmxChunk, groups = inputs / group_size, per_group = group_size / kAmxChunk;
  const int64_t words_per_row = inputs / 8, row_blocks = (rows + kAmxRows - 1) / kAmxRows;
  // Two of each so that a group's tile products run while the previous group's sums are scaled.
  alignas(64) uint8_t unpacked[2][2][kAmxOutputs][kAmxChunk];  // [buffer][a group's chunk (up to 2)]
  alignas(64) int32_t sums[2][kAmxOutputs][kAmxRows];
  // With several blocks of rows (prefill chunks) each block of outputs is unpacked once, whole,
  // instead of once per block of rows; one block of rows unpacks a group at a time, as it goes.
  std::vector<uint8_t> whole(row_blocks > 1 ? chunks * kAmxOutputs * kAmxChunk : 0);  // [chunk][output][input]
  auto whole_chunk = [&](int64_t c) {
    return reinterpret_cast<uint8_t(*)[kAmxChunk]>(whole.data() + c * kAmxOutputs * kAmxChunk);
  };
  auto weight_tile = [&](int buffer, int64_t g, int64_t k) -> const uint8_t* {
    return row_blocks > 1 ? whole_chunk(g * per_group + k)[0] : unpacked[buffer][k][0];
  };
  std::vector<float> weight_scales(kAmxOutputs * groups), weight_biases(kAmxOutputs * groups);
  configure_tiles();
  for (int64_t block = first_block; block < last_block; ++block) {
    const int64_t o0 = block * kAmxOutputs, count = std::min(kAmxOutputs, outputs - o0);
    block_floats(scales, o0, count, groups, false, weight_scales.data());
    block_floats(biases, o0, count, groups, false, weight_biases.data());
    const uint32_t* block_words = words + o0 * words_per_row;
    if (row_blocks > 1)
      for (int64_t c = 0; c < chunks; ++c)
        unpack_chunk(block_words, words_per_row, count, c, whole_chunk(c));
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
      const int8_t* tiles = act.tiles.data() + rb * chunks * kAmxChunk * kAmxRows;
      const float* x_scales = act.scales.data() + rb * groups * kAmxRows;
      const float* x_sums = act.sums.data() + rb * groups * kAmxRows;
      __m512 acc[kAmxOutputs];
      for (auto& a : acc) a = _mm512_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        const int buffer = g & 1;
        for (int64_t k = 0; k < per_group && row_blocks == 1; ++k)
          unpack_chunk(block_words, words_per_row, count, g * per_group + k, unpacked[buffer][k]);
        // Tile registers are named by constants: the two buffers' sums go to tiles 2 and 3.
        if (buffer == 0) {
          _tile_zero(2);
          for (int64_t k = 0; k < per_group; ++k) {
            _tile_loadd(0, weight_tile(0, g, k), kAmxChunk);
            _tile_loadd(1, tiles + (g * per_group + k) * kAmxChunk * kAmxRows, kAmxRows * 4);
            _tile_dpbusd(2, 0, 1);
          }
          _tile_stored(2, sums[0], kAmxRows * 4);
        } else {
          _tile_zero(3);
          for (int64_t k = 0; k < per_group; ++k) {
            _tile_loadd(4, weight_tile(1, g, k), kAmxChunk);
            _tile_loadd(5, tiles + (g * per_group + k) * kAmxChunk * kAmxRows, kAmxRows * 4);
            _tile_dpbusd(3, 4, 5);
          }
          _tile_stored(3, sums[1], kAmxRows * 4);
        }
        if (g > 0)
          add_group(acc, sums[buffer ^ 1], _mm512_loadu_ps(x_scales + (g - 1) * kAmxRows),
                    _mm512_loadu_ps(x_sums + (g - 1) * kAmxRows), weight_scales.data(), weight_biases.data(), groups, g - 1);
      }
      add_group(acc, sums[(groups - 1) & 1], _mm512_loadu_ps(x_scales + (groups - 1) * kAmxRows),
                _mm512_loadu_ps(x_sums + (groups - 1) * kAmxRows), weight_scales.data(), weight_biases.data(), groups,
                groups - 1);
      alignas(64) float result[kAmxOutputs][kAmxRows];
      for (int64_t i = 0; i < kAmxOutputs; ++i) _mm512_store_ps(result[i], acc[i]);
      for (int64_t lane = 0; lane < std::min(kAmxRows, rows - rb * kAmxRows); ++lane)
        for (int64_t i = 0; i < count; ++i) out[(rb * kAmxRows + lane) * outputs + o0 + i] = result[i][lane];
    }
  }
  _tile_release();
}

// One row on the same machines: AVX-512 VNNI instead of a tile whose other 15 rows would be
// empty. Each output's integer sums come from vpdpbusd over its chunk's bytes; 16 outputs' sums
// are then reduced into one vector (lanes: outputs) and scaled with the float operations of
// `add_group`, element for element, so a row's bits do not depend on which of the two ran.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
inline __m256i sum_lanes(__m256i a, __m256i b, __m256i c, __m256i d, __m256i e, __m256i f, __m256i g, __m256i h) {
  // hadd works within 128-bit halves: after two levels each half holds four outputs' partial sums.
  const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
  const __m256i efgh = _mm256_hadd_epi32(_mm256_hadd_epi32(e, f), _mm256_hadd_epi32(g, h));
  return _mm256_add_epi32(_mm256_permute2x128_si256(abcd, efgh, 0x20), _mm256_permute2x128_si256(abcd, efgh, 0x31));
}

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
void vnni_row(const Int8Activations& act, const uint32_t* words, const T* scales, const T* biases, float* out,
              int64_t inputs, int64_t outputs, int64_t group_size, int64_t first_block, int64_t last_block) {
  const int64_t groups = inputs / group_size, per_group = group_size / kAmxChunk, words_per_row = inputs / 8;
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  const int8_t* x = act.values.data_ptr<int8_t>();  // in chunk order: even inputs, then odd
  const float* x_scales = act.group_scales.data_ptr<float>();
  const float* x_sums = act.group_sums.data_ptr<float>();
  std::vector<float> weight_scales(groups * kAmxOutputs), weight_biases(groups * kAmxOutputs);  // [group][output]
  std::vector<__m256i> dots(groups * kAmxOutputs);                                                  // [group][output]
  for (int64_t block = first_block; block < last_block; ++block) {
    const int64_t o0 = block * kAmxOutputs, count = std::min(kAmxOutputs, outputs - o0);
    block_floats(scales, o0, count, groups, true, weight_scales.data());
    block_floats(biases, o0, count, groups, true, weight_biases.data());
    // Each output's row of words is read start to end (one stream), its groups' sums of products
    // kept as 8 lanes each; then each group's 16 outputs are reduced together.
    for (int64_t i = 0; i < count; ++i) {
      const uint32_t* row_words = words + (o0 + i) * words_per_row;
      for (int64_t g = 0; g < groups; ++g) {
        __m256i dot = _mm256_setzero_si256();
        for (int64_t k = 0; k < per_group; ++k) {
          const int64_t c = g * per_group + k;
          _mm_prefetch(reinterpret_cast<const char*>(row_words + 8 * c + kPrefetchWords), _MM_HINT_T0);
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row_words + 8 * c));
          const int8_t* xc = x + c * kAmxChunk;
          dot = _mm256_dpbusd_epi32(dot, _mm256_and_si256(v, low_nibbles),
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc)));
          dot = _mm256_dpbusd_epi32(dot, _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles),
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + 32)));
        }
        dots[g * kAmxOutputs + i] = dot;
      }
    }
    for (int64_t i = count; i < kAmxOutputs; ++i)
      for (int64_t g = 0; g < groups; ++g) dots[g * kAmxOutputs + i] = _mm256_setzero_si256();
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m256i* d = dots.data() + g * kAmxOutputs;
      const __m512i sums = _mm512_inserti64x4(_mm512_castsi256_si512(sum_lanes(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7])),
                                              sum_lanes(d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15]), 1);
      const __m512 products = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(x_scales[g]));
      acc = _mm512_fmadd_ps(products, _mm512_loadu_ps(weight_scales.data() + g * kAmxOutputs), acc);
      acc = _mm512_fmadd_ps(_mm512_set1_ps(x_sums[g]), _mm512_loadu_ps(weight_biases.data() + g * kAmxOutputs), acc);
    }
    alignas(64) float result[kAmxOutputs];
    _mm512_store_ps(result, acc);
    for (int64_t i = 0; i < count; ++i) out[o0 + i] = result[i];
  }
}

template <typename T>
void amx_product(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales, const at::Tensor& biases,
                 at::Tensor& out, int64_t group_size) {
  const int64_t rows = x.size(0), inputs = x.size(1), outputs = words.size(0), groups = inputs / group_size;
  const Int8Activations a = int8_activations(x, group_size);
  const auto* w = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  const T* s = scales.data_ptr<T>();
  const T* b = biases.data_ptr<T>();
  float* y = out.data_ptr<float>();
  const int64_t blocks = (outputs + kAmxOutputs - 1) / kAmxOutputs;
  if (rows == 1) {
    at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
      vnni_row<T>(a, w, s, b, y, inputs, outputs, group_size, first, last);
    });
    return;
  }
  const AmxActivations act = amx_activations(a, rows, inputs, groups);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    amx_outputs<T>(act, w, s, b, y, rows, inputs, outputs, group_size, first, last);
  });
}

bool amx_reads(int64_t bits, int64_t group_size, bool int8_activations) {
  return bits == 4 && int8_activations && (group_size == 64 || group_size == 128) && amx_ready();
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

// With `bfloat16_tiles` each decoded tile and the activations are rounded to bfloat16 for the
// product (float32 sums, the result rounded to bfloat16, the caller's dtype): CPUs with AVX-512
// BF16 multiply bfloat16 natively, at several times float32's rate.
template <int BITS, typename T>
void tiled_product(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales, const at::Tensor& biases,
                   at::Tensor& out, int64_t group_size, bool bfloat16_tiles) {
  const int64_t inputs = x.size(1), outputs = words.size(0);
  at::Tensor x_permuted = permuted(x, BITS).view({x.size(0), inputs});
  if (bfloat16_tiles) x_permuted = x_permuted.to(at::kBFloat16);
  const auto* w = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  at::Tensor tile = at::empty({std::min(kTileOutputs, outputs), inputs}, x.options());
  for (int64_t first = 0; first < outputs; first += kTileOutputs) {
    const int64_t last = std::min(first + kTileOutputs, outputs);
    decode_tile<BITS, T>(w, scales.data_ptr<T>(), biases.data_ptr<T>(), tile.data_ptr<float>(), inputs, group_size,
                         first, last);
    const at::Tensor decoded = tile.narrow(0, 0, last - first);
    out.narrow(1, first, last - first).copy_(at::mm(x_permuted, (bfloat16_tiles ? decoded.to(at::kBFloat16) : decoded).t()));
  }
}

at::Tensor affine_matmul(const at::Tensor& x, const at::Tensor& words, const at::Tensor& scales,
                         const at::Tensor& biases, int64_t bits, int64_t group_size, bool int8_activations,
                         bool amx, bool bfloat16_tiles) {
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
  if (BITS == 4 && amx && amx_reads(bits, group_size, int8_activations))                                        \
    return amx_product<T>(x, words, scales, biases, out, group_size), out;                                      \
  if (!decode) return tiled_product<BITS, T>(x, words, scales, biases, out, group_size, bfloat16_tiles), out;   \
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
        "bool int8_activations=False, bool amx=False, bool bfloat16_tiles=False) -> Tensor");
  m.impl("affine_matmul", c10::DispatchKey::CPU, TORCH_FN(affine_matmul));
  // Whether 4-bit products with int8 activations in groups of 64 or 128 run on AMX tiles here.
  m.def("amx_ready() -> bool", [] { return amx_ready(); });
}
