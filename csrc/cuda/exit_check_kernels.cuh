// CUDA kernels of the fused exit check on raw pointers (no torch includes). Launchers: exit_check_cuda.cu.
//
// decode_kernel (N <= kDecodeMaxRows; float32, rows not 16-byte aligned, or GPUs before sm_80; the
//   fp16/bf16 tensor-core decode kernel is exit_check_mma.cuh): one launch. Grid (row groups of RG rows,
//   vocabulary slices): the row groups vary fastest, so the groups that share a weight slice are launched
//   side by side and all but the first read it from L2, not DRAM.
//   Each block keeps its RG normalized hidden rows in shared memory (rounded to the weight dtype at the
//   reference's rounding point; 1/sqrtf may differ from torch.rsqrt by an ulp) and streams its slice of
//   the head weight with 16-byte coalesced loads: one warp per vocabulary row, 32 lanes x 16 B = 512
//   contiguous bytes per step.
//   Each warp dots the row with the RG hidden rows (float32 FMA), reduces across lanes with shuffles,
//   and lane r folds logit r into row r's online statistics. Warps, then slices, are merged in a fixed
//   order: the last block of a row group to finish (atomic counter after a fence) merges every slice's
//   partial and writes the outputs, then resets its counter for the next call. No [N, V] buffer.
//   Bytes from DRAM: V*d*elt (weight, once: the groups of one slice run together) + N*d*elt per block
//   from L2.
// normalize_kernel + chunk_stats_kernel (larger N): the launcher runs cuBLAS (float32 accumulation and
//   output) on vocabulary chunks of [N, C] logits, C chosen so the chunk stays O(N * C) small, and
//   chunk_stats_kernel reduces each chunk row (one block per row) into running statistics, writing the
//   outputs on the last chunk.
// Every kernel serves exit_check and exit_stats alike (see Params): only write_result differs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "exit_check_stats.h"

