// Launch configurations of the CUDA exit-check kernels, as plain functions of the shape and the device's
// limits (no torch, no CUDA runtime). exit_check_cuda.cu launches from them, and the host emulator
// (tests/cuda_emu) launches the same kernels from the same plans, so both run the grids a GPU runs.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "exit_check_stats.h"

namespace earlyexit {
namespace cuda {

// FMA decode kernel (decode_kernel): RG rows per group, the vocabulary cut into `slices` of `cols` rows.
struct DecodePlan {
  int rg = 0;  // 0: the hidden rows do not fit in shared memory (d too large for this path)
  bool vec = false;  // 16-byte weight loads
  int groups = 0;
  int64_t slices = 0, cols = 0;
  size_t smem = 0;  // dynamic shared memory per block (bytes)
};

// The FMA decode kernel's 16-byte weight loads of elt-byte elements: d, the weight row stride (elements)
// and the weight address allow them.
inline bool decode_vec_ok(const void* weight, int64_t weight_stride, int d, size_t elt) {
  const int64_t per_load = static_cast<int64_t>(16 / elt);
  return d % per_load == 0 && weight_stride % per_load == 0 && reinterpret_cast<uintptr_t>(weight) % 16 == 0;
}

// The tensor-core decode kernel's layout condition for 16-bit rows: d a multiple of 8, and the hidden and
// weight rows 16-byte aligned (address and row stride in elements). The launcher adds the device's.
inline bool mma_layout_ok(const void* hidden, int64_t hidden_stride, const void* weight, int64_t weight_stride,
                          int d) {
  const auto aligned = [](const void* ptr, int64_t stride) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && stride % 8 == 0;
  };
  return d % 8 == 0 && aligned(hidden, hidden_stride) && aligned(weight, weight_stride);
}

// RG is the smallest power of two >= N, at most 8, halved until RG rows of d elements fit in `budget`: the
// dynamic shared memory the kernel may use (the opt-in limit less its static arrays, as the runtime reports
// them for the RG = 8 instantiation, whose static arrays are the largest). Slices: enough blocks to fill
// every SM a few times over, but at least `warps` columns per slice and no empty slice.
// vec_ok: decode_vec_ok for the weight.
inline DecodePlan decode_plan(int n, int d, int64_t v, size_t elt, bool vec_ok, int sms, size_t budget, int warps) {
  DecodePlan plan;
  int rg = n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : 8;
  while (rg > 1 && static_cast<size_t>(rg) * d * elt > budget) rg /= 2;
  if (static_cast<size_t>(rg) * d * elt > budget) return plan;
  plan.rg = rg;
  plan.vec = vec_ok;
  plan.smem = static_cast<size_t>(rg) * d * elt;
  plan.groups = (n + rg - 1) / rg;
  int64_t slices = std::max<int64_t>(1, std::min<int64_t>((4 * sms + plan.groups - 1) / plan.groups, v / warps));
  plan.cols = (v + slices - 1) / slices;
  plan.slices = (v + plan.cols - 1) / plan.cols;
  return plan;
}

// Tensor-core decode kernel (decode_mma_kernel<T, NT, MT>): NT token tiles of 8 rows (the smallest power of
// two covering N), MT m-tiles of 16 vocabulary rows per warp tile: 2 while the accumulators are small, so
// each warp keeps 4 KB of weight loads in flight (the register budget is 128 per thread at 512 threads).
// The launchers instantiate exactly these (NT, MT) pairs.
struct MmaTiles {
  int nt, mt;
};
inline MmaTiles mma_tiles(int n) {
  if (n <= 8) return {1, 2};
  if (n <= 16) return {2, 2};
  if (n <= 32) return {4, 1};
  return {8, 1};
}

struct MmaPlan {
  int64_t kc = 0;  // hidden columns staged per chunk (>= d padded to k_step: resident); 0 = does not fit
  int64_t ks = 0;  // row stride of the staged rows (elements)
  size_t smem = 0;
  int64_t per_slice = 0, slices = 0;  // warp tiles per block, blocks
};

// budget: dynamic shared memory the kernel may use (opt-in limit less its static arrays). One block per
// SM, contiguous runs of warp tiles per block. The staged rows' stride is kc + 32 elements, 64 bytes
// past a multiple of 128, so the 8 lanes of a 16-byte shared load phase (2 rows x 4 quads, 64 contiguous
// bytes per row) hit distinct banks; when all rows do not fit they are staged in K chunks of kc columns.
inline MmaPlan mma_plan(MmaTiles tiles, int d, int64_t v, size_t elt, int sms, int64_t budget, int k_step,
                        int warps, int threads) {
  MmaPlan plan;
  const int64_t np = 8 * tiles.nt;
  const int64_t e = static_cast<int64_t>(elt);
  int64_t kc = (d + k_step - 1) / k_step * k_step;
  if (np * (kc + 32) * e > budget) kc = (budget / (np * e) - 32) / k_step * k_step;
  if (kc < k_step) return plan;
  plan.kc = kc;
  plan.ks = kc + 32;
  const int64_t stats = sizeof(RowStats);
  plan.smem = static_cast<size_t>(std::max<int64_t>({np * plan.ks * e, int64_t{warps} * np * stats, threads * stats}));
  const int64_t n_tiles = (v + 16 * tiles.mt - 1) / (16 * tiles.mt);
  plan.per_slice = (n_tiles + sms - 1) / sms;
  plan.slices = (n_tiles + plan.per_slice - 1) / plan.per_slice;
  return plan;
}

// Larger N (the cuBLAS chunk loop): vocabulary columns per chunk, so an [N, C] float32 chunk of logits
// stays about 16 MiB (re-read from L2, not DRAM).
inline int64_t chunk_columns(int64_t n, int64_t v) {
  return std::min(v, std::max<int64_t>((int64_t{4} << 20) / n / 128 * 128, 128));
}

}  // namespace cuda
}  // namespace earlyexit
