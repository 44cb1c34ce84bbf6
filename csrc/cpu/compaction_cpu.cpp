// CPU ragged batch compaction: one serial pass over the keep mask builds the row map (the index, or
// perm), then every tensor's rows move in one parallel pass, as raw bytes.
//
// The scan is serial on purpose: it touches N bytes (70k rows: ~50 us), and a parallel two-pass scan
// would only pay off far beyond batch sizes. The gather is parallel over output rows, in chunks of about
// kGrainBytes so that small rows (an int64 position) do not drown in scheduling overhead.
// Bytes moved per call: compact K rows read + K written, partition N + N, scatter K + K (+ 8 per row
// for the index), no temporaries.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "compaction.h"

namespace earlyexit {
namespace {

constexpr int64_t kGrainBytes = 64 * 1024;

// One tensor's rows as bytes: base pointers, row strides and the row size.
struct ByteRows {
  const char* src;
  char* dst;
  int64_t src_stride, dst_stride, row_bytes;
};

std::vector<ByteRows> byte_rows(at::TensorList srcs, at::TensorList dsts) {
  std::vector<ByteRows> rows;
  rows.reserve(srcs.size());
  for (size_t i = 0; i < srcs.size(); ++i) {
    rows.push_back({static_cast<const char*>(srcs[i].const_data_ptr()), static_cast<char*>(dsts[i].data_ptr()),
                    row_stride_bytes(srcs[i]), row_stride_bytes(dsts[i]), row_bytes(srcs[i])});
  }
  return rows;
}

// Row from[p] of every source -> row to[p] of its destination, for p in [0, m); a null map is the identity.
void move_rows(const std::vector<ByteRows>& tensors, const int64_t* from, const int64_t* to, int64_t m) {
  int64_t bytes_per_row = 1;
  for (const auto& t : tensors) bytes_per_row += t.row_bytes;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / bytes_per_row);
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    for (const auto& t : tensors) {
      if (t.row_bytes == 0) continue;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t s = from ? from[p] : p, d = to ? to[p] : p;
        std::memcpy(t.dst + d * t.dst_stride, t.src + s * t.src_stride, t.row_bytes);
      }
    }
  });
}

}  // namespace

void compaction_cpu(const at::Tensor& keep, at::TensorList srcs, at::TensorList dsts, const at::Tensor& index,
                    const std::optional<at::Tensor>& count, bool partition) {
  const int64_t n = keep.size(0);
  // Any nonzero byte keeps its row, as in torch's ops and the CUDA kernel: a bool tensor made by a view
  // or a reinterpreting copy can hold bytes other than 0 and 1.
  const auto* k = reinterpret_cast<const uint8_t*>(keep.const_data_ptr<bool>());
  int64_t* idx = index.data_ptr<int64_t>();
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) kept += k[i] != 0;
  TORCH_CHECK(index.size(0) == (partition ? n : kept), "earlyexit_C::compaction: index has ", index.size(0),
              " rows, the mask keeps ", kept, " of ", n);
  // Kept rows fill the map from the front; a partition's other rows follow from position kept on.
  int64_t front = 0, back = kept;
  for (int64_t i = 0; i < n; ++i) {
    if (k[i] != 0) {
      idx[front++] = i;
    } else if (partition) {
      idx[back++] = i;
    }
  }
  if (count) count->fill_(kept);
  move_rows(byte_rows(srcs, dsts), idx, nullptr, index.size(0));
}

void scatter_rows_cpu(const at::Tensor& dest, const at::Tensor& index, const at::Tensor& src) {
  const int64_t k = index.size(0), m = dest.size(0);
  const int64_t* idx = index.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK(idx[j] >= 0 && idx[j] < m, "earlyexit_C::scatter_rows: index ", idx[j], " is out of range for ", m,
                " rows");
  }
  move_rows(byte_rows({src}, {dest}), nullptr, idx, k);
}

}  // namespace earlyexit
