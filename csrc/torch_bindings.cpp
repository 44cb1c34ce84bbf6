// Torch binding of the exit-check kernels: op schemas, argument checks, output allocation; and the
// Python module earlyexit._C whose import runs every registration of the extension. This file defines
// the earlyexit_C library; other binding files (compaction_bindings.cpp) add ops to it as fragments.
//
// Ops live in their own namespace, earlyexit_C, because the Python side owns `earlyexit` (a torch.library
// fragment defined at import time); the Python op earlyexit::exit_check calls these for backend
// "cpu"/"cuda". Fake (meta) implementations are registered in Python (earlyexit/ops/extension.py).
#include <Python.h>
#include <torch/library.h>

#include <ATen/ATen.h>

#include <string>

#include "exit_check.h"
#include "exit_check_stats.h"

#ifdef EARLYEXIT_WITH_CUDA
namespace earlyexit {
std::string compiled_cuda_archs();  // from the .cu file: the architectures nvcc compiled it for
}
#endif

namespace earlyexit {
namespace {

int measure_code(const std::string& measure) {
  if (measure == "max_prob") return kMaxProb;
  if (measure == "margin") return kMargin;
  TORCH_CHECK(measure == "entropy", "earlyexit_C::exit_check: measure must be max_prob, margin or entropy, got '",
              measure, "'");
  return kEntropy;
}

void check_vector(const std::optional<at::Tensor>& t, const char* name, int64_t len, const at::Tensor& hidden) {
  if (!t) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == len, "earlyexit_C::exit_check: ", name, " must have shape [", len,
              "], got ", t->sizes());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "earlyexit_C::exit_check: ", name,
              " must be a float tensor, got ", t->scalar_type());
  TORCH_CHECK(t->device() == hidden.device(), "earlyexit_C::exit_check: ", name, " must be on ", hidden.device(),
              " (like hidden), got ", t->device());
  TORCH_CHECK(t->is_contiguous(), "earlyexit_C::exit_check: ", name, " must be contiguous");
}

void check_args(const ExitArgs& a) {
  const at::Tensor &h = a.hidden, &w = a.weight, &thr = a.threshold;
  const auto dt = h.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "earlyexit_C::exit_check: hidden must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(w.scalar_type() == dt, "earlyexit_C::exit_check: weight must have the dtype of hidden (", dt, "), got ",
              w.scalar_type());
  TORCH_CHECK(h.dim() == 2, "earlyexit_C::exit_check: hidden must be 2-D [N, d], got ", h.sizes());
  TORCH_CHECK(w.dim() == 2, "earlyexit_C::exit_check: weight must be 2-D [V, d], got ", w.sizes());
  TORCH_CHECK(h.size(1) >= 1 && w.size(1) == h.size(1), "earlyexit_C::exit_check: weight must have shape [V, ",
              h.size(1), "] with d >= 1, got ", w.sizes());
  TORCH_CHECK(w.size(0) >= 1, "earlyexit_C::exit_check: weight must have at least one vocabulary row");
  TORCH_CHECK(h.size(0) == 0 || h.stride(1) == 1, "earlyexit_C::exit_check: hidden must have a unit column stride");
  TORCH_CHECK(w.stride(1) == 1, "earlyexit_C::exit_check: weight must have a unit column stride");
  TORCH_CHECK(w.device() == h.device(), "earlyexit_C::exit_check: weight must be on ", h.device(),
              " (like hidden), got ", w.device());
  TORCH_CHECK(thr.scalar_type() == at::kFloat && thr.dim() == 1 && thr.size(0) == h.size(0) && thr.is_contiguous(),
              "earlyexit_C::exit_check: threshold must be a contiguous float32 [", h.size(0), "] tensor, got ",
              thr.scalar_type(), " ", thr.sizes());
  TORCH_CHECK(thr.device() == h.device(), "earlyexit_C::exit_check: threshold must be on ", h.device());
  check_vector(a.norm_weight, "norm_weight", h.size(1), h);
  check_vector(a.bias, "bias", w.size(0), h);
  TORCH_CHECK(a.temperature > 0, "earlyexit_C::exit_check: temperature must be > 0, got ", a.temperature);
  TORCH_CHECK(a.eps >= 0, "earlyexit_C::exit_check: norm_eps must be >= 0, got ", a.eps);
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <void (*Kernel)(const ExitArgs&, const ExitOutputs&)>
Outputs exit_check_op(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& threshold,
                      const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& bias,
                      c10::string_view measure, double norm_eps, double temperature) {
  const ExitArgs args{hidden, weight, threshold, norm_weight, bias, measure_code(std::string(measure)), norm_eps,
                      temperature};
  check_args(args);
  const int64_t n = hidden.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const ExitOutputs out{at::empty({n}, hidden.options().dtype(at::kLong)),
                        at::empty({n}, hidden.options().dtype(at::kBool)),
                        at::empty({n}, f32),
                        at::empty({n}, f32),
                        at::empty({n}, f32),
                        at::empty({n}, f32),
                        at::empty({n}, f32)};
  Kernel(args, out);
  return {out.token, out.exit, out.confidence, out.max_prob, out.margin, out.entropy, out.lse};
}

}  // namespace
}  // namespace earlyexit

TORCH_LIBRARY(earlyexit_C, m) {
  m.def(
      "exit_check(Tensor hidden, Tensor weight, Tensor threshold, Tensor? norm_weight, Tensor? bias, str measure, "
      "float norm_eps, float temperature) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(earlyexit_C, CPU, m) { m.impl("exit_check", &earlyexit::exit_check_op<earlyexit::exit_check_cpu>); }

#ifdef EARLYEXIT_WITH_CUDA
TORCH_LIBRARY_IMPL(earlyexit_C, CUDA, m) {
  m.impl("exit_check", &earlyexit::exit_check_op<earlyexit::exit_check_cuda>);
}
#endif

// earlyexit._C: importing it runs the registrations above. Its one attribute, cuda_archs, lists the CUDA
// architectures the kernels were compiled for ("80;90"), empty when the CUDA part was not built.
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
  if (PyModule_AddStringConstant(mod, "cuda_archs", archs.c_str()) != 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
