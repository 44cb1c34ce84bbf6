// Entry points of the ragged batch compaction kernels, one per device. The binding
// (compaction_bindings.cpp) checks the arguments and allocates the outputs; these only compute.
//
// Every tensor is [rows, ...] of any dtype with dense rows (trailing dims contiguous, any dim-0 stride):
// the kernels move each row as raw bytes, so one kernel serves every dtype and trailing shape.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace earlyexit {

// Bytes of one row (all dims but the first) and the distance between rows, of a row-dense tensor.
inline int64_t row_bytes(const at::Tensor& t) {
  int64_t bytes = t.element_size();
  for (int64_t d = 1; d < t.dim(); ++d) bytes *= t.size(d);
  return bytes;
}
inline int64_t row_stride_bytes(const at::Tensor& t) { return t.stride(0) * t.element_size(); }

// keep: [N] bool, contiguous. srcs[i]: [N, ...]. dsts[i]: [K, ...] (compact) or [N, ...] (partition), like srcs[i].
// index: int64 [K] kept rows' positions (compact) or [N] perm (partition). count: 0-d int64 (partition only).
// Compact writes kept rows in order; partition writes kept rows in order, then the others in order.
void compaction_cpu(const at::Tensor& keep, at::TensorList srcs, at::TensorList dsts, const at::Tensor& index,
                    const std::optional<at::Tensor>& count, bool partition);

// dest[index[j]] = src[j]: dest [M, ...], src [K, ...] (same dtype and row shape), index int64 [K] contiguous.
void scatter_rows_cpu(const at::Tensor& dest, const at::Tensor& index, const at::Tensor& src);

#ifdef EARLYEXIT_WITH_CUDA
void compaction_cuda(const at::Tensor& keep, at::TensorList srcs, at::TensorList dsts, const at::Tensor& index,
                     const std::optional<at::Tensor>& count, bool partition);
void scatter_rows_cuda(const at::Tensor& dest, const at::Tensor& index, const at::Tensor& src);
#endif

}  // namespace earlyexit
