// Entry points of the ragged batch compaction kernels, one per device. The binding
// (compaction_bindings.cpp) checks the arguments; these only compute.
//
// Every tensor arrives as a 2-D [rows, W] word view (int32, int16 or uint8, see earlyexit/ops/rows.py):
// any row stride, unit word stride, and each destination has the word type of its source, so one
// kernel moves rows of every dtype and trailing shape as raw bytes.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace earlyexit {

// keep: [N] uint8 (nonzero = keep). srcs[i]: [N, W_i]. dsts[i]: [K, W_i] (compact) or [N, W_i] (partition).
// index: int64 [K] kept rows' positions (compact) or [N] perm (partition). count: 0-d int64 (partition only).
// Compact writes kept rows in order; partition writes kept rows in order, then the others in order.
void compaction_cpu(const at::Tensor& keep, at::TensorList srcs, at::TensorList dsts, const at::Tensor& index,
                    const std::optional<at::Tensor>& count, bool partition);

// dest[index[j]] = src[j]: dest [M, W], src [K, W] (same word type), index int64 [K] contiguous.
void scatter_rows_cpu(const at::Tensor& dest, const at::Tensor& index, const at::Tensor& src);

#ifdef EARLYEXIT_WITH_CUDA
void compaction_cuda(const at::Tensor& keep, at::TensorList srcs, at::TensorList dsts, const at::Tensor& index,
                     const std::optional<at::Tensor>& count, bool partition);
void scatter_rows_cuda(const at::Tensor& dest, const at::Tensor& index, const at::Tensor& src);
#endif

}  // namespace earlyexit
