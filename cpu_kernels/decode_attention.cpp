// Attention of a decode-sized block (a draft step, a target step, a verification block) over the KV
// cache on x86 CPUs with AVX2 and FMA.
//
// Why a kernel of our own: PyTorch's CPU matmul and softmax round differently for different shapes,
// so a verification block of n rows only gives the single steps' bits if every row runs alone, and
// then each row reads the whole cache again (n times the bytes and the arithmetic of one row). Here
// each KV head's rows are read once for all of its query heads and all of the block's rows, and a
// row's result never depends on the other rows: each query row is computed by the same operations in
// the same order, over key chunks whose bounds are absolute (multiples of kChunk from the first key),
// whatever the block size and whatever the number of threads.
//
// Three passes per call, each parallel over (unit, chunk of keys) or (unit, row):
// 1. logits: a chunk of keys is converted to float32 once for all rows; a row's logits for 8 keys
//    are 8 registers of products along head_dim, reduced into one register at the end;
// 2. softmax per row over the keys it sees (causal within the block), folded into the draft's
//    running scores if asked;
// 3. probabilities times values, per chunk into float32 partial sums that are then added chunk by
//    chunk in order.
// A unit is a KV head (dense attention, or sets per KV head) or one of the heads / units query
// heads' groups that share an index set (sets per query head).

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
#include <limits>
#include <vector>

namespace {

constexpr int64_t kChunk = 64;  // keys per chunk: a float32 [64, 128] tile of keys fits in L1
constexpr int64_t kMaxRows = 16;

template <typename T>
inline __m256 load8(const T* p);

template <>
inline __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}

template <>
inline __m256 load8<at::BFloat16>(const at::BFloat16* p) {
  __m128i half_words = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half_words), 16));
}

