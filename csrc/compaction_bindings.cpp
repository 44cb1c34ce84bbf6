// Torch binding of the compaction kernels: op schemas and argument checks. A fragment of the earlyexit_C
// library (torch_bindings.cpp defines it and the module); the Python ops earlyexit::compact,
// earlyexit::partition_rows and earlyexit::scatter_rows call these for backend "cpu"/"cuda" from
// inside their own implementations (earlyexit/ops/compaction.py), so no fake implementations are needed here.
#include <torch/library.h>

#include <ATen/ATen.h>

#include "compaction.h"

namespace earlyexit {
namespace {

bool rows_dense(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

// t is [rows, ...] with dense rows, on device; like (dtype and row shape of) `like` when given.
void check_rows(const char* op, const at::Tensor& t, const char* what, int64_t rows, const at::Device& device,
                const at::Tensor* like) {
  TORCH_CHECK(t.dim() >= 1 && t.size(0) == rows, op, ": ", what, " must have ", rows, " rows, got ", t.sizes());
  TORCH_CHECK(t.numel() == 0 || rows_dense(t), op, ": ", what, " must have dense rows, got strides ", t.strides());
  TORCH_CHECK(t.device() == device, op, ": ", what, " must be on ", device, ", got ", t.device());
  if (like != nullptr) {
    TORCH_CHECK(t.scalar_type() == like->scalar_type() && t.sizes().slice(1) == like->sizes().slice(1), op, ": ",
                what, " must have the dtype and row shape of its source");
  }
}

template <void (*Kernel)(const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&,
                         const std::optional<at::Tensor>&, bool)>
void compaction_op(const at::Tensor& keep, at::TensorList srcs, at::TensorList dsts, const at::Tensor& index,
                   const std::optional<at::Tensor>& count, bool partition) {
  constexpr const char* op = "earlyexit_C::compaction";
  TORCH_CHECK(keep.dim() == 1 && keep.scalar_type() == at::kBool && keep.is_contiguous(), op,
              ": keep must be a contiguous 1-D bool tensor");
  const int64_t n = keep.size(0);
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.is_contiguous() &&
                  index.device() == keep.device(),
              op, ": index must be a contiguous 1-D int64 tensor on ", keep.device());
  TORCH_CHECK(!partition || index.size(0) == n, op, ": perm must have ", n, " rows");
  TORCH_CHECK(!partition || (count && count->dim() == 0 && count->scalar_type() == at::kLong &&
                             count->device() == keep.device()),
              op, ": a partition needs count, a 0-d int64 tensor on ", keep.device());
  TORCH_CHECK(srcs.size() == dsts.size(), op, ": ", srcs.size(), " sources but ", dsts.size(), " destinations");
  for (size_t i = 0; i < srcs.size(); ++i) {
    check_rows(op, srcs[i], "a source", n, keep.device(), nullptr);
    check_rows(op, dsts[i], "a destination", index.size(0), keep.device(), &srcs[i]);
  }
  Kernel(keep, srcs, dsts, index, count, partition);
}

template <void (*Kernel)(const at::Tensor&, const at::Tensor&, const at::Tensor&)>
void scatter_rows_op(const at::Tensor& dest, const at::Tensor& index, const at::Tensor& src) {
  constexpr const char* op = "earlyexit_C::scatter_rows";
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.is_contiguous() &&
                  index.device() == dest.device(),
              op, ": index must be a contiguous 1-D int64 tensor on ", dest.device());
  check_rows(op, dest, "dest", dest.dim() >= 1 ? dest.size(0) : -1, dest.device(), nullptr);
  check_rows(op, src, "src", index.size(0), dest.device(), &dest);
  Kernel(dest, index, src);
}

}  // namespace
}  // namespace earlyexit

TORCH_LIBRARY_FRAGMENT(earlyexit_C, m) {
  m.def(
      "compaction(Tensor keep, Tensor[] srcs, Tensor(a!)[] dsts, Tensor(b!) index, Tensor(c!)? count, "
      "bool partition) -> ()");
  m.def("scatter_rows(Tensor(a!) dest, Tensor index, Tensor src) -> ()");
}

TORCH_LIBRARY_IMPL(earlyexit_C, CPU, m) {
  m.impl("compaction", &earlyexit::compaction_op<earlyexit::compaction_cpu>);
  m.impl("scatter_rows", &earlyexit::scatter_rows_op<earlyexit::scatter_rows_cpu>);
}

#ifdef EARLYEXIT_WITH_CUDA
TORCH_LIBRARY_IMPL(earlyexit_C, CUDA, m) {
  m.impl("compaction", &earlyexit::compaction_op<earlyexit::compaction_cuda>);
  m.impl("scatter_rows", &earlyexit::scatter_rows_op<earlyexit::scatter_rows_cuda>);
}
#endif
