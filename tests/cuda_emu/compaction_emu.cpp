// Runs the CUDA compaction kernels (csrc/cuda/compaction_kernels.cuh) on the host emulator with the
// launchers' grids and tensor groups (compaction_cuda.cu), for tests/test_cuda_emulated_compaction.py. No
// torch, no CUDA toolkit; cub's block scan and reduce come from tests/cuda_emu/cub.
//
// Usage: compaction_emu DIR. DIR/args.txt holds "key value" lines (the keys run reads): op compact,
// partition or scatter; n mask rows (index rows for scatter); m destination rows; tensors; and per
// tensor t rb<t> (row bytes), ss<t> / ds<t> (source / destination row strides, bytes), sshift<t> /
// dshift<t> (bytes past 16-byte alignment). Inputs: DIR/keep.bin (n bytes) or DIR/index.bin
// (n int64), DIR/src<t>.bin and DIR/dst<t>.bin (the destination's contents before the call), each
// (rows - 1) * stride + rb bytes. Writes DIR/dst<t>.out, DIR/index.out (index_rows int64, compact and
// partition), DIR/count.out (int64, partition only) and DIR/plan.txt. Exit status 0; 2 on an emulator fault.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "cuda/compaction_kernels.cuh"
#include "emu_io.h"

using namespace earlyexit::cuda::compaction_kernels;
using ee_emu::Args;
using ee_emu::Buffer;
using ee_emu::read_file;

namespace {

void write(const std::string& path, const Buffer& b) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), b.size);
}

int run(const Args& a, const std::string& dir) {
  const std::string op = a.str("op");
  const int64_t n = static_cast<int64_t>(a.num("n")), m = static_cast<int64_t>(a.num("m"));
  const int tensors = static_cast<int>(a.num("tensors")), sms = static_cast<int>(a.num("sms", 132));
  const int order = static_cast<int>(a.num("order", 0));
  const bool scatter = op == "scatter", partition = op == "partition";
  if (!scatter && !partition && op != "compact") {
    std::fprintf(stderr, "unknown op %s\n", op.c_str());
    return 1;
  }
  if (scatter && tensors != 1) {
    std::fprintf(stderr, "scatter moves one tensor\n");
    return 1;
  }
  std::vector<Buffer> src(tensors), dst(tensors);
  std::vector<int64_t> rb(tensors), ss(tensors), ds(tensors);
  int64_t max_row_bytes = 0;
  for (int t = 0; t < tensors; ++t) {
    const std::string k = std::to_string(t);
    rb[t] = static_cast<int64_t>(a.num("rb" + k));
    ss[t] = static_cast<int64_t>(a.num("ss" + k));
    ds[t] = static_cast<int64_t>(a.num("ds" + k));
    src[t] = Buffer(read_file(dir + "/src" + k + ".bin"), static_cast<size_t>(a.num("sshift" + k)));
    dst[t] = Buffer(read_file(dir + "/dst" + k + ".bin"), static_cast<size_t>(a.num("dshift" + k)));
    max_row_bytes = std::max(max_row_bytes, rb[t]);
  }
  Buffer rows(read_file(dir + (scatter ? "/index.bin" : "/keep.bin")), 0);  // the launcher aligns the mask
  Buffer index, count;
  if (!scatter) index.alloc(8 * static_cast<size_t>(a.num("index_rows")));
  count.alloc(8);
  std::string plan = "empty";
  bool ok = true;
  if (n > 0) {
    const Grid grid = make_grid(n, scatter ? rb[0] : max_row_bytes, sms);
    plan = op + " grid=" + std::to_string(grid.blocks.x) + "x" + std::to_string(grid.blocks.y) +
           " rows_per_block=" + std::to_string(grid.rows_per_block) + " vec=";
    // As the launchers: groups of kMaxTensors, the first also writing the index and the count.
    for (int first = 0; ok && (first == 0 || first < tensors); first += kMaxTensors) {
      RowTable table{};
      for (int t = first; t < std::min(tensors, first + kMaxTensors); ++t) {
        add_rows(table, src[t].data(), dst[t].data(), ss[t], ds[t], rb[t]);
        plan += std::to_string(table.vec[t - first]) + ",";
      }
      if (scatter) {
        const int64_t* idx = reinterpret_cast<const int64_t*>(rows.data());
        auto body = [&] { scatter_rows_kernel(idx, n, m, table, grid.rows_per_block); };
        ok = ee_emu::grid(grid.blocks, kThreads, 0, order, body);
      } else {
        const uint8_t* keep = reinterpret_cast<const uint8_t*>(rows.data());
        int64_t* idx = reinterpret_cast<int64_t*>(index.data());
        int64_t* cnt = first == 0 && partition ? reinterpret_cast<int64_t*>(count.data()) : nullptr;  // as the ops
        auto body = [&] {
          compaction_kernel(keep, n, idx, cnt, table, grid.rows_per_block, partition, first == 0);
        };
        ok = ee_emu::grid(grid.blocks, kThreads, 0, order, body);
      }
    }
  } else {
    std::memset(count.data(), 0, 8);  // the launcher zeroes the count of an empty mask
  }
  if (!ok) {
    std::fprintf(stderr, "emulator: %s (%s)\n", ee_emu::last_error(), plan.c_str());
    return 2;
  }
  for (int t = 0; t < tensors; ++t) write(dir + "/dst" + std::to_string(t) + ".out", dst[t]);
  if (!scatter) write(dir + "/index.out", index);
  if (partition) write(dir + "/count.out", count);
  std::ofstream(dir + "/plan.txt") << plan << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return ee_emu::harness_main(argc, argv, [](auto*, const Args& a, const std::string& dir) { return run(a, dir); });
}
