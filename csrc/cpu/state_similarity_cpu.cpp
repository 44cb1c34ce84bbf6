// CPU state similarity: cosine of two hidden states per row (see state_similarity.h for the contract and
// the one-pass / rescue scheme). at::parallel_for over rows, each row pair on one thread, so the
// reduction order is fixed and results are bitwise deterministic whatever the thread count. The rows are
// read in their own dtype and widened to float32 in registers (row_dots_impl.h's loaders): 2 bytes per
// element for bf16/fp16, no upcast copy. Bytes per call: N * d * elt for each of h and p, 4 N written.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "cpu/multiversion.h"
#include "cpu/row_dots_impl.h"
#include "state_similarity.h"

namespace earlyexit {
namespace cpu {
namespace {

// Rows per parallel task: about this many elements, so a decode batch (N * d of a few 10k) stays on one
// thread instead of paying a fork/join as large as the work.
constexpr int64_t kGrainElements = 1 << 16;

// dot, hh, pp of one row pair in float32: 16 elements per step into two 8-lane accumulators per sum (six
// independent chains), the lanes added in order, then the tail. kScaled (the rescue path): h is
// multiplied by sh1 then sh2 and p by sp1 then sp2 first (powers of two: exact).
template <typename W, bool kScaled>
__attribute__((always_inline)) inline void row_sums(const typename W::elem* h, const typename W::elem* p, int64_t d,
                                                    float sh1, float sh2, float sp1, float sp2, float& dot,
                                                    float& hh, float& pp) {
  Vec8 d0{}, d1{}, a0{}, a1{}, b0{}, b1{};
  const int64_t body = d - d % (2 * kLanes);
  for (int64_t k = 0; k < body; k += 2 * kLanes) {
    Vec8 x0, x1, y0, y1;  // loaded through out-parameters: no function returns a Vec8 (psABI)
    W::load8(h + k, x0);
    W::load8(h + k + kLanes, x1);
    W::load8(p + k, y0);
    W::load8(p + k + kLanes, y1);
    if constexpr (kScaled) {
      x0 = x0 * sh1 * sh2;
      x1 = x1 * sh1 * sh2;
      y0 = y0 * sp1 * sp2;
      y1 = y1 * sp1 * sp2;
    }
    d0 += x0 * y0;
    d1 += x1 * y1;
    a0 += x0 * x0;
    a1 += x1 * x1;
    b0 += y0 * y0;
    b1 += y1 * y1;
  }
  const Vec8 dv = d0 + d1, av = a0 + a1, bv = b0 + b1;
  float sd = 0.f, sa = 0.f, sb = 0.f;
  for (int l = 0; l < kLanes; ++l) {
    sd += dv[l];
    sa += av[l];
    sb += bv[l];
  }
  for (int64_t k = body; k < d; ++k) {
    float x = W::load1(h + k), y = W::load1(p + k);
    if constexpr (kScaled) {
      x = x * sh1 * sh2;
      y = y * sp1 * sp2;
    }
    sd += x * y;
    sa += x * x;
    sb += y * y;
  }
  dot = sd;
  hh = sa;
  pp = sb;
}

// Largest magnitude of a row; bad is set when it holds a NaN or an inf. Rescue path only (scalar).
template <typename W>
float row_amax(const typename W::elem* x, int64_t d, bool& bad) {
  float m = 0.f;
  for (int64_t k = 0; k < d; ++k) {
    const float a = std::fabs(W::load1(x + k));
    if (!(a <= 3.4028234663852886e38f)) bad = true;
    m = a > m ? a : m;
  }
  return m;
}

template <typename W>
__attribute__((always_inline)) inline void rows_impl(const typename W::elem* h, int64_t ldh,
                                                     const typename W::elem* p, int64_t ldp, int64_t d,
                                                     int64_t begin, int64_t end, float* out) {
  for (int64_t i = begin; i < end; ++i) {
    const typename W::elem* hr = h + i * ldh;
    const typename W::elem* pr = p + i * ldp;
    float dot, hh, pp;
    row_sums<W, false>(hr, pr, d, 1.f, 1.f, 1.f, 1.f, dot, hh, pp);
    if (similarity::sums_safe(hh, pp)) {
      out[i] = similarity::cosine(dot, hh, pp);
      continue;
    }
    bool bad = false;
    const float ah = row_amax<W>(hr, d, bad), ap = row_amax<W>(pr, d, bad);
    const auto scaled_sums = [&](float sh1, float sh2, float sp1, float sp2, float& sd, float& sa, float& sb) {
      row_sums<W, true>(hr, pr, d, sh1, sh2, sp1, sp2, sd, sa, sb);
    };
    out[i] = similarity::rescue(ah, ap, bad, scaled_sums);
  }
}

// One clone per x86-64 ISA level (AVX-512, AVX2, baseline), picked at load time.
EE_MULTIVERSION void rows_f32(const float* h, int64_t ldh, const float* p, int64_t ldp, int64_t d, int64_t begin,
                              int64_t end, float* out) {
  rows_impl<F32>(h, ldh, p, ldp, d, begin, end, out);
}

EE_MULTIVERSION void rows_bf16(const uint16_t* h, int64_t ldh, const uint16_t* p, int64_t ldp, int64_t d,
                               int64_t begin, int64_t end, float* out) {
  rows_impl<BF16>(h, ldh, p, ldp, d, begin, end, out);
}

EE_MULTIVERSION void rows_f16(const uint16_t* h, int64_t ldh, const uint16_t* p, int64_t ldp, int64_t d,
                              int64_t begin, int64_t end, float* out) {
  rows_impl<F16>(h, ldh, p, ldp, d, begin, end, out);
}

}  // namespace
}  // namespace cpu

void state_similarity_cpu(const at::Tensor& h, const at::Tensor& p, const at::Tensor& out) {
  const int64_t n = h.size(0), d = h.size(1), ldh = h.stride(0), ldp = p.stride(0);
  if (n == 0) return;
  float* o = out.mutable_data_ptr<float>();
  const auto dt = h.scalar_type();
  const void* hp = h.const_data_ptr();
  const void* pp = p.const_data_ptr();
  const int64_t grain = std::max<int64_t>(1, cpu::kGrainElements / d);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    if (dt == at::kFloat) {
      cpu::rows_f32(static_cast<const float*>(hp), ldh, static_cast<const float*>(pp), ldp, d, begin, end, o);
    } else if (dt == at::kBFloat16) {
      cpu::rows_bf16(static_cast<const uint16_t*>(hp), ldh, static_cast<const uint16_t*>(pp), ldp, d, begin, end, o);
    } else {
      cpu::rows_f16(static_cast<const uint16_t*>(hp), ldh, static_cast<const uint16_t*>(pp), ldp, d, begin, end, o);
    }
  });
}

}  // namespace earlyexit
