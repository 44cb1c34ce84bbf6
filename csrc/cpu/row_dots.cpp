// Decode-regime head GEMM on CPU. See row_dots.h.
#include "cpu/row_dots.h"

#include <cstring>

#include "cpu/multiversion.h"

namespace earlyexit {
namespace cpu {
namespace {

// One AVX2 register (two SSE ones on baseline x86-64); AVX-512 gains nothing in a memory-bound loop.
// GCC vector types keep the R accumulators in registers, which plain arrays did not (they spilled).
typedef float Vec8 __attribute__((vector_size(32)));
constexpr int kLanes = 8;

// R x rows (R <= 8) against one weight row wj; writes out[r * out_stride].
template <int R>
__attribute__((always_inline)) inline void dot_group(const float* x, int64_t d, const float* wj, float* out,
                                                     int64_t out_stride) {
  Vec8 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = Vec8{};
  const int64_t body = d - d % kLanes;
  for (int64_t k = 0; k < body; k += kLanes) {
    Vec8 wv, xv;
    std::memcpy(&wv, wj + k, sizeof(wv));  // unaligned loads; no function returns a Vec8 (psABI)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      std::memcpy(&xv, x + r * d + k, sizeof(xv));
      acc[r] += wv * xv;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float s = 0.f;
    for (int64_t k = body; k < d; ++k) s += wj[k] * x[r * d + k];
    for (int l = 0; l < kLanes; ++l) s += acc[r][l];
    out[r * out_stride] = s;
  }
}

template <int R>
__attribute__((always_inline)) inline void dot_rows_fixed(const float* x, int64_t d, const float* w, int64_t ldw,
                                                          int64_t nc, float* z) {
  for (int64_t j = 0; j < nc; ++j) dot_group<R>(x, d, w + j * ldw, z + j, nc);
}

}  // namespace

EE_MULTIVERSION void row_dots(const float* x, int64_t n, int64_t d, const float* w, int64_t ldw, int64_t nc,
                              float* z) {
  // Groups of 8 rows, then the remainder (n <= kRowDotsMaxRows; more groups would re-read each weight
  // row from L1, not memory).
  int64_t r0 = 0;
  for (; r0 + 8 <= n; r0 += 8) dot_rows_fixed<8>(x + r0 * d, d, w, ldw, nc, z + r0 * nc);
  const float* xr = x + r0 * d;
  float* zr = z + r0 * nc;
  switch (n - r0) {
    case 7: dot_rows_fixed<7>(xr, d, w, ldw, nc, zr); break;
    case 6: dot_rows_fixed<6>(xr, d, w, ldw, nc, zr); break;
    case 5: dot_rows_fixed<5>(xr, d, w, ldw, nc, zr); break;
    case 4: dot_rows_fixed<4>(xr, d, w, ldw, nc, zr); break;
    case 3: dot_rows_fixed<3>(xr, d, w, ldw, nc, zr); break;
    case 2: dot_rows_fixed<2>(xr, d, w, ldw, nc, zr); break;
    case 1: dot_rows_fixed<1>(xr, d, w, ldw, nc, zr); break;
    default: break;
  }
}

}  // namespace cpu
}  // namespace earlyexit