template <>
inline __m256 load8<at::Half>(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float max8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr float kExpPolynomial[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                     4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

// exp for x <= 0 (logits minus their maximum): Cephes' expf, a degree-5 polynomial on
// [-ln2/2, ln2/2] times 2^n; relative error ~1e-7, and below e^-87 it returns 0.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(kExpPolynomial[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kExpPolynomial[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// sums[0 .. 8 * BLOCKS) = the sum over k < count of p[k] * values[k * stride ..], in k's order.
template <int BLOCKS>
inline void weighted_sum(const float* p, const float* values, int64_t count, int64_t stride, float* sums) {
  __m256 acc[BLOCKS];
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (int64_t k = 0; k < count; ++k) {
    const __m256 pk = _mm256_set1_ps(p[k]);
    for (int b = 0; b < BLOCKS; ++b) acc[b] = _mm256_fmadd_ps(pk, _mm256_loadu_ps(values + k * stride + 8 * b), acc[b]);
  }
  for (int b = 0; b < BLOCKS; ++b) _mm256_storeu_ps(sums + 8 * b, acc[b]);
}

// The lane-wise sums of eight vectors: lane k of the result is the sum of v[k]'s lanes.
inline __m256 sums8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // a holds v0..v3's sums of lanes 0-3 in its low half and of lanes 4-7 in its high half; so does b.
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// Where each unit's keys are: key j of unit u is cache row `position(u, j)` of KV head `kv_head(u)`.
struct Keys {
  int64_t units, per_kv_head, length, kept, start;  // length = kept + n (dense: kept = start)
  const int64_t* indices;                             // [units, kept] or null (dense)

  int64_t kv_head(int64_t u) const { return u / per_kv_head; }
  int64_t position(int64_t u, int64_t j) const {
    if (indices == nullptr) return j;
    return j < kept ? indices[u * kept + j] : start + (j - kept);
  }
};

// Keys j0 .. j0 + kChunk of unit u in float32 into tile [kChunk, head_dim]; past the last key the
// last one repeats (those logits are never used).
template <typename T>
void convert_rows(const T* base, int64_t row_stride, const Keys& keys, int64_t u, int64_t j0, int64_t head_dim, float* tile) {
  const int64_t width = std::min(kChunk, keys.length - j0);
  for (int64_t k = 0; k < kChunk; ++k) {
    const T* row = base + keys.position(u, j0 + std::min(k, width - 1)) * row_stride;
    for (int64_t t = 0; t < head_dim; t += 8) _mm256_storeu_ps(tile + k * head_dim + t, load8(row + t));
  }
}

// out[u, r] = the sum over the chunks (of `chunk` keys) row r sees of partial [units, chunks, stride
// rows, head_dim], in the chunks' order.
template <typename T, typename Seen>
void add_partial_sums(const float* partial, const Keys& keys, int64_t rows, int64_t stride, int64_t chunk, int64_t chunks,
                      int64_t head_dim, const Seen& seen, T* out) {
  at::parallel_for(0, keys.units * rows, 1, [&](int64_t first, int64_t last) {
    std::vector<float> total(head_dim);
    for (int64_t i = first; i < last; ++i) {
      const int64_t u = i / rows, r = i % rows, used = (seen(r) + chunk - 1) / chunk;
      std::fill(total.begin(), total.end(), 0.0f);
      for (int64_t c = 0; c < used; ++c) {
        const float* sums = &partial[((u * chunks + c) * stride + r) * head_dim];
        for (int64_t t = 0; t < head_dim; ++t) total[t] += sums[t];
      }
      for (int64_t t = 0; t < head_dim; ++t) out[i * head_dim + t] = static_cast<T>(total[t]);
    }
  });
}

// The draft's running scores from probabilities [units, rows] x keys, row r of unit u at
// probs[u * unit_stride + r_offset(r) ...]: per KV head (max or sum over its query heads and rows) or per query head.
template <typename Probability>
void fold_scores(const Probability& probability, const Keys& keys, int64_t heads, int64_t n, int64_t rows,
                 float* scores, int64_t score_stride, bool score_max, bool score_per_head) {
  const int64_t group = heads / keys.units, score_units = score_per_head ? heads : keys.units;
  at::parallel_for(0, score_units, 1, [&](int64_t first, int64_t last) {
    for (int64_t s = first; s < last; ++s) {
      float* dst = scores + s * score_stride;
      const int64_t u = score_per_head ? s / group : s;
      const int64_t r0 = score_per_head ? (s % group) * n : 0, r1 = score_per_head ? r0 + n : rows;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < keys.length; ++j)
          dst[j] = score_max ? std::max(dst[j], probability(u, r, j)) : dst[j] + probability(u, r, j);
    }
  });
}

// Passes 1 and 2: each unit's query rows' probabilities over the keys they see, [units, rows,
// padded] with padded = the keys rounded up to whole chunks (zero beyond what a row sees). Row r of
// a unit is query head r / n of its group at block row r % n.
template <typename T>
std::vector<float> probabilities(const at::Tensor& q, const at::Tensor& cache_k, const Keys& keys) {
  const int64_t heads = q.size(0), n = q.size(1), head_dim = q.size(2);
  const int64_t group = heads / keys.units, rows = group * n;  // query rows per unit
  const int64_t chunks = (keys.length + kChunk - 1) / kChunk, padded = chunks * kChunk;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const T* qp = q.data_ptr<T>();
  const T* kp = cache_k.data_ptr<T>();
  const int64_t kv_stride = cache_k.stride(0), row_stride = cache_k.stride(1);
  auto seen = [&](int64_t r) { return keys.length - n + r % n + 1; };  // keys row r sees

  // Query rows in float32, [units, rows, head_dim].
  std::vector<float> queries(keys.units * rows * head_dim);
  for (int64_t i = 0; i < keys.units * rows; ++i)
    for (int64_t t = 0; t < head_dim; ++t) queries[i * head_dim + t] = static_cast<float>(qp[i * head_dim + t]);

  // 1. logits [units, rows, padded]
  std::vector<float> logits(keys.units * rows * padded);
  at::parallel_for(0, keys.units * chunks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> tile(kChunk * head_dim);  // the chunk's keys in float32, [kChunk, head_dim]
    for (int64_t task = first; task < last; ++task) {
      const int64_t u = task / chunks, c = task % chunks, j0 = c * kChunk;
      convert_rows(kp + keys.kv_head(u) * kv_stride, row_stride, keys, u, j0, head_dim, tile.data());
      for (int64_t r = 0; r < rows; ++r) {
        if (seen(r) <= j0) continue;
        const float* qr = &queries[(u * rows + r) * head_dim];
        float* row = &logits[(u * rows + r) * padded + j0];
        for (int64_t k0 = 0; k0 < kChunk; k0 += 8) {
          __m256 acc[8];
          for (auto& a : acc) a = _mm256_setzero_ps();
          for (int64_t t = 0; t < head_dim; t += 8) {
            const __m256 qt = _mm256_loadu_ps(qr + t);
            for (int64_t k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(qt, _mm256_loadu_ps(&tile[(k0 + k) * head_dim + t]), acc[k]);
          }
          _mm256_storeu_ps(row + k0, _mm256_mul_ps(sums8(acc), _mm256_set1_ps(scale)));
        }
      }
    }
  });

  // 2. softmax in place: logits become probabilities over the keys each row sees, zero beyond.
  at::parallel_for(0, keys.units * rows, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      float* row = &logits[i * padded];
      const int64_t length = seen(i % rows), whole = length / 8 * 8;
      for (int64_t j = length; j < padded; ++j) row[j] = -std::numeric_limits<float>::infinity();
      __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < padded; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(row + j));
      const __m256 top = _mm256_set1_ps(max8(m));
      __m256 total = _mm256_setzero_ps();
      for (int64_t j = 0; j < whole; j += 8) {
        __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), top));
        _mm256_storeu_ps(row + j, p);
        total = _mm256_add_ps(total, p);
      }
      float sum = sts_edge_simd::horizontal_sum(total);
      for (int64_t j = whole; j < length; ++j) {  // the tail one at a time, in order
        float tail[8] = {row[j] - max8(m)};
        _mm256_storeu_ps(tail, exp8(_mm256_loadu_ps(tail)));
        row[j] = tail[0];
        sum += tail[0];
      }
      for (int64_t j = length; j < padded; ++j) row[j] = 0.0f;
      const __m256 inverse = _mm256_set1_ps(1.0f / sum);
      for (int64_t j = 0; j < padded; j += 8) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), inverse));
    }
  });
  return logits;
}

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& cache_k, const at::Tensor& cache_v, const Keys& keys,
            float* scores, int64_t score_stride, bool score_max, bool score_per_head, at::Tensor& out) {
  const int64_t heads = q.size(0), n = q.size(1), head_dim = q.size(2);
  const int64_t rows = heads / keys.units * n;  // query rows per unit
  const int64_t chunks = (keys.length + kChunk - 1) / kChunk, padded = chunks * kChunk;
  const T* vp = cache_v.data_ptr<T>();
  const int64_t kv_stride = cache_v.stride(0), row_stride = cache_v.stride(1);
  auto seen = [&](int64_t r) { return keys.length - n + r % n + 1; };
  std::vector<float> logits = probabilities<T>(q, cache_k, keys);  // now probabilities

  if (scores != nullptr) {
    fold_scores([&](int64_t u, int64_t r, int64_t j) { return logits[(u * rows + r) * padded + j]; }, keys, heads, n,
                rows, scores, score_stride, score_max, score_per_head);
  }

  // 3. probabilities times values: per (unit, chunk) partial sums [rows, head_dim], then in order.
  std::vector<float> partial(keys.units * chunks * rows * head_dim);
  at::parallel_for(0, keys.units * chunks, 1, [&](int64_t first, int64_t last) {
    std::vector<float> tile(kChunk * head_dim);  // the chunk's values in float32, [kChunk, head_dim]
    for (int64_t task = first; task < last; ++task) {
      const int64_t u = task / chunks, c = task % chunks, j0 = c * kChunk;
      const int64_t width = std::min(kChunk, keys.length - j0);
      convert_rows(vp + keys.kv_head(u) * kv_stride, row_stride, keys, u, j0, head_dim, tile.data());
      for (int64_t r = 0; r < rows; ++r) {
        float* sums = &partial[((u * chunks + c) * rows + r) * head_dim];
        const int64_t count = std::min(width, seen(r) - j0);
        const float* p = &logits[(u * rows + r) * padded + j0];
        for (int64_t t0 = 0; t0 < head_dim; t0 += 64) {
          const float* v = &tile[t0];
          switch (std::min<int64_t>(8, (head_dim - t0) / 8)) {
            case 8: weighted_sum<8>(p, v, count, head_dim, sums + t0); break;
            case 7: weighted_sum<7>(p, v, count, head_dim, sums + t0); break;
            case 6: weighted_sum<6>(p, v, count, head_dim, sums + t0); break;
            case 5: weighted_sum<5>(p, v, count, head_dim, sums + t0); break;
            case 4: weighted_sum<4>(p, v, count, head_dim, sums + t0); break;
            case 3: weighted_sum<3>(p, v, count, head_dim, sums + t0); break;
            case 2: weighted_sum<2>(p, v, count, head_dim, sums + t0); break;
            default: weighted_sum<1>(p, v, count, head_dim, sums + t0); break;
          }
        }
      }
    }
  });
  add_partial_sums(partial.data(), keys, rows, rows, kChunk, chunks, head_dim, seen, out.data_ptr<T>());
}

