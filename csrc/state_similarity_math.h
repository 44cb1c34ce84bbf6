// The arithmetic of the state similarity (cosine of two hidden states per row) that the CPU and CUDA
// kernels share: plain float code for host and device, no torch (the contract and the one-pass / rescue
// scheme: state_similarity.h). The host emulator of tests/cuda_emu includes it as the CUDA kernels do.
#pragma once

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

// One-pass sums inside [kSafeLo, kSafeHi] are used as they are (state_similarity.h says why).
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

}  // namespace earlyexit
