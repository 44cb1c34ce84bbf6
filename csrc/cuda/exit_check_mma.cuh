// Tensor-core decode kernel of the fused exit check (fp16/bf16, N <= kDecodeMaxRows, sm_80+). Launcher:
// exit_check_cuda.cu. Grid: one block per vocabulary slice (about one per SM), all N rows in every block,
// so the head weight is read from DRAM exactly once and no row group re-reads it.
//
// The logits of a warp tile (16 * MT vocabulary rows x NP = 8 * NT padded token rows) are the product
// W_tile [16 MT, d] x X^T [d, NP] on mma.sync.m16n8k16 (float32 accumulation): the vocabulary is the MMA's
// M side, so N = 1 wastes MMA lanes but never bytes. Weight fragments go straight from global memory to
// registers, one 64-wide K step ahead of the MMAs that use them; the normalized rows X live in shared memory.
//
// K permutation: a dot product may sum its K terms in any order, so A and B fragments only have to agree
// on which physical column a fragment slot holds. In a 64-wide K step, lane quad q (lane % 4) owns the 16
// physical columns [8q, 8q + 8) and [32 + 8q, 40 + 8q) of its rows, loaded as two 16-byte vectors e = 0, 1
// (8 words of 2 elements). MMA sub-step j (0..3) uses words 2j and 2j+1: fragment slots (a0,a1) / (b0,b1)
// hold physical columns 32 (j / 2) + 8q + 4 (j % 2) + {0,1}, slots (a4,a5) / (b2,b3) the next two. Every
// physical column is used once, and each 16-byte load instruction of a quad reads 64 contiguous bytes of
// a row: whole 32-byte sectors, no sector fetched twice.
//
// Bytes from DRAM: V*d*elt (weight, once) + N*d*elt (hidden rows, then re-read from L2: once per block when
// they fit in shared memory, once per warp round otherwise) + O(N * blocks) partials.
//
// Index maps (which lane holds which row, column and token): mma_layout.h, checked on the host by
// tests/test_mma_layout.py.
//
// Statistics: after a tile, each (token, lane) folds its 2 * MT logits, the 8 lanes of a quad that share a
// token merge by a butterfly (bitwise the same result on every lane: merge_stats is symmetric), and one lane
// per token keeps the running statistics. Warps, then slices (finish_group), are merged in a fixed order.
#pragma once

#include <type_traits>

#include "cuda/exit_check_kernels.cuh"
#include "cuda/mma_layout.h"

namespace earlyexit {
namespace cuda {

constexpr int kMmaWarps = 16;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kMmaK = 64;  // K step: 16 elements (two 16-byte vectors, 32 columns apart) per lane

// 16 bytes at base (16-byte aligned) through the read-only path, or zeros when !ok (nothing is read).
template <typename T>
__device__ __forceinline__ uint4 load_vec(const T* base, bool ok) {
  return ok ? __ldg(reinterpret_cast<const uint4*>(base)) : make_uint4(0u, 0u, 0u, 0u);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// D += A * B on one m16n8k16 tile, float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#elif defined(EE_CUDA_EMU)
  ee_emu::mma_m16n8k16<T>(c, a0, a1, a2, a3, b0, b1);  // the host emulator's (tests/cuda_emu)
#else
  __trap();  // the launcher only selects this kernel on sm_80+
#endif
}

// Shuffles every field of a RowStats from lane ^ mask.
__device__ __forceinline__ RowStats shfl_xor_stats(const RowStats& a, int mask) {
  RowStats b;
  b.m = __shfl_xor_sync(0xffffffffu, a.m, mask);
  b.s = __shfl_xor_sync(0xffffffffu, a.s, mask);
  b.t = __shfl_xor_sync(0xffffffffu, a.t, mask);
  b.top1 = __shfl_xor_sync(0xffffffffu, a.top1, mask);
  b.top2 = __shfl_xor_sync(0xffffffffu, a.top2, mask);
  b.idx = __shfl_xor_sync(0xffffffffu, static_cast<long long>(a.idx), mask);
  b.bad = __shfl_xor_sync(0xffffffffu, static_cast<int>(a.bad), mask) != 0;
  return b;
}

// Normalized rows [0, NP) of hidden columns [c0, c0 + kc) into xs (row stride ks elements), rounded to T
// as the reference rounds the MMA operand; zeros past N and past d. 16-byte loads and stores.
template <typename T, int NP>
__device__ void stage_rows(const Params<T>& p, T* xs, int ks, int c0, int kc, const float* inv_rms) {
  const int vecs = kc / 8;
  for (int i = threadIdx.x; i < NP * vecs; i += kMmaThreads) {
    const int r = i / vecs, k = c0 + (i % vecs) * 8;
    uint4 out = make_uint4(0u, 0u, 0u, 0u);
    if (r < p.n && k < p.d) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p.hidden + r * p.hidden_stride + k));
      if (p.norm_kind == kNone) {
        out = raw;
      } else {
        const T* h = reinterpret_cast<const T*>(&raw);
        T* o = reinterpret_cast<T*>(&out);
        float g[8];
        load_any_n(p.norm_weight, p.norm_kind, k, g);
#pragma unroll
        for (int e = 0; e < 8; ++e) o[e] = from_float<T>(to_float(h[e]) * inv_rms[r] * (p.norm_offset + g[e]));
      }
    }
    *reinterpret_cast<uint4*>(xs + r * ks + (i % vecs) * 8) = out;
  }
}

