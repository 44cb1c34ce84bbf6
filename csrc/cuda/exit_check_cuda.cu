// Launchers of the CUDA exit check and exit stats (kernels in exit_check_kernels.cuh): launch configuration,
// workspaces, the per-stream merge counters, and the cuBLAS vocabulary-chunk loop for larger N.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/GradMode.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "cuda/exit_check_kernels.cuh"
#include "cuda/exit_check_mma.cuh"
#include "cuda/exit_check_plan.h"
#include "exit_check.h"

namespace earlyexit {

// The architectures nvcc compiled this file for, from its __CUDA_ARCH_LIST__ (e.g. 800,900 -> "80;90").
std::string compiled_cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
#define EE_STR2(...) #__VA_ARGS__
#define EE_STR(...) EE_STR2(__VA_ARGS__)
  const std::string list = EE_STR(__CUDA_ARCH_LIST__);
  std::string out;
  size_t start = 0;
  while (start < list.size()) {
    size_t end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    const std::string arch = std::to_string(std::stoi(list.substr(start, end - start)) / 10);
    if (out.find(arch) == std::string::npos) out += (out.empty() ? "" : ";") + arch;
    start = end + 1;
  }
  return out;
#else
  return EARLYEXIT_CUDA_ARCHS;
#endif
}

namespace {

template <typename scalar_t>
struct DeviceType {
  using type = scalar_t;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

int vector_kind(const std::optional<at::Tensor>& t) {
  if (!t) return cuda::kNone;
  switch (t->scalar_type()) {
    case at::kFloat:
      return cuda::kF32;
    case at::kHalf:
      return cuda::kF16;
    case at::kBFloat16:
      return cuda::kBF16;
    default:
      TORCH_CHECK(false, "earlyexit_C (cuda): bias/norm_weight must be float32, float16 or bfloat16");
  }
}

// The head arguments; the caller sets one output mode (see cuda::Params), the other stays null.
template <typename T>
cuda::Params<T> make_params(const ExitArgs& a) {
  cuda::Params<T> p{};
  p.hidden = reinterpret_cast<const T*>(a.hidden.const_data_ptr());
  p.hidden_stride = a.hidden.stride(0);
  p.weight = reinterpret_cast<const T*>(a.weight.const_data_ptr());
  p.weight_stride = a.weight.stride(0);
  p.bias = a.bias ? a.bias->const_data_ptr() : nullptr;
  p.bias_kind = vector_kind(a.bias);
  p.norm_weight = a.norm_weight ? a.norm_weight->const_data_ptr() : nullptr;
  p.norm_kind = vector_kind(a.norm_weight);
  p.n = static_cast<int>(a.hidden.size(0));
  p.d = static_cast<int>(a.hidden.size(1));
  p.v = a.weight.size(0);
  p.eps = static_cast<float>(a.eps);
  p.temperature = static_cast<float>(a.temperature);
  p.norm_offset = static_cast<float>(a.norm_offset);
  p.softcap = static_cast<float>(a.softcap);
  return p;
}

// Zeroed int32 merge counters, at least n of them. The decode kernels reset each counter they use, so
// eager calls share one buffer per (device, stream), zeroed once when allocated and never per call (no
// memset launch); it is intentionally never freed, it lives as long as the stream. Under CUDA-graph
// capture each call gets its own buffer, zeroed by a captured fill: a shared one would be zeroed only
// by the first graph captured (graphs share torch's capture stream and replay in any order, even
// concurrently). The caller keeps the returned tensor alive until the kernel is launched.
at::Tensor merge_counters(const at::Tensor& like, cudaStream_t stream, int64_t n) {
  const auto options = like.options().dtype(at::kInt);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return at::zeros({n}, options);
  static std::mutex mu;
  static auto* cache = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  std::lock_guard<std::mutex> lock(mu);
  at::Tensor& buf = (*cache)[{like.get_device(), stream}];
  if (!buf.defined() || buf.numel() < n) buf = at::zeros({std::max<int64_t>(n, 64)}, options);
  return buf;
}

// What the launchers need to know of a kernel on the current device, cached per (kernel, device).
struct KernelInfo {
  size_t smem_limit;  // dynamic shared memory it may use: the opt-in limit less its static arrays
  int ptx_version;    // virtual architecture it was compiled from (75 = compute_75 PTX, JIT-compiled or not)
};

// On the first call per (kernel, device) it also opts the kernel into smem_limit bytes, so later calls (a
// CUDA-graph capture among them) make no attribute calls.
KernelInfo kernel_info(const void* kernel) {
  static std::mutex mu;
  static auto* cache = new std::map<std::pair<const void*, int>, KernelInfo>();
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(kernel, device);
  if (auto it = cache->find(key); it != cache->end()) return it->second;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const KernelInfo info{at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin - attr.sharedSizeBytes,
                        attr.ptxVersion};
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(info.smem_limit)));
  cache->emplace(key, info);
  return info;
}

