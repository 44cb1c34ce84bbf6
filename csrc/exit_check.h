// Entry points of the fused exit check, one per device; the torch binding (torch_bindings.cpp) validates
// the arguments and allocates the outputs, these only compute.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <optional>

// Runs the lambda with scalar_t bound to float, at::Half or at::BFloat16 (the dtypes the op accepts).
#define EE_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                           \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace earlyexit {

// The seven [N] outputs (see earlyexit.ExitResult): token int64, exit bool, then float32
// confidence, max_prob, margin, entropy, lse. All contiguous, on the inputs' device.
struct ExitOutputs {
  at::Tensor token, exit, confidence, max_prob, margin, entropy, lse;
};

// Shared arguments, already validated: hidden [N, d] (unit column stride, any row stride), weight [V, d]
// (same dtype, unit column stride), threshold [N] float32 contiguous, norm_weight [d] / bias [V] contiguous
// (any float dtype) or absent, measure one of earlyexit::Measure, eps >= 0, temperature > 0.
struct ExitArgs {
  at::Tensor hidden, weight, threshold;
  std::optional<at::Tensor> norm_weight, bias;
  int measure;
  double eps, temperature;
};

void exit_check_cpu(const ExitArgs& args, const ExitOutputs& out);

#ifdef EARLYEXIT_WITH_CUDA
void exit_check_cuda(const ExitArgs& args, const ExitOutputs& out);
#endif

}  // namespace earlyexit
