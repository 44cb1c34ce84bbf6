// Torch binding of the exit-check kernels: op schemas, argument checks, output allocation; and the
// Python module earlyexit._C whose import runs every registration of the extension. This file defines
// the earlyexit_C library; other binding files (compaction_bindings.cpp) add ops to it as fragments.
//
// Ops live in their own namespace, earlyexit_C, because the Python side owns `earlyexit` (a torch.library
// fragment defined at import time); the Python ops earlyexit::exit_check and earlyexit::exit_stats call
// these for backend "cpu"/"cuda". Fake (meta) implementations are registered in Python
// (earlyexit/ops/extension.py). A measure reaches exit_check as its statistic code and exit direction: the
// names live in Python only (earlyexit/ops/measures.py).
#include <Python.h>
#include <torch/library.h>

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "cpu/row_dots.h"
#include "exit_check.h"
#include "exit_check_stats.h"

#ifdef EARLYEXIT_WITH_CUDA
namespace earlyexit {
std::string compiled_cuda_archs();  // from the .cu file: the architectures nvcc compiled it for
}
#endif

namespace earlyexit {
namespace {

void check_vector(const char* op, const std::optional<at::Tensor>& t, const char* name, int64_t len,
                  const at::Tensor& hidden) {
  if (!t) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == len, op, ": ", name, " must have shape [", len, "], got ", t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), op, ": ", name, " must be a float tensor, got ",
              t->scalar_type());
  TORCH_CHECK(t->device() == hidden.device(), op, ": ", name, " must be on ", hidden.device(), " (like hidden), got ",
              t->device());
  TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
}

// The checks both ops share; op names the op in the messages.
void check_head(const char* op, const ExitArgs& a) {
  const at::Tensor &h = a.hidden, &w = a.weight;
  const auto dt = h.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": hidden must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(w.scalar_type() == dt, op, ": weight must have the dtype of hidden (", dt, "), got ", w.scalar_type());
  TORCH_CHECK(h.dim() == 2, op, ": hidden must be 2-D [N, d], got ", h.sizes());
  TORCH_CHECK(w.dim() == 2, op, ": weight must be 2-D [V, d], got ", w.sizes());
  TORCH_CHECK(h.size(1) >= 1 && w.size(1) == h.size(1), op, ": weight must have shape [V, ", h.size(1),
              "] with d >= 1, got ", w.sizes());
  TORCH_CHECK(w.size(0) >= 1, op, ": weight must have at least one vocabulary row");
  // A column stride only matters with more than one column: torch calls a [N, 1] tensor contiguous whatever it is.
  TORCH_CHECK(h.size(0) == 0 || h.size(1) == 1 || h.stride(1) == 1, op, ": hidden must have a unit column stride");
  TORCH_CHECK(w.size(1) == 1 || w.stride(1) == 1, op, ": weight must have a unit column stride");
  TORCH_CHECK(w.device() == h.device(), op, ": weight must be on ", h.device(), " (like hidden), got ", w.device());
  check_vector(op, a.norm_weight, "norm_weight", h.size(1), h);
  check_vector(op, a.bias, "bias", w.size(0), h);
  TORCH_CHECK(a.temperature > 0, op, ": temperature must be > 0, got ", a.temperature);
  TORCH_CHECK(a.eps >= 0, op, ": norm_eps must be >= 0, got ", a.eps);
  TORCH_CHECK(std::isfinite(a.norm_offset), op, ": norm_offset must be finite, got ", a.norm_offset);
  TORCH_CHECK(std::isfinite(a.softcap) && a.softcap >= 0, op, ": softcap must be finite and >= 0 (0: none), got ",
              a.softcap);
}

// statistic is checked as the int64 the schema passes, before it narrows to int.
void check_rule(const char* op, const at::Tensor& thr, int64_t statistic, const at::Tensor& h) {
  TORCH_CHECK(thr.scalar_type() == at::kFloat && thr.dim() == 1 && thr.size(0) == h.size(0) && thr.is_contiguous(),
              op, ": threshold must be a contiguous float32 [", h.size(0), "] tensor, got ", thr.scalar_type(), " ",
              thr.sizes());
  TORCH_CHECK(thr.device() == h.device(), op, ": threshold must be on ", h.device());
  TORCH_CHECK(statistic >= 0 && statistic < kNumStatistics, op, ": statistic must be in [0, ", kNumStatistics,
              ") (an index of earlyexit.ops.measures.STATISTICS), got ", statistic);
}

using ExitTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using StatsTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <void (*Kernel)(const ExitArgs&, const ExitRule&, const ExitOutputs&)>
ExitTuple exit_check_op(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& threshold,
                        const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& bias,
                        int64_t statistic, bool exit_above, double norm_eps, double temperature, double norm_offset,
                        double softcap) {
  constexpr const char* op = "earlyexit_C::exit_check";
  const ExitArgs args{hidden, weight, norm_weight, bias, norm_eps, temperature, norm_offset, softcap};
  check_head(op, args);
  check_rule(op, threshold, statistic, hidden);
  const ExitRule rule{threshold, static_cast<int>(statistic), exit_above};
  const int64_t n = hidden.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const ExitOutputs out{at::empty({n}, hidden.options().dtype(at::kLong)),
                        at::empty({n}, hidden.options().dtype(at::kBool)),
                        at::empty({n}, f32),
                        at::empty({n}, f32),
                        at::empty({n}, f32),
                        at::empty({n}, f32),
                        at::empty({n}, f32)};
  Kernel(args, rule, out);
  return {out.token, out.exit, out.confidence, out.max_prob, out.margin, out.entropy, out.lse};
}

template <void (*Kernel)(const ExitArgs&, const StatsOutputs&)>
StatsTuple exit_stats_op(const at::Tensor& hidden, const at::Tensor& weight,
                         const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& bias,
                         double norm_eps, double temperature, double norm_offset, double softcap) {
  const ExitArgs args{hidden, weight, norm_weight, bias, norm_eps, temperature, norm_offset, softcap};
  check_head("earlyexit_C::exit_stats", args);
  const int64_t n = hidden.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const StatsOutputs out{at::empty({n}, f32), at::empty({n}, hidden.options().dtype(at::kLong)),
                         at::empty({n}, f32), at::empty({n}, f32),
                         at::empty({n}, f32), at::empty({n}, hidden.options().dtype(at::kBool))};
  Kernel(args, out);
  return {out.max_logit, out.argmax, out.second_logit, out.sum_exp, out.sum_exp_z, out.invalid};
}

}  // namespace
}  // namespace earlyexit

TORCH_LIBRARY(earlyexit_C, m) {
  m.def(
      "exit_check(Tensor hidden, Tensor weight, Tensor threshold, Tensor? norm_weight, Tensor? bias, int statistic, "
      "bool exit_above, float norm_eps, float temperature, float norm_offset=0., float softcap=0.) -> (Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "exit_stats(Tensor hidden, Tensor weight, Tensor? norm_weight, Tensor? bias, float norm_eps, "
      "float temperature, float norm_offset=0., float softcap=0.) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(earlyexit_C, CPU, m) {
  m.impl("exit_check", &earlyexit::exit_check_op<earlyexit::exit_check_cpu>);
  m.impl("exit_stats", &earlyexit::exit_stats_op<earlyexit::exit_stats_cpu>);
}

#ifdef EARLYEXIT_WITH_CUDA
TORCH_LIBRARY_IMPL(earlyexit_C, CUDA, m) {
  m.impl("exit_check", &earlyexit::exit_check_op<earlyexit::exit_check_cuda>);
  m.impl("exit_stats", &earlyexit::exit_stats_op<earlyexit::exit_stats_cuda>);
}
#endif

// earlyexit._C: importing it runs the registrations above. Its attributes: cuda_archs, the CUDA
// architectures the kernels were compiled for ("80;90"), empty when the CUDA part was not built; and
// cpu_bf16_dots, how the CPU kernel multiplies a bf16 head on this CPU ("avx512bf16" pairs or "widen").
static PyModuleDef ee_module = {PyModuleDef_HEAD_INIT, "_C", "earlyexit compiled kernels (ops in torch.ops.earlyexit_C)",
                                -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C() {
  PyObject* mod = PyModule_Create(&ee_module);
  if (mod == nullptr) return nullptr;
#ifdef EARLYEXIT_WITH_CUDA
  const std::string archs = earlyexit::compiled_cuda_archs();
#else
  const std::string archs;
#endif
  if (PyModule_AddStringConstant(mod, "cuda_archs", archs.c_str()) != 0 ||
      PyModule_AddStringConstant(mod, "cpu_bf16_dots", earlyexit::cpu::row_dots_bf16_path()) != 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