// Workspace of the decode kernels' per-(slice, row) partial statistics: O(N * slices), never O(N * V).
struct PartialsBuffer {
  at::Tensor f, idx, bad;
  cuda::Partials view;
  PartialsBuffer(const at::Tensor& like, int64_t parts)
      : f(at::empty({5, parts}, like.options().dtype(at::kFloat))),
        idx(at::empty({parts}, like.options().dtype(at::kLong))),
        bad(at::empty({parts}, like.options().dtype(at::kInt))) {
    float* base = f.mutable_data_ptr<float>();
    view = cuda::Partials{base,         base + parts, base + 2 * parts, base + 3 * parts, base + 4 * parts,
                          idx.mutable_data_ptr<int64_t>(), bad.mutable_data_ptr<int>()};
  }
};

template <typename T, int RG, int VEC>
void launch_decode_rg(const cuda::Params<T>& p, const cuda::DecodePlan& plan, const at::Tensor& like,
                      cudaStream_t stream) {
  auto kernel = cuda::decode_kernel<T, RG, VEC>;
  TORCH_CHECK(plan.smem <= kernel_info(reinterpret_cast<const void*>(kernel)).smem_limit,
              "earlyexit_C (cuda): decode kernel shared memory exceeds the device limit");
  PartialsBuffer part(like, static_cast<int64_t>(plan.groups) * plan.slices * RG);
  const at::Tensor counters = merge_counters(like, stream, plan.groups);
  kernel<<<dim3(static_cast<unsigned>(plan.groups), static_cast<unsigned>(plan.slices)), cuda::kThreads, plan.smem,
           stream>>>(p, part.view, counters.data_ptr<int>(), plan.cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The FMA decode kernel with the plan of exit_check_plan.h (rows per group, 16-byte loads, slices).
template <typename T>
void launch_decode(const cuda::Params<T>& p, const at::Tensor& like, cudaStream_t stream) {
  const auto* props = at::cuda::getCurrentDeviceProperties();
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = cuda::decode_vec_ok(p.weight, p.weight_stride, p.d, sizeof(T));
  // The budget of the instantiation with the largest static arrays (RG = 8) holds for every RG.
  const void* largest = vec ? reinterpret_cast<const void*>(cuda::decode_kernel<T, 8, kVec>)
                            : reinterpret_cast<const void*>(cuda::decode_kernel<T, 8, 1>);
  const cuda::DecodePlan plan = cuda::decode_plan(p.n, p.d, p.v, sizeof(T), vec, props->multiProcessorCount,
                                                  kernel_info(largest).smem_limit, cuda::kWarps);
  TORCH_CHECK(plan.rg > 0, "earlyexit_C (cuda): d = ", p.d,
              " is too large for the hidden row to fit in shared memory; use backend='triton'");
  auto go = [&](auto rg_tag) {
    constexpr int RG = decltype(rg_tag)::value;
    if (plan.vec) {
      launch_decode_rg<T, RG, kVec>(p, plan, like, stream);
    } else {
      launch_decode_rg<T, RG, 1>(p, plan, like, stream);
    }
  };
  switch (plan.rg) {
    case 1:
      go(std::integral_constant<int, 1>{});
      break;
    case 2:
      go(std::integral_constant<int, 2>{});
      break;
    case 4:
      go(std::integral_constant<int, 4>{});
      break;
    default:
      go(std::integral_constant<int, 8>{});
  }
}

// Tensor-core decode path (exit_check_mma.cuh): fp16/bf16 with 16-byte aligned rows, on a device and a
// build with sm_80+ code (built from compute_75 PTX only, the kernel would trap: use the FMA kernel).
template <typename T>
bool mma_eligible(const ExitArgs& a) {
  if (at::cuda::getCurrentDeviceProperties()->major < 8) return false;
  if (kernel_info(reinterpret_cast<const void*>(cuda::decode_mma_kernel<T, 1, 2>)).ptx_version < 80) return false;
  return cuda::mma_layout_ok(a.hidden.const_data_ptr(), a.hidden.stride(0), a.weight.const_data_ptr(),
                             a.weight.stride(0), static_cast<int>(a.hidden.size(1)));
}

// The tensor-core decode kernel with the plan of exit_check_plan.h (token and m-tiles, K chunks, slices).
template <typename T, int NT, int MT>
void launch_decode_mma_nt(const cuda::Params<T>& p, const at::Tensor& like, cudaStream_t stream) {
  constexpr int NP = 8 * NT;
  auto kernel = cuda::decode_mma_kernel<T, NT, MT>;
  const int64_t budget = static_cast<int64_t>(kernel_info(reinterpret_cast<const void*>(kernel)).smem_limit);
  const cuda::MmaPlan plan =
      cuda::mma_plan({NT, MT}, p.d, p.v, sizeof(T), at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
                     budget, cuda::kMmaK, cuda::kMmaWarps, cuda::kMmaThreads);
  TORCH_CHECK(plan.kc > 0, "earlyexit_C (cuda): not enough shared memory for the decode kernel");
  TORCH_CHECK(plan.per_slice <= INT32_MAX, "earlyexit_C (cuda): V is too large");
  PartialsBuffer part(like, plan.slices * NP);
  const at::Tensor counters = merge_counters(like, stream, 1);
  kernel<<<static_cast<unsigned>(plan.slices), cuda::kMmaThreads, plan.smem, stream>>>(
      p, part.view, counters.data_ptr<int>(), static_cast<int>(plan.per_slice), static_cast<int>(plan.kc),
      static_cast<int>(plan.ks));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_decode_mma(const cuda::Params<T>& p, const at::Tensor& like, cudaStream_t stream) {
  const cuda::MmaTiles t = cuda::mma_tiles(p.n);
  if (t.nt == 1 && t.mt == 2) {
    launch_decode_mma_nt<T, 1, 2>(p, like, stream);
  } else if (t.nt == 2 && t.mt == 2) {
    launch_decode_mma_nt<T, 2, 2>(p, like, stream);
  } else if (t.nt == 4 && t.mt == 1) {
    launch_decode_mma_nt<T, 4, 1>(p, like, stream);
  } else {
    TORCH_CHECK(t.nt == 8 && t.mt == 1, "earlyexit_C (cuda): no decode_mma_kernel for NT=", t.nt, ", MT=", t.mt);
    launch_decode_mma_nt<T, 8, 1>(p, like, stream);
  }
}

// Larger N: normalized rows once ([N, d], dtype T), then per vocabulary chunk one cuBLAS GEMM with float32
// output into an [N, C] buffer (C: 16 MiB of logits, so they are re-read from L2, not DRAM) and one
// statistics kernel over it.
// Bytes per chunk: C*d*elt weight + N*d*elt rows (L2) + 2 * N*C*4 logits (written, re-read from L2).
template <typename T>
void launch_chunked(const cuda::Params<T>& p, const ExitArgs& a, cudaStream_t stream) {
  const int64_t n = p.n, v = p.v;
  at::Tensor xn = at::empty({n, p.d}, a.weight.options());
  at::Tensor finite = at::empty({n}, a.weight.options().dtype(at::kBool));
  cuda::normalize_kernel<T><<<static_cast<unsigned>((n + cuda::kWarps - 1) / cuda::kWarps), cuda::kThreads, 0, stream>>>(
      p, reinterpret_cast<T*>(xn.mutable_data_ptr()), finite.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t cols = cuda::chunk_columns(n, v);
  at::Tensor zbuf = at::empty({n * cols}, a.weight.options().dtype(at::kFloat));
  at::Tensor running = at::empty({n * static_cast<int64_t>(sizeof(RowStats))}, a.weight.options().dtype(at::kByte));
  for (int64_t v0 = 0; v0 < v; v0 += cols) {
    const int64_t nc = std::min(cols, v - v0);
    at::Tensor z = zbuf.narrow(0, 0, n * nc).view({n, nc});
    // float32 accumulation and output for every input dtype (mm.dtype_out); float32 inputs follow
    // torch.backends.cuda.matmul.allow_tf32 (off by default).
    at::mm_out(z, xn, a.weight.narrow(0, v0, nc).t(), at::kFloat);
    cuda::chunk_stats_kernel<T><<<static_cast<unsigned>(n), cuda::kThreads, 0, stream>>>(
        p, z.const_data_ptr<float>(), nc, nc, v0, reinterpret_cast<RowStats*>(running.mutable_data_ptr()),
        finite.const_data_ptr<bool>(), v0 == 0, v0 + nc >= v);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Picks the path: decode kernels for N <= kDecodeMaxRows (tensor cores for eligible fp16/bf16), else the
// chunked cuBLAS path. set_outputs(p) fills the output mode of the Params.
template <typename SetOutputs>
void run(const ExitArgs& a, const SetOutputs& set_outputs) {
  // The ATen calls inside (mm_out, copy_) are kernel internals: a weight that requires grad (an
  // nn.Parameter) must not make them record autograd history or reject out= arguments.
  const c10::NoGradGuard no_grad;
  const int64_t n = a.hidden.size(0);
  if (n == 0) return;
  TORCH_CHECK(n <= INT32_MAX && a.hidden.size(1) <= INT32_MAX, "earlyexit_C (cuda): N and d must fit in int32");
  const c10::cuda::CUDAGuard guard(a.hidden.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  EE_DISPATCH_FLOAT_TYPES(a.hidden.scalar_type(), "exit_check_cuda", [&] {
    using T = typename DeviceType<scalar_t>::type;
    cuda::Params<T> p = make_params<T>(a);
    set_outputs(p);
    if (n <= cuda::kDecodeMaxRows) {
      if constexpr (std::is_same_v<T, float>) {
        launch_decode<T>(p, a.hidden, stream);
      } else if (mma_eligible<T>(a)) {
        launch_decode_mma<T>(p, a.hidden, stream);
      } else {
        launch_decode<T>(p, a.hidden, stream);
      }
    } else {
      launch_chunked<T>(p, a, stream);
    }
  });
}

}  // namespace

void exit_check_cuda(const ExitArgs& a, const ExitRule& rule, const ExitOutputs& o) {
  run(a, [&](auto& p) {
    p.threshold = rule.threshold.const_data_ptr<float>();
    p.statistic = rule.statistic;
    p.exit_above = rule.exit_above;
    p.token = o.token.mutable_data_ptr<int64_t>();
    p.exit = o.exit.mutable_data_ptr<bool>();
    p.confidence = o.confidence.mutable_data_ptr<float>();
    p.max_prob = o.max_prob.mutable_data_ptr<float>();
    p.margin = o.margin.mutable_data_ptr<float>();
    p.entropy = o.entropy.mutable_data_ptr<float>();
    p.lse = o.lse.mutable_data_ptr<float>();
  });
}

void exit_stats_cuda(const ExitArgs& a, const StatsOutputs& o) {
  run(a, [&](auto& p) {
    p.max_logit = o.max_logit.mutable_data_ptr<float>();
    p.argmax = o.argmax.mutable_data_ptr<int64_t>();
    p.second_logit = o.second_logit.mutable_data_ptr<float>();
    p.sum_exp = o.sum_exp.mutable_data_ptr<float>();
    p.sum_exp_z = o.sum_exp_z.mutable_data_ptr<float>();
    p.invalid = o.invalid.mutable_data_ptr<bool>();
  });
}

}  // namespace earlyexit
