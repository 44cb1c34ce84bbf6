// row_dots for bfloat16 weights through AVX512-BF16's vdpbf16ps: one instruction multiplies 32 bf16
// pairs and adds them into 16 float32 lanes, where the widening path (row_dots_impl.h) spends a shift and
// an 8-lane FMA on 8 weights. The widening loop is bound by those instructions from a few rows on; this
// one stays bound by reading the weight up to 8 rows, and above that outruns upcasting the chunk for the
// float32 GEMM. The whole file is compiled for AVX-512 (F, BW, VL, BF16); row_dots_bf16 calls it only on
// CPUs that have them, hence a file of its own (as row_dots_f16c.cpp).
#include "cpu/multiversion.h"

#ifdef EE_X86_GCC
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
#include <immintrin.h>

#include <vector>

#include "cpu/row_dots.h"
#include "cpu/row_dots_impl.h"

namespace earlyexit {
namespace cpu {
namespace {

constexpr int kPairLanes = 32;  // bf16 elements per 512-bit register

// 32 bf16 elements from p, of which the first `valid` are read (the rest zero: the d tail).
inline __m512bh load_bf16(const uint16_t* p, __mmask32 valid) {
  return reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(valid, p));
}

// Sum of the 16 lanes. The all-lanes maskz forms: GCC 12's unmasked shuffles (and _mm512_reduce_add_ps)
// start from _mm512_undefined_ps and trip -Wmaybe-uninitialized inside its own header.
inline float lane_sum(__m512 a) {
  constexpr __mmask16 all = 0xffff;
  a = _mm512_add_ps(a, _mm512_maskz_shuffle_f32x4(all, a, a, _MM_SHUFFLE(1, 0, 3, 2)));
  a = _mm512_add_ps(a, _mm512_maskz_shuffle_f32x4(all, a, a, _MM_SHUFFLE(2, 3, 0, 1)));
  a = _mm512_add_ps(a, _mm512_maskz_permute_ps(all, a, _MM_SHUFFLE(1, 0, 3, 2)));
  a = _mm512_add_ps(a, _mm512_maskz_permute_ps(all, a, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(a);
}

// R hidden rows xb (bf16, row stride d) against J consecutive weight rows w, w + ldw, ...; writes
// out[r * out_stride + j]. J * R independent accumulators hide vdpbf16ps' latency.
template <int R, int J>
__attribute__((always_inline)) inline void pair_group(const uint16_t* xb, int64_t d, const uint16_t* w, int64_t ldw,
                                                      float* out, int64_t out_stride) {
  __m512 acc[J][R];
#pragma GCC unroll 8
  for (int j = 0; j < J; ++j) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
  }
  const int64_t ahead = prefetch_ahead(J * ldw * 2);
  for (int64_t k = 0; k < d; k += kPairLanes) {
    const int64_t left = d - k;
    const __mmask32 valid = left >= kPairLanes ? ~__mmask32{0} : (__mmask32{1} << left) - 1;
    __m512bh wv[J];
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
      wv[j] = load_bf16(w + j * ldw + k, valid);
      _mm_prefetch(reinterpret_cast<const char*>(w + j * ldw + k) + ahead, _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = load_bf16(xb + r * d + k, valid);
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], wv[j], xv);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < J; ++j) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) out[r * out_stride + j] = lane_sum(acc[j][r]);
  }
}

template <int R>
__attribute__((always_inline)) inline void pair_rows_fixed(const uint16_t* xb, int64_t d, const uint16_t* w,
                                                           int64_t ldw, int64_t nc, float* z) {
  // J * R <= 16 accumulators, J weight registers and one hidden register: within the 32 zmm registers.
  constexpr int J = R <= 2 ? 8 : (R <= 4 ? 4 : 2);
  int64_t j = 0;
  for (; j + J <= nc; j += J) pair_group<R, J>(xb, d, w + j * ldw, ldw, z + j, nc);
  for (; j < nc; ++j) pair_group<R, 1>(xb, d, w + j * ldw, ldw, z + j, nc);
}

}  // namespace

bool row_dots_bf16_pairs_available() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

void row_dots_bf16_pairs(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc,
                         float* z) {
  // The hidden rows as bf16, rounded to nearest even (exact for rows that hold bf16 values): n * d
  // elements, against the nc * d of the weight chunk.
  std::vector<uint16_t> xb(static_cast<size_t>(n * d));
  for (int64_t i = 0; i < n * d; i += 16) {
    const int64_t left = n * d - i;
    const __mmask16 valid = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    const __m256bh b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(valid, x + i));
    _mm256_mask_storeu_epi16(xb.data() + i, valid, reinterpret_cast<__m256i>(b));
  }
  for_row_groups(n, [&](auto rows, int64_t r0) {
    pair_rows_fixed<decltype(rows)::value>(xb.data() + r0 * d, d, w, ldw, nc, z + r0 * nc);
  });
}

}  // namespace cpu
}  // namespace earlyexit
#endif