// One warp tile over hidden columns [c0, c0 + kc) (staged in xs from column 0): acc += W_tile X^T.
// rows: the tile's first vocabulary row; lanes load rows rows + 16 mt + group (+ 8).
template <typename T, int NT, int MT>
__device__ __forceinline__ void tile_mma(const Params<T>& p, const T* xs, int ks, int c0, int kc, int64_t rows,
                                         float (&acc)[MT][NT][4]) {
  const int lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;
  const T* wrow[MT][2];
  bool row_ok[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t v = rows + mma_acc_row(mt, h, group);
      row_ok[mt][h] = v < p.v;
      wrow[mt][h] = p.weight + (row_ok[mt][h] ? v : 0) * p.weight_stride + c0;
    }
  }
  // [mt][h][e]: vector e of the lane's 16 columns of rows (group, group + 8) of m-tile mt, one K step.
  uint4 a[MT][2][2];
  auto load_step = [&](uint4 (&dst)[MT][2][2], int kk) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = kk + mma_vector_col(quad, e);
          dst[mt][h][e] = load_vec(wrow[mt][h] + col, row_ok[mt][h] && c0 + col < p.d);
        }
      }
    }
  };
  load_step(a, 0);
  for (int kk = 0; kk < kc; kk += kMmaK) {
    uint4 next[MT][2][2];
    if (kk + kMmaK < kc) {
      load_step(next, kk + kMmaK);  // in flight while this step's MMAs run
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const T* x = xs + (8 * nt + group) * ks + kk;  // B column `group` of token tile nt
      const uint4 b[2] = {*reinterpret_cast<const uint4*>(x + mma_vector_col(quad, 0)),
                          *reinterpret_cast<const uint4*>(x + mma_vector_col(quad, 1))};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int v = mma_sub_vector(j), w0 = mma_sub_word(j, 0), w1 = mma_sub_word(j, 1);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint4& lo = a[mt][0][v];  // row group
          const uint4& hi = a[mt][1][v];  // row group + 8
          mma_16816<T>(acc[mt][nt], word(lo, w0), word(hi, w0), word(lo, w1), word(hi, w1), word(b[v], w0),
                       word(b[v], w1));
        }
      }
    }
    if (kk + kMmaK < kc) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 2; ++e) a[mt][h][e] = next[mt][h][e];
    }
  }
}

// Folds a finished warp tile (logits without bias, rows `rows`..) into the running statistics.
template <typename T, int NT, int MT>
__device__ __forceinline__ void tile_stats(const Params<T>& p, const float (&acc)[MT][NT][4], int64_t rows,
                                           RowStats (&run)[mma_owner_slots<NT>()]) {
  const int lane = threadIdx.x % 32, group = lane / 4;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      RowStats st = empty_stats();
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t col = rows + mma_acc_row(mt, h, group);
          if (col < p.v) {
            float z = acc[mt][nt][2 * h + e];
            if (p.bias_kind != kNone) z += load_any(p.bias, p.bias_kind, col);
            push_logit(st, head_logit(z, p.softcap, p.temperature), col);
          }
        }
      }
      // The 8 lanes of this quad (lane bits 2..4) hold the same tokens: butterfly over those bits.