namespace earlyexit {
namespace cuda {

// The block's dynamic shared memory, as bytes. The host emulator (tests/cuda_emu) defines its own.
#ifndef EE_DYNAMIC_SMEM
#define EE_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kDecodeMaxRows = 64;

// dtype of a bias / norm weight vector, which may differ from the hidden dtype.
enum VectorKind : int { kNone = 0, kF32 = 1, kF16 = 2, kBF16 = 3 };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float load_any(const void* p, int kind, int64_t i) {
  if (kind == kF32) return static_cast<const float*>(p)[i];
  if (kind == kF16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

// n consecutive elements p[i .. i + n) as floats, the dtype switch taken once (not per element).
template <int n>
__device__ __forceinline__ void load_any_n(const void* p, int kind, int64_t i, float (&out)[n]) {
  if (kind == kF32) {
#pragma unroll
    for (int e = 0; e < n; ++e) out[e] = static_cast<const float*>(p)[i + e];
  } else if (kind == kF16) {
#pragma unroll
    for (int e = 0; e < n; ++e) out[e] = __half2float(static_cast<const __half*>(p)[i + e]);
  } else {
#pragma unroll
    for (int e = 0; e < n; ++e) out[e] = __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i + e]);
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// VEC elements at ptr as floats: one 16-byte load when VEC * sizeof(T) == 16 (ptr 16-byte aligned).
// kGlobal selects the read-only global path (ld.global.nc); shared memory uses a plain load.
template <typename T, int VEC, bool kGlobal>
__device__ __forceinline__ void load_floats(const T* ptr, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = kGlobal ? __ldg(reinterpret_cast<const uint4*>(ptr)) : *reinterpret_cast<const uint4*>(ptr);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(ptr[i]);
  }
}

// Arguments shared by the kernels. Pointers are device pointers; threshold and outputs are [N].
// Two output modes: exit_check (threshold .. lse set, the rows finalized) or exit_stats (sum_exp set, the
// merged statistics written as they are, the other set null). A runtime switch in write_result rather
// than a template parameter: it is taken once per row, after the main loop, and doubles no instantiation.
template <typename T>
struct Params {
  const T* hidden;
  int64_t hidden_stride;
  const T* weight;
  int64_t weight_stride;
  const void* bias;
  int bias_kind;
  const void* norm_weight;
  int norm_kind;
  const float* threshold;
  int64_t* token;
  bool* exit;
  float *confidence, *max_prob, *margin, *entropy, *lse;
  float *max_logit, *second_logit, *sum_exp, *sum_exp_z;
  int64_t* argmax;
  bool* invalid;
  int n, d;
  int64_t v;
  float eps, temperature;
  float norm_offset;  // the RMSNorm scale is norm_offset + norm_weight (Gemma: 1)
  float softcap;      // final-logit softcapping, 0 = none (head_logit)
  int statistic;
  bool exit_above;
};

// Per (row group, slice) partial statistics of the decode kernel, struct of arrays.
struct Partials {
  float *m, *s, *t, *top1, *top2;
  int64_t* idx;
  int* bad;
};

// The outputs of row `row` from its merged statistics, in the mode p selects.
template <typename T>
__device__ __forceinline__ void write_result(const Params<T>& p, int64_t row, const RowStats& st, bool finite) {
  if (p.sum_exp != nullptr) {
    p.max_logit[row] = st.m;
    p.argmax[row] = st.idx;
    p.second_logit[row] = st.top2;
    p.sum_exp[row] = st.s;
    p.sum_exp_z[row] = st.t;
    p.invalid[row] = st.bad || !finite;
    return;
  }
  const RowResult r = finalize_stats(st, finite, p.threshold[row], p.statistic, p.exit_above);
  p.token[row] = r.token;
  p.exit[row] = r.exit;
  p.confidence[row] = r.confidence;
  p.max_prob[row] = r.max_prob;
  p.margin[row] = r.margin;
  p.entropy[row] = r.entropy;
  p.lse[row] = r.lse;
}

// One warp: RMSNorm (float32 statistics) of hidden row `row`, rounded to T into dst[0, d); returns finiteness.
template <typename T>
__device__ bool normalize_row_warp(const Params<T>& p, int64_t row, T* dst, int lane) {
  const T* h = p.hidden + row * p.hidden_stride;
  float sumsq = 0.f;
  bool ok = true;
  for (int k = lane; k < p.d; k += 32) {
    const float x = to_float(h[k]);
    sumsq += x * x;
    ok = ok && is_finite(x);
  }
  sumsq = warp_sum(sumsq);
  ok = __all_sync(0xffffffffu, ok);
  const float inv = 1.f / sqrtf(sumsq / p.d + p.eps);
  for (int k = lane; k < p.d; k += 32) {
    float x = to_float(h[k]);
    if (p.norm_kind != kNone) x = x * inv * (p.norm_offset + load_any(p.norm_weight, p.norm_kind, k));
    dst[k] = from_float<T>(x);
  }
  return ok;
}

// Merges red[base .. base + width) into red[base] by a fixed pairwise tree (width a power of two).
// Every thread of the block must call it; `j` is the caller's index within its segment.
__device__ __forceinline__ void tree_merge(RowStats* red, int base, int j, int width) {
  for (int stride = width / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (j < stride) merge_stats(red[base + j], red[base + j + stride]);
  }
  __syncthreads();
}

// The end of a decode kernel: thread r < nrows holds `mine`, its block's statistics of row row0 + r over
// this block's vocabulary slice `slice` of n_slices. Publishes them, and the last block of the row group to finish
// (atomic counter after a fence) merges every slice's partial in a fixed order and writes the outputs,
// then resets its counter for the next call. red: kBlock RowStats of shared memory, free for reuse.
template <typename T, int RG, int kBlock>
__device__ void finish_group(const Params<T>& p, const Partials& part, int* counters, RowStats* red,
                             const RowStats& mine, int group, int slice, int n_slices, int nrows,
                             const bool* row_finite) {
  static_assert(kBlock % RG == 0 && ((kBlock / RG) & (kBlock / RG - 1)) == 0, "kBlock / RG: a power of two");
  __shared__ bool is_last;
  const int64_t row0 = static_cast<int64_t>(group) * RG;
  if (threadIdx.x < nrows) {
    const int64_t slot = (static_cast<int64_t>(group) * n_slices + slice) * RG + threadIdx.x;
    part.m[slot] = mine.m;
    part.s[slot] = mine.s;
    part.t[slot] = mine.t;
    part.top1[slot] = mine.top1;
    part.top2[slot] = mine.top2;
    part.idx[slot] = mine.idx;
    part.bad[slot] = mine.bad;
  }
  // Release: the partials are visible device-wide before the counter says so.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&counters[group], 1) == n_slices - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();  // acquire side of the pattern

  // Last block: kBlock / RG threads per row each merge a fixed, strided set of slices, then a fixed
  // tree merges those; .cg loads read L2, where the other blocks' stores landed.
  constexpr int kPerRow = kBlock / RG;
  const int r = threadIdx.x / kPerRow, j = threadIdx.x % kPerRow;
  RowStats a = empty_stats();
  if (r < nrows) {
    for (int s = j; s < n_slices; s += kPerRow) {
      const int64_t slot = (static_cast<int64_t>(group) * n_slices + s) * RG + r;
      RowStats b;
      b.m = __ldcg(part.m + slot);
      b.s = __ldcg(part.s + slot);
      b.t = __ldcg(part.t + slot);
      b.top1 = __ldcg(part.top1 + slot);
      b.top2 = __ldcg(part.top2 + slot);
      b.idx = __ldcg(reinterpret_cast<const long long*>(part.idx) + slot);
      b.bad = __ldcg(part.bad + slot) != 0;
      merge_stats(a, b);
    }
  }
  red[threadIdx.x] = a;  // callers last read red before the counter's __syncthreads
  tree_merge(red, r * kPerRow, j, kPerRow);
  if (j == 0 && r < nrows) write_result(p, row0 + r, red[r * kPerRow], row_finite[r]);
  if (threadIdx.x == 0) counters[group] = 0;  // ready for the next call on this stream
}

template <typename T, int RG, int VEC>
__global__ void __launch_bounds__(kThreads)
    decode_kernel(Params<T> p, Partials part, int* __restrict__ counters, int64_t cols_per_slice) {
  EE_DYNAMIC_SMEM(smem_raw);
  T* xs = reinterpret_cast<T*>(smem_raw);  // [RG][d], the normalized rows of this group
  __shared__ RowStats red[kThreads];       // warp partials, then the last block's merge tree
  __shared__ bool row_finite[RG];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = blockIdx.x, slice = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(group) * RG;
  const int nrows = static_cast<int>(p.n - row0 < RG ? p.n - row0 : RG);
  const int d = p.d;

  // Prologue: N*d reads from L2, negligible next to the V*d weight slice.
  for (int r = warp; r < RG; r += kWarps) {
    if (r < nrows) {
      const bool ok = normalize_row_warp(p, row0 + r, xs + r * d, lane);
      if (lane == 0) row_finite[r] = ok;
    } else {
      for (int k = lane; k < d; k += 32) xs[r * d + k] = from_float<T>(0.f);
    }
  }
  __syncthreads();

  const int64_t v_begin = slice * cols_per_slice;
  const int64_t v_end = v_begin + cols_per_slice < p.v ? v_begin + cols_per_slice : p.v;
  RowStats st = empty_stats();  // lane r < nrows: statistics of row r over this warp's columns
  for (int64_t col = v_begin + warp; col < v_end; col += kWarps) {
    const T* wrow = p.weight + col * p.weight_stride;
    float acc[RG];
#pragma unroll
    for (int r = 0; r < RG; ++r) acc[r] = 0.f;
#pragma unroll 4
    for (int k = lane * VEC; k < d; k += 32 * VEC) {
      float w[VEC];
      load_floats<T, VEC, true>(wrow + k, w);
#pragma unroll
      for (int r = 0; r < RG; ++r) {
        float x[VEC];
        load_floats<T, VEC, false>(xs + r * d + k, x);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[r] = fmaf(w[e], x[e], acc[r]);
      }
    }
    float mine = 0.f;
#pragma unroll
    for (int r = 0; r < RG; ++r) {
      const float sum = warp_sum(acc[r]);
      if (lane == r) mine = sum;
    }
    if (lane < nrows) {
      if (p.bias_kind != kNone) mine += load_any(p.bias, p.bias_kind, col);
      push_logit(st, head_logit(mine, p.softcap, p.temperature), col);
    }
  }

  // Block partial: warps merged in order 0..kWarps-1 by thread r, published for row r of this slice.
  if (lane < RG) red[warp * RG + lane] = st;
  __syncthreads();
  RowStats b = empty_stats();
  if (threadIdx.x < nrows) {
    b = red[threadIdx.x];
    for (int w = 1; w < kWarps; ++w) merge_stats(b, red[w * RG + threadIdx.x]);
  }
  finish_group<T, RG, kThreads>(p, part, counters, red, b, group, slice, gridDim.y, nrows, row_finite);
}

// Larger N, step 1: one warp per row writes the normalized row (dtype T) and its finiteness.
template <typename T>
__global__ void __launch_bounds__(kThreads) normalize_kernel(Params<T> p, T* __restrict__ xn, bool* __restrict__ finite) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= p.n) return;
  const bool ok = normalize_row_warp(p, row, xn + row * p.d, threadIdx.x % 32);
  if (threadIdx.x % 32 == 0) finite[row] = ok;
}

// Larger N, step 2: one block per row of a float32 logits chunk z [rows, nc] (leading dimension ldz,
// first column = vocabulary index v0). Folds the chunk into running[row]; on the last chunk writes the
// outputs. Threads take columns j, j + kThreads, ...; their partials merge by a fixed tree.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    chunk_stats_kernel(Params<T> p, const float* __restrict__ z, int64_t ldz, int64_t nc, int64_t v0,
                       RowStats* __restrict__ running, const bool* __restrict__ finite, bool first, bool last) {
  __shared__ RowStats red[kThreads];
  const int64_t row = blockIdx.x;
  const float* zr = z + row * ldz;
  RowStats st = empty_stats();
  for (int64_t j = threadIdx.x; j < nc; j += kThreads) {
    float x = zr[j];
    if (p.bias_kind != kNone) x += load_any(p.bias, p.bias_kind, v0 + j);
    push_logit(st, head_logit(x, p.softcap, p.temperature), v0 + j);
  }
  red[threadIdx.x] = st;
  tree_merge(red, 0, threadIdx.x, kThreads);
  if (threadIdx.x != 0) return;
  RowStats a = red[0];
  if (!first) {
    RowStats prev = running[row];  // lower columns first: fixed order
    merge_stats(prev, a);
    a = prev;
  }
  if (last) {
    write_result(p, row, a, finite[row]);
  } else {
    running[row] = a;
  }
}

}  // namespace cuda
}  // namespace earlyexit
