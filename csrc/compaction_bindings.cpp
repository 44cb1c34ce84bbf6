// Torch binding of the compaction kernels: op schemas, argument checks and output allocation. A fragment
// of the earlyexit_C library (torch_bindings.cpp defines it and the module). The Python ops
// earlyexit::compact, earlyexit::partition_rows and earlyexit::scatter_rows call these for backend
// "cpu"/"cuda" from inside their own implementations (earlyexit/ops/compaction.py), so no fake
// implementations are needed here.
#include <torch/library.h>

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

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

using CompactionKernel = void (*)(const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&,
                                 const std::optional<at::Tensor>&, bool);

void check_keep_and_sources(const char* op, const at::Tensor& keep, at::TensorList srcs) {
  TORCH_CHECK(keep.dim() == 1 && keep.scalar_type() == at::kBool && keep.is_contiguous(), op,
              ": keep must be a contiguous 1-D bool tensor");
  for (const auto& s : srcs) check_rows(op, s, "a source", keep.size(0), keep.device(), nullptr);
}

// Returns [srcs[0][keep], ..., index int64 [K]]. The one host synchronization (on a GPU) learns K.
template <CompactionKernel Kernel>
std::vector<at::Tensor> compact_op(const at::Tensor& keep, at::TensorList srcs) {
  check_keep_and_sources("earlyexit_C::compact", keep, srcs);
  const int64_t k = at::count_nonzero(keep).item<int64_t>();
  std::vector<at::Tensor> out;
  out.reserve(srcs.size() + 1);
  for (const auto& s : srcs) {
    std::vector<int64_t> shape(s.sizes().begin(), s.sizes().end());
    shape[0] = k;
    out.push_back(at::empty(shape, s.options()));
  }
  const at::Tensor index = at::empty({k}, keep.options().dtype(at::kLong));
  Kernel(keep, srcs, at::TensorList(out), index, std::nullopt, false);
  out.push_back(index);
  return out;
}

// Writes the partitioned rows of srcs[i] into dsts[i]; returns (perm int64 [N], count int64 0-d). No sync.
template <CompactionKernel Kernel>
std::tuple<at::Tensor, at::Tensor> partition_rows_op(const at::Tensor& keep, at::TensorList srcs,
                                                     at::TensorList dsts) {
  constexpr const char* op = "earlyexit_C::partition_rows";
  check_keep_and_sources(op, keep, srcs);
  TORCH_CHECK(srcs.size() == dsts.size(), op, ": ", srcs.size(), " sources but ", dsts.size(), " destinations");
  for (size_t i = 0; i < srcs.size(); ++i) {
    check_rows(op, dsts[i], "a destination", keep.size(0), keep.device(), &srcs[i]);
  }
  const at::Tensor perm = at::empty({keep.size(0)}, keep.options().dtype(at::kLong));
  const at::Tensor count = at::empty({}, keep.options().dtype(at::kLong));
  Kernel(keep, srcs, dsts, perm, count, true);
  return {perm, count};
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
  m.def("compact(Tensor keep, Tensor[] srcs) -> Tensor[]");
  m.def("partition_rows(Tensor keep, Tensor[] srcs, Tensor(a!)[] dsts) -> (Tensor, Tensor)");
  m.def("scatter_rows(Tensor(a!) dest, Tensor index, Tensor src) -> ()");
}

TORCH_LIBRARY_IMPL(earlyexit_C, CPU, m) {
  m.impl("compact", &earlyexit::compact_op<earlyexit::compaction_cpu>);
  m.impl("partition_rows", &earlyexit::partition_rows_op<earlyexit::compaction_cpu>);
  m.impl("scatter_rows", &earlyexit::scatter_rows_op<earlyexit::scatter_rows_cpu>);
}

#ifdef EARLYEXIT_WITH_CUDA
TORCH_LIBRARY_IMPL(earlyexit_C, CUDA, m) {
  m.impl("compact", &earlyexit::compact_op<earlyexit::compaction_cuda>);
  m.impl("partition_rows", &earlyexit::partition_rows_op<earlyexit::compaction_cuda>);
  m.impl("scatter_rows", &earlyexit::scatter_rows_op<earlyexit::scatter_rows_cuda>);
}
#endif