#pragma unroll
      for (int mask = 4; mask < 32; mask *= 2) merge_stats(st, shfl_xor_stats(st, mask));
      if (group == mma_owner_group(nt, e)) merge_stats(run[mma_owner_slot(nt, e)], st);
    }
  }
}

template <typename T, int NT, int MT>
__global__ void __launch_bounds__(kMmaThreads, 1)
    decode_mma_kernel(Params<T> p, Partials part, int* __restrict__ counters, int tiles_per_slice, int kc, int ks) {
  constexpr int NP = 8 * NT;
  constexpr int kTileRows = 16 * MT;
  // [NP][ks] staged rows; at the end reused for the warps' statistics ([kMmaWarps][NP] RowStats) and
  // finish_group's merge tree (kMmaThreads RowStats): the launcher sizes it for the largest of the three.
  EE_DYNAMIC_SMEM(smem_raw);
  T* xs = reinterpret_cast<T*>(smem_raw);
  RowStats* red = reinterpret_cast<RowStats*>(smem_raw);
  __shared__ float inv_rms[NP];
  __shared__ bool row_finite[NP];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, quad = lane % 4;

  // Prologue: RMSNorm scale and finiteness of each row (N * d reads from L2, once per block), in 16-byte
  // loads (rows are 16-byte aligned and d % 8 == 0 on this path) so few L2 round trips precede the stream.
  for (int r = warp; r < NP; r += kMmaWarps) {
    float sumsq = 0.f;
    bool ok = true;
    if (r < p.n) {
      const T* h = p.hidden + r * p.hidden_stride;
#pragma unroll 4
      for (int k = 8 * lane; k < p.d; k += 8 * 32) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(h + k));
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float x = to_float(e[i]);
          sumsq += x * x;
          ok = ok && is_finite(x);
        }
      }
    }
    sumsq = warp_sum(sumsq);
    ok = __all_sync(0xffffffffu, ok);
    if (lane == 0) {
      inv_rms[r] = 1.f / sqrtf(sumsq / p.d + p.eps);
      row_finite[r] = ok;
    }
  }
  __syncthreads();

  const bool resident = kc >= p.d;  // every column staged once, before the first tile
  if (resident) {
    stage_rows<T, NP>(p, xs, ks, 0, kc, inv_rms);
    __syncthreads();
  }
  const int64_t total_tiles = (p.v + kTileRows - 1) / kTileRows;
  const int64_t first_tile = static_cast<int64_t>(blockIdx.x) * tiles_per_slice;
  const int my_tiles = static_cast<int>(min(static_cast<int64_t>(tiles_per_slice), total_tiles - first_tile));

  RowStats run[mma_owner_slots<NT>()];
#pragma unroll
  for (int i = 0; i < mma_owner_slots<NT>(); ++i) run[i] = empty_stats();
  // Rounds of kMmaWarps warp tiles; warp w takes tile round + w. Every warp joins every round's barriers.
  for (int round = 0; round < my_tiles; round += kMmaWarps) {
    const bool active = round + warp < my_tiles;
    const int64_t rows = (first_tile + round + warp) * kTileRows;
    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
    for (int c0 = 0; c0 < p.d; c0 += kc) {
      if (!resident) {
        __syncthreads();  // every warp is done with the previous chunk
        stage_rows<T, NP>(p, xs, ks, c0, kc, inv_rms);
        __syncthreads();
      }
      if (active) tile_mma<T, NT, MT>(p, xs, ks, c0, min(kc, p.d - c0), rows, acc);
    }
    if (active) tile_stats<T, NT, MT>(p, acc, rows, run);
  }

  // Warp statistics to shared memory (token t of warp w at red[w * NP + t]), then thread t < N merges
  // the warps in order 0..kMmaWarps-1.
  __syncthreads();  // xs is dead: reuse it
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (group == mma_owner_group(nt, e)) red[warp * NP + mma_acc_token(nt, quad, e)] = run[mma_owner_slot(nt, e)];
    }
  }
  __syncthreads();
  RowStats mine = empty_stats();
  if (threadIdx.x < p.n) {
    mine = red[threadIdx.x];
    for (int w = 1; w < kMmaWarps; ++w) merge_stats(mine, red[w * NP + threadIdx.x]);
  }
  finish_group<T, NP, kMmaThreads>(p, part, counters, red, mine, 0, blockIdx.x, gridDim.x, p.n < NP ? p.n : NP,
                                   row_finite);
}

}  // namespace cuda
}  // namespace earlyexit