// The same three passes on AMX tiles, for bfloat16 (where the CPU has AMX-BF16). Per 16 keys and
// 16 query rows one tile product per 32 of head_dim gives the logits transposed, [keys, rows] (the
// keys' rows load into a tile as they are; the queries are laid out once per call); so the softmax
// runs down the keys with one query row per vector lane. The probabilities are rounded to bfloat16
// for the product with the values (as PyTorch's bfloat16 attention does) and multiplied on tiles
// too, in [rows, 16 of head_dim] blocks over 32 keys at a time. Tile products accumulate each
// element in a fixed order whatever the other rows, so a row's bits still do not depend on the block.
constexpr int64_t kTile = 16;
constexpr int64_t kValueChunk = 256;  // keys per partial sum of probabilities times values
#define STS_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

bool amx_bf16_ready() {
  static const bool ready = sts_edge_amx::cpu_has_amx(true) && sts_edge_amx::tiles_permitted();
  return ready;
}

STS_AMX_TARGET void configure_attention_tiles() {
  sts_edge_amx::TileConfig config;
  for (int t = 0; t < 3; ++t) config.rows[t] = kTile, config.bytes_per_row[t] = 64;  // 0 sums, 1 and 2 operands
  _tile_loadconfig(&config);
}

STS_AMX_TARGET inline __m512 exp16(__m512 x) {  // exp8's polynomial, 16 lanes
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                  _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(kExpPolynomial[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kExpPolynomial[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

// One call's operands and buffers; each pass's share of the work is a member compiled for AMX
// (PyTorch's parallel_for runs lambdas, which do not take a function's target attributes).
struct AmxAttention {
  const Keys& keys;
  int64_t heads, n, head_dim, rows, blocks, chunks, steps, value_chunks, value_padded;
  float scale;
  const uint16_t *kp, *vp;
  int64_t kv_stride, row_stride;
  std::vector<uint16_t> query_tiles;  // per [unit, block of 16 rows, step]: [16 pairs of head_dim, 16 rows, 2]
  std::vector<float> logits;          // transposed: [units, blocks, value_padded keys, 16 rows]
  std::vector<float> inverses;        // 1 / each row's sum of exponentials: [units, blocks, 16 rows]
  std::vector<float> partial;         // [units, value_chunks, blocks * 16 rows, head_dim]

  int64_t seen(int64_t r) const { return keys.length - n + r % n + 1; }
  float probability(int64_t u, int64_t r, int64_t j) const {
    const int64_t lane = (u * blocks + r / kTile) * kTile + r % kTile;
    return logits[((u * blocks + r / kTile) * value_padded + j) * kTile + r % kTile] * inverses[lane];
  }

  AmxAttention(const at::Tensor& q, const at::Tensor& cache_k, const at::Tensor& cache_v, const Keys& keys_)
      : keys(keys_), heads(q.size(0)), n(q.size(1)), head_dim(q.size(2)) {
    rows = heads / keys.units * n, blocks = (rows + kTile - 1) / kTile;
    chunks = (keys.length + kChunk - 1) / kChunk, steps = head_dim / 32;
    value_chunks = (keys.length + kValueChunk - 1) / kValueChunk, value_padded = value_chunks * kValueChunk;
    scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    kp = reinterpret_cast<const uint16_t*>(cache_k.data_ptr<at::BFloat16>());
    vp = reinterpret_cast<const uint16_t*>(cache_v.data_ptr<at::BFloat16>());
    kv_stride = cache_k.stride(0), row_stride = cache_k.stride(1);
    const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
    query_tiles.assign(keys.units * blocks * steps * kTile * 32, 0);
    for (int64_t u = 0; u < keys.units; ++u)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t t = 0; t < head_dim; ++t)
          query_tiles[(((u * blocks + r / kTile) * steps + t / 32) * kTile + t % 32 / 2) * 32 + r % kTile * 2 + t % 2] =
              qp[(u * rows + r) * head_dim + t];
    logits.resize(keys.units * blocks * value_padded * kTile);
    inverses.resize(keys.units * blocks * kTile);
    partial.resize(keys.units * value_chunks * blocks * kTile * head_dim);
  }

  // 1. logits of tasks (unit, chunk) [first, last)
  STS_AMX_TARGET void logit_tasks(int64_t first, int64_t last) {
    configure_attention_tiles();
    std::vector<uint16_t> tile(kChunk * head_dim);  // the chunk's keys, rows as in the cache, zero past the last
    for (int64_t task = first; task < last; ++task) {
      const int64_t u = task / chunks, j0 = task % chunks * kChunk, width = std::min(kChunk, keys.length - j0);
      // A whole chunk of consecutive rows loads into tiles from the cache itself; index sets and the
      // last chunk are gathered first (its rows past the last key zero).
      const bool in_place = keys.indices == nullptr && width == kChunk;
      const uint16_t* rows_at = in_place ? kp + keys.kv_head(u) * kv_stride + j0 * row_stride : tile.data();
      const int64_t stride = in_place ? row_stride : head_dim;
      for (int64_t k = 0; k < kChunk && !in_place; ++k) {
        uint16_t* dst = &tile[k * head_dim];
        if (k < width) std::memcpy(dst, kp + keys.kv_head(u) * kv_stride + keys.position(u, j0 + k) * row_stride, head_dim * 2);
        else std::memset(dst, 0, head_dim * 2);
      }
      for (int64_t k0 = 0; k0 < kChunk; k0 += kTile)
        for (int64_t b = 0; b < blocks; ++b) {
          _tile_zero(0);
          for (int64_t step = 0; step < steps; ++step) {
            _tile_loadd(1, rows_at + k0 * stride + step * 32, stride * 2);
            _tile_loadd(2, &query_tiles[((u * blocks + b) * steps + step) * kTile * 32], 64);
            _tile_dpbf16ps(0, 1, 2);
          }
          _tile_stored(0, &logits[((u * blocks + b) * value_padded + j0 + k0) * kTile], 64);
        }
    }
  }

  // 2. softmax down the keys of (unit, block) [first, last), one row per lane: exponentials in
  // place, zero where a row does not see a key, and each row's 1 / sum (applied as they are read).
  STS_AMX_TARGET void softmax_blocks(int64_t first, int64_t last) {
    for (int64_t ub = first; ub < last; ++ub) {
      const int64_t b = ub % blocks;
      alignas(64) int32_t limits[kTile];
      for (int64_t lane = 0; lane < kTile; ++lane)
        limits[lane] = static_cast<int32_t>(b * kTile + lane < rows ? seen(b * kTile + lane) : keys.length);
      const __m512i limit = _mm512_load_si512(limits);
      const __m512 scales = _mm512_set1_ps(scale);
      float* column = &logits[ub * value_padded * kTile];
      __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < keys.length; ++j) {
        const __mmask16 visible = _mm512_cmpgt_epi32_mask(limit, _mm512_set1_epi32(static_cast<int32_t>(j)));
        top = _mm512_mask_max_ps(top, visible, top, _mm512_mul_ps(_mm512_loadu_ps(column + j * kTile), scales));
      }
      __m512 total = _mm512_setzero_ps();
      for (int64_t j = 0; j < keys.length; ++j) {
        const __mmask16 visible = _mm512_cmpgt_epi32_mask(limit, _mm512_set1_epi32(static_cast<int32_t>(j)));
        const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(column + j * kTile), scales);
        const __m512 p = _mm512_maskz_mov_ps(visible, exp16(_mm512_sub_ps(x, top)));
        _mm512_storeu_ps(column + j * kTile, p);
        total = _mm512_add_ps(total, p);
      }
      _mm512_storeu_ps(&inverses[ub * kTile], _mm512_div_ps(_mm512_set1_ps(1.0f), total));
      for (int64_t j = keys.length; j < value_padded; ++j) _mm512_storeu_ps(column + j * kTile, _mm512_setzero_ps());
    }
  }

  // 3. probabilities (rounded to bfloat16) times values for tasks (unit, value chunk) [first, last)
  STS_AMX_TARGET void value_tasks(int64_t first, int64_t last) {
    configure_attention_tiles();
    // Values as the second operand, per 16 of head_dim a [pairs of keys, 16, 2] tile column; the
    // probabilities as the first, [blocks, 16 rows, kValueChunk keys].
    std::vector<uint16_t> values(head_dim / kTile * (kValueChunk / 2) * 32), probs(blocks * kTile * kValueChunk);
    for (int64_t task = first; task < last; ++task) {
      const int64_t u = task / value_chunks, c = task % value_chunks, j0 = c * kValueChunk;
      const int64_t width = std::min(kValueChunk, keys.length - j0);
      const uint16_t* base = vp + keys.kv_head(u) * kv_stride;
      for (int64_t k = 0; k < kValueChunk; k += 2) {  // keys k and k + 1 interleaved: one 32-bit lane per pair
        const uint16_t* even = base + keys.position(u, j0 + std::min(k, width - 1)) * row_stride;
        const uint16_t* odd = base + keys.position(u, j0 + std::min(k + 1, width - 1)) * row_stride;
        const __mmask16 live = (k < width ? 0xFFFF : 0), live_odd = (k + 1 < width ? 0xFFFF : 0);
        for (int64_t t0 = 0; t0 < head_dim; t0 += kTile) {
          const __m512i low = _mm512_maskz_cvtepu16_epi32(live, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + t0)));
          const __m512i high = _mm512_maskz_cvtepu16_epi32(live_odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd + t0)));
          _mm512_storeu_si512(&values[((t0 / kTile) * (kValueChunk / 2) + k / 2) * 32],
                              _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
        }
      }
      for (int64_t b = 0; b < blocks; ++b) {
        const __m512 inverse = _mm512_loadu_ps(&inverses[(u * blocks + b) * kTile]);
        for (int64_t k = 0; k < kValueChunk; k += 16) {
          const float* column = &logits[((u * blocks + b) * value_padded + j0 + k) * kTile];
          alignas(64) float normalized[16][kTile];  // [key][lane], then read down each lane
          for (int64_t i = 0; i < 16; ++i) _mm512_store_ps(normalized[i], _mm512_mul_ps(_mm512_loadu_ps(column + i * kTile), inverse));
          for (int64_t lane = 0; lane < kTile; ++lane) {
            alignas(64) float gathered[16];
            for (int64_t i = 0; i < 16; ++i) gathered[i] = normalized[i][lane];
            __m256bh rounded = _mm512_cvtneps_pbh(_mm512_load_ps(gathered));
            std::memcpy(&probs[(b * kTile + lane) * kValueChunk + k], &rounded, 32);
          }
        }
      }
      for (int64_t b = 0; b < blocks; ++b)
        for (int64_t t0 = 0; t0 < head_dim; t0 += kTile) {
          _tile_zero(0);
          for (int64_t k = 0; k < kValueChunk; k += 32) {
            _tile_loadd(1, &probs[b * kTile * kValueChunk + k], kValueChunk * 2);
            _tile_loadd(2, &values[((t0 / kTile) * (kValueChunk / 2) + k / 2) * 32], 64);
            _tile_dpbf16ps(0, 1, 2);
          }
          _tile_stored(0, &partial[((u * value_chunks + c) * blocks * kTile + b * kTile) * head_dim + t0], head_dim * 4);
        }
    }
  }
};

