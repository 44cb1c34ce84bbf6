// CUDA ragged batch compaction: the launchers of compaction_kernels.cuh's kernels (the scheme is
// described there).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "compaction.h"
#include "compaction_kernels.cuh"

namespace earlyexit {
namespace {

using namespace cuda::compaction_kernels;

RowTable make_table(at::TensorList srcs, at::TensorList dsts, size_t first, size_t last) {
  RowTable table{};
  for (size_t i = first; i < last; ++i) {
    add_rows(table, srcs[i].const_data_ptr(), dsts[i].data_ptr(), row_stride_bytes(srcs[i]), row_stride_bytes(dsts[i]),
             row_bytes(srcs[i]));
  }
  return table;
}

}  // namespace

void compaction_cuda(const at::Tensor& keep, at::TensorList srcs, at::TensorList dsts, const at::Tensor& index,
                     const std::optional<at::Tensor>& count, bool partition) {
  const c10::cuda::CUDAGuard guard(keep.device());
  const int64_t n = keep.size(0);
  if (n == 0) {
    if (count) count->zero_();
    return;
  }
  int64_t max_row_bytes = 0;
  for (const auto& s : srcs) max_row_bytes = std::max(max_row_bytes, row_bytes(s));
  const Grid grid = make_grid(n, max_row_bytes, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  // The scan reads the mask as 4-byte words: a mask view starting mid-word gets an aligned copy.
  const at::Tensor mask = reinterpret_cast<uintptr_t>(keep.const_data_ptr()) % 4 ? keep.clone() : keep;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Groups of kMaxTensors; the first also writes the index and the count (a call with no tensors still
  // launches once for them).
  for (size_t first = 0; first == 0 || first < srcs.size(); first += kMaxTensors) {
    const size_t last = std::min(srcs.size(), first + kMaxTensors);
    compaction_kernel<<<grid.blocks, kThreads, 0, stream>>>(
        static_cast<const uint8_t*>(mask.const_data_ptr()), n, index.data_ptr<int64_t>(),
        first == 0 && count ? count->data_ptr<int64_t>() : nullptr, make_table(srcs, dsts, first, last),
        grid.rows_per_block, partition, first == 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void scatter_rows_cuda(const at::Tensor& dest, const at::Tensor& index, const at::Tensor& src) {
  const c10::cuda::CUDAGuard guard(dest.device());
  const int64_t k = index.size(0);
  if (k == 0) return;
  const Grid grid = make_grid(k, row_bytes(src), at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  scatter_rows_kernel<<<grid.blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      index.const_data_ptr<int64_t>(), k, dest.size(0), make_table({src}, {dest}, 0, 1), grid.rows_per_block);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace earlyexit
