// Statistics of a logits chunk: the hot loop of the CPU exit check. See chunk_stats.h.
#include "cpu/chunk_stats.h"

#include <cmath>
#include <cstring>

#include "cpu/multiversion.h"

namespace earlyexit {
namespace cpu {
namespace {

// Reduction lanes: 16 floats = one AVX-512 register (two AVX2 ones); the compiler keeps them in registers.
constexpr int kLanes = 16;

inline float max_nan_keep(float a, float b) { return b > a ? b : a; }  // maps to maxps, a NaN b is ignored
inline float min_nan_keep(float a, float b) { return b < a ? b : a; }

// exp(x) for x <= 0 without libm, so that loops over it vectorize: x = n ln2 + r, |r| <= ln2 / 2,
// exp(r) by the Cephes degree-6 polynomial (relative error ~1 ulp), 2^n built in the exponent bits.
// x <= -88 (including -inf) gives exactly 0: 2^-127 is encoded as the all-zero bit pattern.
inline float exp_nonpositive(float x) {
  x = max_nan_keep(x, -88.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// head_logit's softcapping, branch-free so that its loop vectorizes: cap * tanh(v / cap) for finite v, with
// tanh|y| = (1 - e) / (1 + e), e = exp(-2|y|), and tanh's odd series below |y| = 1/16 where 1 - e would
// cancel. Non-finite v pass unchanged.
inline float softcap_logit(float v, float cap) {
  const float y = v / cap;
  const float a = std::fabs(y);
  const float e = exp_nonpositive(-2.f * a);
  const float a2 = a * a;
  const float series = a * (1.f - a2 * (1.f / 3.f - a2 * (2.f / 15.f)));
  const float t = a < 0.0625f ? series : (1.f - e) / (1.f + e);
  return is_finite(v) ? cap * std::copysign(t, y) : v;
}

}  // namespace

EE_MULTIVERSION RowStats chunk_stats(float* z, int64_t n, const float* bias, float softcap, float temperature,
                                     int64_t col0) {
  if (softcap > 0.f) {
    // The bias is folded in first; the passes below then divide by the temperature.
    // Two loops: a load under `bias ?` is control flow that AVX2 cannot vectorize.
    if (bias) {
      for (int64_t j = 0; j < n; ++j) z[j] = softcap_logit(z[j] + bias[j], softcap);
    } else {
      for (int64_t j = 0; j < n; ++j) z[j] = softcap_logit(z[j], softcap);
    }
    bias = nullptr;
  }
  float top1[kLanes], top2[kLanes], bad[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    top1[l] = top2[l] = -INFINITY;
    bad[l] = 0.f;
  }
  const int64_t body = n - n % kLanes;
  // Pass 1: bias, temperature, lane-wise top-2 (second largest counts duplicates) and bad flags.
  for (int64_t j = 0; j < body; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = (z[j + l] + (bias ? bias[j + l] : 0.f)) / temperature;
      z[j + l] = v;
      bad[l] += (v != v || v == INFINITY) ? 1.f : 0.f;
      top2[l] = max_nan_keep(top2[l], min_nan_keep(top1[l], v));
      top1[l] = max_nan_keep(top1[l], v);
    }
  }
  for (int64_t j = body; j < n; ++j) {
    const float v = (z[j] + (bias ? bias[j] : 0.f)) / temperature;
    z[j] = v;
    const int l = static_cast<int>(j - body);
    bad[l] += (v != v || v == INFINITY) ? 1.f : 0.f;
    top2[l] = max_nan_keep(top2[l], min_nan_keep(top1[l], v));
    top1[l] = max_nan_keep(top1[l], v);
  }
  RowStats st = empty_stats();
  for (int l = 0; l < kLanes; ++l) {
    st.bad = st.bad || bad[l] > 0.f;
    // The chunk's top-2 multiset lies in the union of the lanes' top-2 multisets.
    st.top2 = max_nan_keep(st.top2, min_nan_keep(st.top1, top1[l]));
    st.top1 = max_nan_keep(st.top1, top1[l]);
    st.top2 = max_nan_keep(st.top2, top2[l]);
  }
  if (st.bad) return st;  // the row is invalid whatever the sums are
  // The lowest index holding the max; for a chunk of only -inf logits its first column, as push_logit
  // gives (exit_stats reports it for a row with no finite logit).
  for (int64_t j = 0; j < n; ++j) {
    if (z[j] == st.top1) {
      st.idx = col0 + j;
      break;
    }
  }
  // Pass 2: sums relative to the chunk max (0 when every logit is -inf, so -inf - m stays -inf).
  const float m = safe_max(st.top1);
  float s[kLanes], t[kLanes];
  for (int l = 0; l < kLanes; ++l) s[l] = t[l] = 0.f;
  for (int64_t j = 0; j < body; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      // Clamping keeps e * d at 0 (not 0 * -inf = NaN) for -inf logits; exp is exactly 0 there anyway.
      const float d = max_nan_keep(z[j + l] - m, -88.0f);
      const float e = exp_nonpositive(d);
      s[l] += e;
      t[l] += e * d;
    }
  }
  for (int64_t j = body; j < n; ++j) {
    const float d = max_nan_keep(z[j] - m, -88.0f);
    const float e = exp_nonpositive(d);
    const int l = static_cast<int>(j - body);
    s[l] += e;
    t[l] += e * d;
  }
  st.m = st.top1;
  st.s = 0.f;
  st.t = 0.f;
  for (int l = 0; l < kLanes; ++l) {
    st.s += s[l];
    st.t += t[l];
  }
  return st;
}

}  // namespace cpu
}  // namespace earlyexit
