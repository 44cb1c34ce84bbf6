// Cosine similarity of two hidden states per row, cos = dot(h, p) / (|h| |p|) (CALM's "state" confidence):
// the contract and the kernels' entry points. The arithmetic the CPU and CUDA kernels share (plain float
// code, host and device, torch-free) is state_similarity_math.h.
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

#include "state_similarity_math.h"

namespace earlyexit {

// h, p: [N, d] float32/float16/bfloat16 (same dtype and device), unit column stride, any row strides.
// out: float32 [N] contiguous. The binding (state_similarity_bindings.cpp) checks all of that.
void state_similarity_cpu(const at::Tensor& h, const at::Tensor& p, const at::Tensor& out);
#ifdef EARLYEXIT_WITH_CUDA
void state_similarity_cuda(const at::Tensor& h, const at::Tensor& p, const at::Tensor& out);
#endif

}  // namespace earlyexit
