// Torch binding of the compaction kernels: op schemas and argument checks. A fragment of the earlyexit_C
// library (torch_bindings.cpp defines it and the module); the Python ops earlyexit::compact,
// earlyexit::partition_rows and earlyexit::scatter_rows call these for backend "cpu"/"cuda" on word
// views they prepare (earlyexit/ops/compaction.py), so no fake implementations are needed here.
#include <torch/library.h>

#include <ATen/ATen.h>

#include "compaction.h"

namespace earlyexit {
namespace {

void check_words(const at::Tensor& t, const char* what, int64_t rows, const at::Tensor& keep) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows, "earlyexit_C::compaction: ", what, " must be 2-D with ", rows,
              " rows, got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "earlyexit_C::compaction: ", what, " must have unit word stride");
  TORCH_CHECK(t.device() == keep.device(), "earlyexit_C::compaction: ", what, " must be on ", keep.device());
}

template <void (*Kernel)(const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&,
                         const std::optional<at::Tensor>&, bool)>
void compaction_op(const at::Tensor& keep, at::TensorList srcs, at::TensorList dsts, const at::Tensor& index,
                   const std::optional<at::Tensor>& count, bool partition) {
  TORCH_CHECK(keep.dim() == 1 && keep.scalar_type() == at::kByte && keep.is_contiguous(),
              "earlyexit_C::compaction: keep must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.is_contiguous() &&
                  index.device() == keep.device(),
              "earlyexit_C::compaction: index must be a contiguous 1-D int64 tensor on ", keep.device());
  TORCH_CHECK(!partition || index.size(0) == keep.size(0), "earlyexit_C::compaction: perm must have ", keep.size(0),
              " rows");
  TORCH_CHECK(!partition || (count && count->dim() == 0 && count->scalar_type() == at::kLong &&
                             count->device() == keep.device()),
              "earlyexit_C::compaction: a partition needs count, a 0-d int64 tensor on ", keep.device());
  TORCH_CHECK(srcs.size() == dsts.size(), "earlyexit_C::compaction: ", srcs.size(), " sources but ", dsts.size(),
              " destinations");
  for (size_t i = 0; i < srcs.size(); ++i) {
    check_words(srcs[i], "srcs[i]", keep.size(0), keep);
    check_words(dsts[i], "dsts[i]", index.size(0), keep);
    TORCH_CHECK(srcs[i].scalar_type() == dsts[i].scalar_type() && srcs[i].size(1) == dsts[i].size(1),
                "earlyexit_C::compaction: srcs[", i, "] and dsts[", i, "] must have the same word type and width");
  }
  Kernel(keep, srcs, dsts, index, count, partition);
}

template <void (*Kernel)(const at::Tensor&, const at::Tensor&, const at::Tensor&)>
void scatter_rows_op(const at::Tensor& dest, const at::Tensor& index, const at::Tensor& src) {
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong && index.is_contiguous(),
              "earlyexit_C::scatter_rows: index must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(dest.dim() == 2 && src.dim() == 2 && src.size(0) == index.size(0) && src.size(1) == dest.size(1) &&
                  src.scalar_type() == dest.scalar_type(),
              "earlyexit_C::scatter_rows: dest [M, W] and src [K, W] must be word views of one type, got ",
              dest.sizes(), " and ", src.sizes());
  TORCH_CHECK((dest.size(1) <= 1 || dest.stride(1) == 1) && (src.size(1) <= 1 || src.stride(1) == 1),
              "earlyexit_C::scatter_rows: dest and src must have unit word stride");
  TORCH_CHECK(index.device() == dest.device() && src.device() == dest.device(),
              "earlyexit_C::scatter_rows: index and src must be on ", dest.device());
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
