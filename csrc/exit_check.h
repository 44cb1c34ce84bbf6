// Entry points of the fused exit check (exit_check) and of its unfinalized statistics (exit_stats), per
// device; the torch binding (torch_bindings.cpp) validates the arguments and allocates the outputs, these
// only compute.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <optional>

// Runs the lambda with scalar_t bound to float, at::Half or at::BFloat16 (the dtypes the op accepts).
#define EE_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                                     \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                           \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace earlyexit {

// The seven [N] outputs of exit_check (see earlyexit.ExitResult): token int64, exit bool, then float32
// confidence, max_prob, margin, entropy, lse. All contiguous, on the inputs' device.
struct ExitOutputs {
  at::Tensor token, exit, confidence, max_prob, margin, entropy, lse;
};

// The six [N] outputs of exit_stats (see earlyexit.ExitStats), the merged RowStats of each row before
// finalize_stats: max_logit (m), argmax (idx, a local column id), second_logit (top2), sum_exp (s),
// sum_exp_z (t) float32/int64, invalid bool (bad or a non-finite hidden row). Contiguous, on the inputs' device.
struct StatsOutputs {
  at::Tensor max_logit, argmax, second_logit, sum_exp, sum_exp_z, invalid;
};

// The head, already validated: hidden [N, d] (unit column stride, any row stride), weight [V, d], V >= 1
// (same dtype, unit column stride), norm_weight [d] / bias [V] contiguous (any float dtype) or absent,
// eps >= 0, temperature > 0, norm_offset finite (the RMSNorm scale is norm_offset + norm_weight, in
// float32), softcap >= 0 (0: no final-logit softcapping; see head_logit in exit_check_stats.h).
struct ExitArgs {
  at::Tensor hidden, weight;
  std::optional<at::Tensor> norm_weight, bias;
  double eps, temperature, norm_offset, softcap;
};

// The exit rule of exit_check: threshold [N] float32 contiguous, statistic one of earlyexit::Statistic,
// exit_above: exit when the statistic is >= the threshold (else when <=).
struct ExitRule {
  at::Tensor threshold;
  int statistic;
  bool exit_above;
};

void exit_check_cpu(const ExitArgs& args, const ExitRule& rule, const ExitOutputs& out);
void exit_stats_cpu(const ExitArgs& args, const StatsOutputs& out);

#ifdef EARLYEXIT_WITH_CUDA
void exit_check_cuda(const ExitArgs& args, const ExitRule& rule, const ExitOutputs& out);
void exit_stats_cuda(const ExitArgs& args, const StatsOutputs& out);
#endif

}  // namespace earlyexit
