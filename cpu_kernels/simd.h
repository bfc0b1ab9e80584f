// Vector helpers both CPU kernels use (AVX2).
#pragma once

#include <immintrin.h>

namespace sts_edge_simd {

// The sum of v's eight lanes, in a fixed order (a row's bits must not depend on its block).
inline float horizontal_sum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

}  // namespace sts_edge_simd