void attend_amx(const at::Tensor& q, const at::Tensor& cache_k, const at::Tensor& cache_v, const Keys& keys, float* scores,
                int64_t score_stride, bool score_max, bool score_per_head, at::Tensor& out) {
  AmxAttention a(q, cache_k, cache_v, keys);
  at::parallel_for(0, keys.units * a.chunks, 1, [&](int64_t first, int64_t last) { a.logit_tasks(first, last); });
  at::parallel_for(0, keys.units * a.blocks, 1, [&](int64_t first, int64_t last) { a.softmax_blocks(first, last); });
  if (scores != nullptr) {
    fold_scores([&](int64_t u, int64_t r, int64_t j) { return a.probability(u, r, j); }, keys, a.heads, a.n, a.rows, scores,
                score_stride, score_max, score_per_head);
  }
  at::parallel_for(0, keys.units * a.value_chunks, 1, [&](int64_t first, int64_t last) { a.value_tasks(first, last); });
  add_partial_sums(a.partial.data(), keys, a.rows, a.blocks * kTile, kValueChunk, a.value_chunks, a.head_dim,
                   [&](int64_t r) { return a.seen(r); }, out.data_ptr<at::BFloat16>());
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& cache_k, const at::Tensor& cache_v, int64_t start,
                            const c10::optional<at::Tensor>& indices, const c10::optional<at::Tensor>& scores,
                            bool score_max, bool score_per_head, bool amx) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be contiguous [heads, n, head_dim]");
  TORCH_CHECK(cache_k.dim() == 3 && cache_k.sizes() == cache_v.sizes() && cache_k.strides() == cache_v.strides() &&
                  cache_k.stride(2) == 1,
              "cache_k and cache_v must be [kv_heads, capacity, head_dim] with one layout, rows contiguous");
  TORCH_CHECK(q.scalar_type() == cache_k.scalar_type() && q.scalar_type() == cache_v.scalar_type(),
              "q and the cache must have one dtype");
  const int64_t heads = q.size(0), n = q.size(1), head_dim = q.size(2), kv_heads = cache_k.size(0);
  TORCH_CHECK(cache_k.size(2) == head_dim && head_dim % 8 == 0, "head_dim must be a multiple of 8 and match the cache");
  TORCH_CHECK(n >= 1 && n <= kMaxRows, "a decode-sized block has 1 to ", kMaxRows, " rows, got ", n);
  TORCH_CHECK(heads % kv_heads == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(start >= 0 && start + n <= cache_k.size(1), "the block does not fit the cache");
  Keys keys{kv_heads, 1, start + n, start, start, nullptr};
  if (indices.has_value()) {
    const at::Tensor& sets = *indices;
    TORCH_CHECK(sets.dim() == 2 && sets.scalar_type() == at::kLong && sets.is_contiguous(),
                "indices must be contiguous int64 [units, kept]");
    const int64_t units = sets.size(0);
    TORCH_CHECK(units % kv_heads == 0 && heads % units == 0, "index sets must be per KV head or per query head group");
    TORCH_CHECK(!scores.has_value(), "scores are collected by dense attention only");
    keys = Keys{units, units / kv_heads, sets.size(1) + n, sets.size(1), start, sets.data_ptr<int64_t>()};
    if (sets.numel() > 0) {
      TORCH_CHECK(sets.min().item<int64_t>() >= 0 && sets.max().item<int64_t>() < start, "indices must be in [0, start)");
    }
  }
  float* score_rows = nullptr;
  int64_t score_stride = 0;
  if (scores.has_value()) {
    const at::Tensor& s = *scores;
    TORCH_CHECK(s.dim() == 2 && s.scalar_type() == at::kFloat && s.stride(1) == 1 && s.size(1) >= start + n,
                "scores must be float32 [units, capacity] with contiguous rows");
    TORCH_CHECK(s.size(0) == (score_per_head ? heads : kv_heads), "scores need one row per ",
                score_per_head ? "query head" : "KV head");
    score_rows = s.data_ptr<float>();
    score_stride = s.stride(0);
  }
  at::Tensor out = at::empty_like(q);
  switch (q.scalar_type()) {
    case at::kFloat: attend<float>(q, cache_k, cache_v, keys, score_rows, score_stride, score_max, score_per_head, out); break;
    case at::kBFloat16:
      if (amx && head_dim % 32 == 0 && amx_bf16_ready()) {
        attend_amx(q, cache_k, cache_v, keys, score_rows, score_stride, score_max, score_per_head, out);
        break;
      }
      attend<at::BFloat16>(q, cache_k, cache_v, keys, score_rows, score_stride, score_max, score_per_head, out);
      break;
    case at::kHalf: attend<at::Half>(q, cache_k, cache_v, keys, score_rows, score_stride, score_max, score_per_head, out); break;
    default: TORCH_CHECK(false, "q must be float32, bfloat16 or float16");
  }
  return out;
}

