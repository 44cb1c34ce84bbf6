// Dot products of a few rows with every row of a weight chunk: the head GEMM of the decode regime
// (plain C++, raw pointers, no torch).
#pragma once

#include <cstdint>

#include "cpu/multiversion.h"

namespace earlyexit {
namespace cpu {

// Row counts up to this use row_dots; larger ones a BLAS GEMM. Measured on one thread, d=576, V=49152
// float32: at N=1 the whole op takes 6.5 ms where a plain read of the weight (w.sum()) takes 5.5 ms and
// MKL's x @ W.T alone 11.7 ms; at N=8, 21 ms for the op vs 28 ms for MKL's matmul alone. Above 8 rows
// the GEMM turns compute-bound, where BLAS blocking pays; 9-16 rows were not compared.
constexpr int64_t kRowDotsMaxRows = 8;

// z[r * nc + j] = sum_k x[r * d + k] * w[j * ldw + k] for r < n (n <= kRowDotsMaxRows), j < nc. float32.
// Walks the weight chunk once, row by row (4*d*nc bytes), dotting each weight row with the n x rows
// (L1-resident) in 8-wide register accumulators. Compiled for AVX-512, AVX2 and baseline x86-64
// (runtime pick).
void row_dots(const float* x, int64_t n, int64_t d, const float* w, int64_t ldw, int64_t nc, float* z);

// The same with a bfloat16 / float16 weight (raw 16-bit patterns): 2*d*nc bytes stream from memory and no
// upcast copy is made. float16 weights are widened to float32 in registers (exactly). bfloat16: x must hold
// bfloat16 values (exit_check_cpu rounds the normalized rows to the weight dtype, as the reference does);
// the products are then exact in float32 on either of the two paths row_dots_bf16 picks at run time.
void row_dots_bf16(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc, float* z);
void row_dots_f16(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc, float* z);

// Most rows row_dots_bf16 is given: kRowDotsMaxRows on the widening path; any number on the bf16-pair path,
// which outruns the upcast-and-GEMM path there (in groups of 8 rows over a cache-resident weight chunk).
int64_t row_dots_bf16_max_rows();
// The bfloat16 path row_dots_bf16 takes on this CPU: "avx512bf16" (bf16 pairs) or "widen".
const char* row_dots_bf16_path();

// The two bfloat16 paths, exposed for tests: widening each weight to float32 (any CPU, any float32 x), or
// AVX512-BF16's bf16-pair dot products (row_dots_avx512bf16.cpp), which round x to bfloat16 (nearest even)
// and, as that instruction does, read bf16 subnormals as zero and flush subnormal results.
void row_dots_bf16_widen(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc,
                         float* z);
#ifdef EE_X86_GCC
bool row_dots_bf16_pairs_available();
void row_dots_bf16_pairs(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc,
                         float* z);
#endif

// The two float16 paths row_dots_f16 picks from at run time: F16C conversions (x86-64 with AVX2, FMA and
// F16C: row_dots_f16c.cpp) or portable vector bit manipulation (any CPU). Exposed for tests.
void row_dots_f16_portable(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc,
                           float* z);
#ifdef EE_X86_GCC
bool row_dots_f16c_available();
void row_dots_f16c(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc, float* z);
#endif

}  // namespace cpu
}  // namespace earlyexit
