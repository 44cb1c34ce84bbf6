// CUDA kernels of ragged batch compaction on raw pointers (no torch includes): scan of the keep mask plus
// the row moves of every tensor in one launch (up to kMaxTensors tensors; more go in further launches of
// the same kernel), and their grid. Launchers: compaction_cuda.cu; the host emulator (tests/cuda_emu) runs
// the same kernels with the same grids.
//
// Grid (row blocks, column blocks), as the Triton kernel: row block b owns a contiguous range of rows,
// column block c copies byte chunks c, c + C, ... of each row, so that a decode batch of a few hundred
// 8 KiB rows still covers every multiprocessor. Each block counts the kept rows before its range (and in
// total, for a partition) by reading the mask itself, 4 bytes per thread per step: N bytes per block
// from L2, no workspace, no atomics, no inter-block waiting, hence deterministic and CUDA-graph safe.
// Inside a block, 256-row chunks get their destinations from a cub block scan; then each warp copies
// whole rows with the widest vector access (16, 8, 4, 2 or 1 bytes) that the tensor's addresses allow.
// Bytes per call: compact K rows read + K written, partition N + N, scatter K + K (+ 8 per row of index).
#pragma once

#include <algorithm>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cstdint>

namespace earlyexit {
namespace cuda {
namespace compaction_kernels {

constexpr int kThreads = 256;         // threads per block = rows per scan chunk
constexpr int kWarps = kThreads / 32;
constexpr int kMaxTensors = 8;        // tensors per launch (kernel parameter space)
constexpr int64_t kColBytes = 1024;   // bytes of a row per column chunk: 32 lanes x 16 B x 2
constexpr int64_t kMinRowsPerBlock = 16;

// One launch's tensors as bytes, passed by value in the kernel parameters.
struct RowTable {
  const char* src[kMaxTensors];
  char* dst[kMaxTensors];
  int64_t src_stride[kMaxTensors], dst_stride[kMaxTensors], row_bytes[kMaxTensors];
  int vec[kMaxTensors];  // bytes per access: the widest of 16/8/4/2/1 dividing every address and size
  int count;
};

template <int V>
struct VecType;
template <>
struct VecType<16> {
  using T = int4;
};
template <>
struct VecType<8> {
  using T = int2;
};
template <>
struct VecType<4> {
  using T = int;
};
template <>
struct VecType<2> {
  using T = short;
};
template <>
struct VecType<1> {
  using T = char;
};

// One warp copies bytes [c0, c1) of a row; c0 and c1 are multiples of V.
template <int V>
__device__ __forceinline__ void copy_span(const char* src, char* dst, int64_t c0, int64_t c1, int lane) {
  using T = typename VecType<V>::T;
  for (int64_t c = c0 + lane * V; c < c1; c += 32 * V) {
    *reinterpret_cast<T*>(dst + c) = *reinterpret_cast<const T*>(src + c);
  }
}

// Source row r0 + r -> destination row s_dest[r] (skipped when -1), for r < rows, every tensor of the
// table, this column block's chunks only. One warp per row.
__device__ void move_chunk(const RowTable& table, int64_t r0, int rows, const int64_t* s_dest) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int t = 0; t < table.count; ++t) {
    const int64_t rb = table.row_bytes[t];
    for (int r = warp; r < rows; r += kWarps) {
      const int64_t d = s_dest[r];
      if (d < 0) continue;
      const char* src = table.src[t] + (r0 + r) * table.src_stride[t];
      char* dst = table.dst[t] + d * table.dst_stride[t];
      for (int64_t c0 = blockIdx.y * kColBytes; c0 < rb; c0 += gridDim.y * kColBytes) {
        const int64_t c1 = c0 + kColBytes < rb ? c0 + kColBytes : rb;
        switch (table.vec[t]) {
          case 16:
            copy_span<16>(src, dst, c0, c1, lane);
            break;
          case 8:
            copy_span<8>(src, dst, c0, c1, lane);
            break;
          case 4:
            copy_span<4>(src, dst, c0, c1, lane);
            break;
          case 2:
            copy_span<2>(src, dst, c0, c1, lane);
            break;
          default:
            copy_span<1>(src, dst, c0, c1, lane);
        }
      }
    }
  }
}

// Nonzero bytes of a 32-bit word (a bool mask may hold any nonzero byte for true).
__device__ __forceinline__ int nonzero_bytes(uint32_t x) {
  return __popc(((((x & 0x7F7F7F7Fu) + 0x7F7F7F7Fu) | x) & 0x80808080u));
}

__global__ void __launch_bounds__(kThreads)
    compaction_kernel(const uint8_t* __restrict__ keep, int64_t n, int64_t* __restrict__ index,
                      int64_t* __restrict__ count, RowTable table, int64_t rows_per_block, bool partition,
                      bool write_index) {
  using Scan = cub::BlockScan<int, kThreads>;
  using Reduce = cub::BlockReduce<int64_t, kThreads>;
  __shared__ union {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  } tmp;
  __shared__ int64_t s_dest[kThreads];
  __shared__ int64_t s_before, s_total;

  const int64_t start = blockIdx.x * rows_per_block;  // a multiple of 4: whole mask words
  const int64_t end = start + rows_per_block < n ? start + rows_per_block : n;

  // Kept rows before this block's range and, for a partition, in all: 4-byte words (the host passes an
  // aligned mask), then the tail byte by byte.
  const int64_t scan_end = partition ? n : start;
  const int64_t words = scan_end / 4;
  const uint32_t* keep_words = reinterpret_cast<const uint32_t*>(keep);
  int64_t before = 0, total = 0;
  for (int64_t w = threadIdx.x; w < words; w += kThreads) {
    const int c = nonzero_bytes(keep_words[w]);
    total += c;
    before += 4 * w < start ? c : 0;
  }
  for (int64_t i = words * 4 + threadIdx.x; i < scan_end; i += kThreads) {
    const int c = keep[i] != 0;
    total += c;
    before += i < start ? c : 0;
  }
  before = Reduce(tmp.reduce).Sum(before);
  __syncthreads();
  total = Reduce(tmp.reduce).Sum(total);
  if (threadIdx.x == 0) {
    s_before = before;
    s_total = total;
    if (count != nullptr && blockIdx.x == 0 && blockIdx.y == 0) *count = total;
  }
  __syncthreads();
  before = s_before;
  total = s_total;

  for (int64_t r0 = start; r0 < end; r0 += kThreads) {
    const int64_t row = r0 + threadIdx.x;
    const bool in_range = row < end;
    const int k = in_range && keep[row] != 0;
    int excl, chunk_kept;
    Scan(tmp.scan).ExclusiveSum(k, excl, chunk_kept);
    const int64_t kept_before = before + excl;
    // A partition puts the other rows after the K kept ones, in order: K + (other rows before this one).
    const int64_t dest = k ? kept_before : total + row - kept_before;
    const bool move = in_range && (k || partition);
    s_dest[threadIdx.x] = move ? dest : -1;
    if (move && write_index && blockIdx.y == 0) index[dest] = row;
    __syncthreads();
    move_chunk(table, r0, static_cast<int>(end - r0 < kThreads ? end - r0 : kThreads), s_dest);
    before += chunk_kept;
    __syncthreads();  // s_dest and the scan storage are reused by the next chunk
  }
}

__global__ void __launch_bounds__(kThreads)
    scatter_rows_kernel(const int64_t* __restrict__ index, int64_t k, int64_t m, RowTable table,
                        int64_t rows_per_block) {
  __shared__ int64_t s_dest[kThreads];
  const int64_t start = blockIdx.x * rows_per_block;
  const int64_t end = start + rows_per_block < k ? start + rows_per_block : k;
  for (int64_t r0 = start; r0 < end; r0 += kThreads) {
    const int64_t row = r0 + threadIdx.x;
    const int64_t d = row < end ? index[row] : -1;
    // Out-of-range rows are never written; the Python op raises for them (an async device assert).
    s_dest[threadIdx.x] = d >= 0 && d < m ? d : -1;
    __syncthreads();
    move_chunk(table, r0, static_cast<int>(end - r0 < kThreads ? end - r0 : kThreads), s_dest);
    __syncthreads();
  }
}

// The widest access (16/8/4/2/1 bytes) that divides both row addresses, both row strides and the row size
// (bytes) of one tensor.
inline int vector_bytes(const void* src, const void* dst, int64_t src_stride, int64_t dst_stride, int64_t row_bytes) {
  const uint64_t bits = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                        static_cast<uint64_t>(src_stride) | static_cast<uint64_t>(dst_stride) |
                        static_cast<uint64_t>(row_bytes);
  for (int v : {16, 8, 4, 2}) {
    if (bits % v == 0) return v;
  }
  return 1;
}

// Appends one tensor's rows (row strides and row size in bytes) to a launch's table (at most kMaxTensors).
inline void add_rows(RowTable& table, const void* src, void* dst, int64_t src_stride, int64_t dst_stride,
                     int64_t row_bytes) {
  const int t = table.count++;
  table.src[t] = static_cast<const char*>(src);
  table.dst[t] = static_cast<char*>(dst);
  table.src_stride[t] = src_stride;
  table.dst_stride[t] = dst_stride;
  table.row_bytes[t] = row_bytes;
  table.vec[t] = vector_bytes(src, dst, src_stride, dst_stride, row_bytes);
}

// Grid for n_rows rows of at most max_row_bytes bytes on `sms` multiprocessors: about 4 blocks per one, small batches
// split over column blocks, large ones with several 16-row groups per block.
struct Grid {
  dim3 blocks;
  int64_t rows_per_block;
};

inline Grid make_grid(int64_t n_rows, int64_t max_row_bytes, int sms) {
  const int64_t target = 4 * static_cast<int64_t>(sms);
  const int64_t groups = (n_rows + kMinRowsPerBlock - 1) / kMinRowsPerBlock;
  const int64_t col_chunks = std::max<int64_t>(1, (max_row_bytes + kColBytes - 1) / kColBytes);
  const int64_t n_col = std::clamp<int64_t>(target / groups, 1, std::min<int64_t>(col_chunks, 65535));
  const int64_t n_row = std::min(groups, (target + n_col - 1) / n_col);
  const int64_t rows_per_block = (groups + n_row - 1) / n_row * kMinRowsPerBlock;
  const int64_t row_blocks = (n_rows + rows_per_block - 1) / rows_per_block;
  return {dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(n_col)), rows_per_block};
}

}  // namespace compaction_kernels
}  // namespace cuda
}  // namespace earlyexit
