// Vectorizable statistics of one row of a float32 logits chunk (plain C++, raw pointers, no torch).
#pragma once

#include <cstdint>

#include "exit_check_stats.h"

namespace earlyexit {
namespace cpu {

// Applies z = head_logit(z + bias, softcap, temperature) in place to z[0, n) (bias may be null; softcap 0:
// none, else one more vectorized pass, with its own tanh) and returns the chunk's
// statistics for columns col0 .. col0 + n - 1. Two passes over z, which is hot in L1/L2:
// pass 1 writes the biased logits and takes the lane-wise max/top-2 and NaN/+inf flags, pass 2 sums
// exp(z - m) and exp(z - m) * (z - m). The loops are written so that GCC vectorizes them (fixed-width
// lane arrays for the reductions, no branches), and are compiled for AVX-512, AVX2 and baseline x86-64
// with runtime selection.
RowStats chunk_stats(float* z, int64_t n, const float* bias, float softcap, float temperature, int64_t col0);

}  // namespace cpu
}  // namespace earlyexit
