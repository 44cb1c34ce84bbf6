// Softmax statistics of the fused exit check, shared by the CPU and CUDA kernels (no torch includes).
//
// One RowStats summarizes the logits z of one row over a set of vocabulary columns:
//   m    running max (-inf when no finite logit was seen yet)
//   s    sum exp(z - m)                 (0 when nothing was seen)
//   t    sum exp(z - m) * (z - m)       (entropy numerator, relative to m)
//   top1 largest logit, idx its lowest vocabulary index, top2 the second largest (duplicates count);
//        top1 == m unless a NaN/+inf logit was seen
//   bad  a NaN or +inf logit was seen (the row will be invalid)
// Merging is exact up to float rounding in any order for (top1, idx, top2): ties go to the lower index
// explicitly, so partials over interleaved columns merge correctly. Kernels still merge in a fixed
// order so that (m, s, t) round the same way on every call (bitwise deterministic results).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EE_HD __host__ __device__ __forceinline__
#else
#define EE_HD inline
#endif

namespace earlyexit {

// Statistic codes of the exit rule: code i is STATISTICS[i] of earlyexit/ops/measures.py, which owns the
// measures (names, exit directions); the kernels only receive a code and a direction.
enum Statistic : int { kMaxProb = 0, kMargin = 1, kEntropy = 2, kNumStatistics = 3 };

// 32 bytes: bad sits in the padding before idx.
struct RowStats {
  float m, s, t, top1, top2;
  bool bad;
  int64_t idx;
};

EE_HD RowStats empty_stats() { return RowStats{-INFINITY, 0.f, 0.f, -INFINITY, -INFINITY, false, INT64_MAX}; }

EE_HD float safe_max(float m) { return m == -INFINITY ? 0.f : m; }

EE_HD bool is_finite(float x) { return x - x == 0.f; }  // false for NaN and +-inf

// Adds one logit z at vocabulary column col (online softmax; columns may arrive in any order).
EE_HD void push_logit(RowStats& a, float z, int64_t col) {
  if (z != z || z == INFINITY) {
    a.bad = true;
    return;
  }
  if (z > a.top1 || (z == a.top1 && col < a.idx)) {
    a.top2 = a.top1;
    a.top1 = z;
    a.idx = col;
  } else if (z > a.top2) {
    a.top2 = z;
  }
  if (z == -INFINITY) return;  // exp(-inf) = 0 adds nothing to s or t
  if (z > a.m) {
    // Rescale the old sums to the new max; when nothing was seen (s == 0) skip so 0 * inf never makes a NaN.
    const float d = a.m - z;
    if (a.s > 0.f) {
      const float alpha = expf(d);
      a.t = alpha * (a.t + a.s * d);
      a.s = alpha * a.s + 1.f;
    } else {
      a.t = 0.f;
      a.s = 1.f;
    }
    a.m = z;
  } else {
    const float d = z - a.m;
    const float e = expf(d);
    a.s += e;
    a.t += e * d;
  }
}

// The logit of one column after the GEMM and bias: final-logit softcapping (softcap > 0; 0 = none) of a
// finite logit, then the temperature. Non-finite logits pass unchanged, so a -inf bias still masks its
// column and a NaN/+inf logit still makes its row invalid (earlyexit.ops.reference.cap_logits).
EE_HD float head_logit(float z, float softcap, float temperature) {
  if (softcap > 0.f && is_finite(z)) z = softcap * tanhf(z / softcap);
  return z / temperature;
}

// Merges b into a (any two disjoint column sets).
EE_HD void merge_stats(RowStats& a, const RowStats& b) {
  const float m = fmaxf(a.m, b.m);
  const float ms = safe_max(m);
  float sa = 0.f, ta = 0.f, sb = 0.f, tb = 0.f;
  // s == 0 means "nothing seen": skip it so that 0 * (-inf) never makes a NaN.
  if (a.s > 0.f) {
    const float alpha = expf(a.m - ms);
    sa = alpha * a.s;
    ta = alpha * (a.t + a.s * (a.m - ms));
  }
  if (b.s > 0.f) {
    const float alpha = expf(b.m - ms);
    sb = alpha * b.s;
    tb = alpha * (b.t + b.s * (b.m - ms));
  }
  const bool b_wins = b.top1 > a.top1 || (b.top1 == a.top1 && b.idx < a.idx);
  if (b_wins) {
    a.top2 = fmaxf(a.top1, b.top2);
    a.top1 = b.top1;
    a.idx = b.idx;
  } else {
    a.top2 = fmaxf(a.top2, b.top1);
  }
  a.m = m;
  a.s = sa + sb;
  a.t = ta + tb;
  a.bad = a.bad || b.bad;
}

// The seven outputs of one row (see earlyexit.ExitResult).
struct RowResult {
  int64_t token;
  bool exit;
  float confidence, max_prob, margin, entropy, lse;
};

// Final statistics of a row. hidden_finite: every element of the hidden row is finite. The row exits when
// its statistic is >= threshold (exit_above) or <= threshold (otherwise).
// Invalid rows (non-finite hidden, a NaN/+inf logit, or no finite logit) give token -1, exit false, NaNs.
EE_HD RowResult finalize_stats(const RowStats& a, bool hidden_finite, float threshold, int statistic,
                               bool exit_above) {
  const float log_s = logf(a.s);
  const float lse = a.m + log_s;
  const bool valid = hidden_finite && !a.bad && is_finite(lse);
  RowResult r;
  if (!valid) {
    r.token = -1;
    r.exit = false;
    r.confidence = r.max_prob = r.margin = r.entropy = r.lse = NAN;
    return r;
  }
  // Probabilities from the sums relative to the max, never from exp(z - lse): lse rounds to the ulp of
  // the logits' magnitude, which is far coarser than a probability's when the logits are large.
  // One reciprocal rather than three divisions: each IEEE division brings a called slow path, and the
  // extra call sites make ptxas spill in the FMA decode kernels.
  r.lse = lse;
  const float inv_s = 1.f / a.s;
  r.max_prob = inv_s;
  r.margin = -expm1f(a.top2 - a.m) * inv_s;
  r.entropy = log_s - a.t * inv_s;
  r.token = a.idx;
  r.confidence = statistic == kMaxProb ? r.max_prob : statistic == kMargin ? r.margin : r.entropy;
  r.exit = exit_above ? r.confidence >= threshold : r.confidence <= threshold;
  return r;
}

}  // namespace earlyexit
