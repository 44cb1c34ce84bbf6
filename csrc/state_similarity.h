// Cosine similarity of two hidden states per row, cos = dot(h, p) / (|h| |p|) (CALM's "state" confidence):
// the arithmetic shared by the CPU and CUDA kernels (plain float code, host and device), and the kernels'
// entry points.
//
// The contract (earlyexit.state_similarity): statistics in float32; NaN when either row holds a NaN or
// an inf; 0 when either row is all zeros (a zero vector has no direction); otherwise the cosine of the
// two directions, clamped to [-1, 1], for rows of any finite magnitude (1e38 or subnormal alike).
//
// Kernels compute the three float32 sums dot = sum h p, hh = sum h^2, pp = sum p^2 in one pass. When hh
// and pp both lie in [2^-60, 2^60] (hidden states always do) these sums are accurate as they stand: no
// partial sum overflowed (they are bounded by hh, pp and, by Cauchy-Schwarz, sqrt(hh pp)) and what
// subnormal products lose (at most 2^-150 each) is below d * 2^-90 of sqrt(hh pp). Any other row
// (huge, tiny, zero or not finite: a NaN or inf makes hh or pp NaN or inf) takes the rescue path: the
// largest magnitude of each row, then the same sums over the rows scaled by powers of two (exact) to a
// largest magnitude in [1, 2). The cosine does not change under scaling, so nothing is scaled back.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define EE_SIM_HD __host__ __device__ __forceinline__
#else
#define EE_SIM_HD inline
#endif

namespace earlyexit {
namespace similarity {

// One-pass sums inside [kSafeLo, kSafeHi] are used as they are (see above).
constexpr float kSafeLo = 0x1p-60f;
constexpr float kSafeHi = 0x1p60f;

// False for NaN, as the comparisons are.
EE_SIM_HD bool sums_safe(float hh, float pp) {
  return hh >= kSafeLo && hh <= kSafeHi && pp >= kSafeLo && pp <= kSafeHi;
}

// The cosine from sums whose product hh * pp is a normal float (safe or rescaled sums), clamped to
// [-1, 1]: rounding can put |dot| a few ulps above sqrt(hh pp). IEEE division and square root (no fast
// math), so h == p gives exactly 1 when its sums round alike.
EE_SIM_HD float cosine(float dot, float hh, float pp) {
  const float c = dot / std::sqrt(hh * pp);
  return c > 1.f ? 1.f : (c < -1.f ? -1.f : c);
}

EE_SIM_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
#endif
}

EE_SIM_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
#endif
}

// Two powers of two s1, s2, each a normal float, with s1 * s2 * amax in [1, 2), for a finite amax > 0
// (their product 2^k, k in [-127, 149], is not always a float itself). Multiplying a row by s1 then s2
// is exact except for elements that become subnormal: those are below 2^-126 of the row's largest and
// add nothing visible to its sums.
EE_SIM_HD void pow2_scale(float amax, float& s1, float& s2) {
  int e = static_cast<int>((float_bits(amax) >> 23) & 0xffu);  // biased exponent; 0: subnormal
  int k = 127 - e;
  if (e == 0) {
    e = static_cast<int>((float_bits(amax * 0x1p64f) >> 23) & 0xffu);  // exact: amax < 2^-126
    k = 127 - e + 64;
  }
  const int k1 = (k + 256) / 2 - 128;  // floor(k / 2), written without a signed shift
  const int k2 = k - k1;
  s1 = bits_float(static_cast<uint32_t>(k1 + 127) << 23);
  s2 = bits_float(static_cast<uint32_t>(k2 + 127) << 23);
}

// The rescue path's result from each row's largest magnitude (amax, NaN-free: bad says whether the rows
// held a NaN or an inf) and a function computing the scaled sums: NaN, 0 for a zero row, else the cosine.
template <typename ScaledSums>
EE_SIM_HD float rescue(float amax_h, float amax_p, bool bad, const ScaledSums& scaled_sums) {
  if (bad || !(amax_h <= 3.4028234663852886e38f) || !(amax_p <= 3.4028234663852886e38f)) return NAN;
  if (amax_h == 0.f || amax_p == 0.f) return 0.f;
  float sh1, sh2, sp1, sp2;
  pow2_scale(amax_h, sh1, sh2);
  pow2_scale(amax_p, sp1, sp2);
  float dot, hh, pp;
  scaled_sums(sh1, sh2, sp1, sp2, dot, hh, pp);  // hh, pp in [1, 4d): hh * pp is a normal float
  return cosine(dot, hh, pp);
}

}  // namespace similarity

// h, p: [N, d] float32/float16/bfloat16 (same dtype and device), unit column stride, any row strides.
// out: float32 [N] contiguous. The binding (state_similarity_bindings.cpp) checks all of that.
void state_similarity_cpu(const at::Tensor& h, const at::Tensor& p, const at::Tensor& out);
#ifdef EARLYEXIT_WITH_CUDA
void state_similarity_cuda(const at::Tensor& h, const at::Tensor& p, const at::Tensor& out);
#endif

}  // namespace earlyexit
