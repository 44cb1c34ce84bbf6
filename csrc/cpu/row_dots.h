// Dot products of a few rows with every row of a weight chunk: the head GEMM of the decode regime
// (plain C++, raw pointers, no torch).
#pragma once

#include <cstdint>

namespace earlyexit {
namespace cpu {

// Row counts up to this use row_dots; larger ones a BLAS GEMM. Measured single-threaded at d=576 (thread
// CPU time, 113 MB head): row_dots streams at the speed of a plain read (w.sum()) for 1-2 rows where the
// BLAS gemv path is ~1.3x slower, is on par with BLAS at 8 rows and falls behind above (compute-bound).
constexpr int64_t kRowDotsMaxRows = 8;

// z[r * nc + j] = sum_k x[r * d + k] * w[j * ldw + k] for r < n (n <= kRowDotsMaxRows), j < nc. float32.
// Walks the weight chunk once, row by row (4*d*nc bytes), dotting each weight row with the n x rows
// (L1-resident) in 8-wide register accumulators. Compiled for AVX-512, AVX2 and baseline x86-64
// (runtime pick).
void row_dots(const float* x, int64_t n, int64_t d, const float* w, int64_t ldw, int64_t nc, float* z);

}  // namespace cpu
}  // namespace earlyexit