// Two-stage selection's second stage (mask.candidate_attention is the reference): per unit, the
// attention mass its query rows put on each nominated row, from their causal softmax over the
// nominees and the block (passes 1 and 2 above, no values read); float32 [units, nominees].
at::Tensor candidate_mass(const at::Tensor& q, const at::Tensor& cache_k, int64_t start, const at::Tensor& nominated) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q must be contiguous [heads, n, head_dim]");
  TORCH_CHECK(cache_k.dim() == 3 && cache_k.stride(2) == 1, "cache_k must be [kv_heads, capacity, head_dim], rows contiguous");
  TORCH_CHECK(q.scalar_type() == cache_k.scalar_type(), "q and the cache must have one dtype");
  const int64_t heads = q.size(0), n = q.size(1), head_dim = q.size(2), kv_heads = cache_k.size(0);
  TORCH_CHECK(cache_k.size(2) == head_dim && head_dim % 8 == 0, "head_dim must be a multiple of 8 and match the cache");
  TORCH_CHECK(n >= 1 && n <= kMaxRows, "a decode-sized block has 1 to ", kMaxRows, " rows, got ", n);
  TORCH_CHECK(start >= 0 && start + n <= cache_k.size(1), "the block does not fit the cache");
  TORCH_CHECK(nominated.dim() == 2 && nominated.scalar_type() == at::kLong && nominated.is_contiguous(),
              "nominated must be contiguous int64 [units, m]");
  const int64_t units = nominated.size(0), m = nominated.size(1);
  TORCH_CHECK(units % kv_heads == 0 && heads % units == 0, "nominated sets must be per KV head or per query head group");
  if (nominated.numel() > 0) {
    TORCH_CHECK(nominated.min().item<int64_t>() >= 0 && nominated.max().item<int64_t>() < start,
                "nominated rows must be in [0, start)");
  }
  const Keys keys{units, units / kv_heads, m + n, m, start, nominated.data_ptr<int64_t>()};
  std::vector<float> probs;
  switch (q.scalar_type()) {
    case at::kFloat: probs = probabilities<float>(q, cache_k, keys); break;
    case at::kBFloat16: probs = probabilities<at::BFloat16>(q, cache_k, keys); break;
    case at::kHalf: probs = probabilities<at::Half>(q, cache_k, keys); break;
    default: TORCH_CHECK(false, "q must be float32, bfloat16 or float16");
  }
  const int64_t rows = heads / units * n, padded = probs.size() / (units * rows);
  at::Tensor mass = at::zeros({units, m}, q.options().dtype(at::kFloat));
  float* out = mass.data_ptr<float>();
  at::parallel_for(0, units, 1, [&](int64_t first, int64_t last) {
    for (int64_t u = first; u < last; ++u)
      for (int64_t r = 0; r < rows; ++r) {
        const float* p = &probs[(u * rows + r) * padded];
        for (int64_t j = 0; j < m; ++j) out[u * m + j] += p[j];
      }
  });
  return mass;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sts_edge_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor cache_k, Tensor cache_v, int start, Tensor? indices=None, "
        "Tensor? scores=None, bool score_max=True, bool score_per_head=False, bool amx=True) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
  m.def("candidate_mass(Tensor q, Tensor cache_k, int start, Tensor nominated) -> Tensor");
  m.impl("candidate_mass", c10::DispatchKey::CPU, TORCH_FN(candidate_mass));
}
