// Torch binding of the state-similarity kernels: op schema, argument checks and output allocation. A
// fragment of the earlyexit_C library (torch_bindings.cpp defines it and the module). The Python op
// earlyexit::state_similarity calls earlyexit_C::state_similarity for backend "cpu"/"cuda" from inside its
// own implementation (earlyexit/ops/state_similarity.py); the fake implementation for tracing is
// registered in Python (earlyexit/ops/extension.py).
#include <torch/library.h>

#include <ATen/ATen.h>

#include "state_similarity.h"

namespace earlyexit {
namespace {

template <void (*Kernel)(const at::Tensor&, const at::Tensor&, const at::Tensor&)>
at::Tensor state_similarity_op(const at::Tensor& h, const at::Tensor& h_prev) {
  constexpr const char* op = "earlyexit_C::state_similarity";
  const auto dt = h.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": h must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(h_prev.scalar_type() == dt, op, ": h_prev must have the dtype of h (", dt, "), got ",
              h_prev.scalar_type());
  TORCH_CHECK(h.dim() == 2 && h.size(1) >= 1, op, ": h must be 2-D [N, d] with d >= 1, got ", h.sizes());
  TORCH_CHECK(h_prev.sizes() == h.sizes(), op, ": h_prev must have the shape of h (", h.sizes(), "), got ",
              h_prev.sizes());
  TORCH_CHECK(h_prev.device() == h.device(), op, ": h_prev must be on ", h.device(), " (like h), got ",
              h_prev.device());
  // With d == 1 the column stride is never used (and torch calls such a tensor contiguous whatever it is).
  TORCH_CHECK(h.size(0) == 0 || h.size(1) == 1 || (h.stride(1) == 1 && h_prev.stride(1) == 1), op,
              ": h and h_prev must have a unit column stride");
  at::Tensor out = at::empty({h.size(0)}, h.options().dtype(at::kFloat));
  Kernel(h, h_prev, out);
  return out;
}

}  // namespace
}  // namespace earlyexit

TORCH_LIBRARY_FRAGMENT(earlyexit_C, m) { m.def("state_similarity(Tensor h, Tensor h_prev) -> Tensor"); }

TORCH_LIBRARY_IMPL(earlyexit_C, CPU, m) {
  m.impl("state_similarity", &earlyexit::state_similarity_op<earlyexit::state_similarity_cpu>);
}

#ifdef EARLYEXIT_WITH_CUDA
TORCH_LIBRARY_IMPL(earlyexit_C, CUDA, m) {
  m.impl("state_similarity", &earlyexit::state_similarity_op<earlyexit::state_similarity_cuda>);
}
#endif
