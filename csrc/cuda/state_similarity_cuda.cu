// CUDA state similarity: the launcher of state_similarity_kernels.cuh's kernel (one warp per row pair).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "state_similarity.h"
#include "state_similarity_kernels.cuh"

namespace earlyexit {
namespace {

using namespace cuda::state_kernels;

template <typename T>
void launch(const at::Tensor& h, const at::Tensor& p, const at::Tensor& out, cudaStream_t stream) {
  const int64_t n = h.size(0), d = h.size(1);
  const T* hp = static_cast<const T*>(h.const_data_ptr());
  const T* pp = static_cast<const T*>(p.const_data_ptr());
  const dim3 blocks(blocks_for(n));
  float* o = out.mutable_data_ptr<float>();
  if (vectorizable(hp, pp, h.stride(0), p.stride(0), d, sizeof(T))) {
    state_similarity_kernel<T, true><<<blocks, kThreads, 0, stream>>>(hp, pp, o, n, d, h.stride(0), p.stride(0));
  } else {
    state_similarity_kernel<T, false><<<blocks, kThreads, 0, stream>>>(hp, pp, o, n, d, h.stride(0), p.stride(0));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void state_similarity_cuda(const at::Tensor& h, const at::Tensor& p, const at::Tensor& out) {
  if (h.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(h.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (h.scalar_type()) {
    case at::kFloat:
      launch<float>(h, p, out, stream);
      break;
    case at::kHalf:
      launch<__half>(h, p, out, stream);
      break;
    default:
      launch<__nv_bfloat16>(h, p, out, stream);
  }
}

}  // namespace earlyexit
