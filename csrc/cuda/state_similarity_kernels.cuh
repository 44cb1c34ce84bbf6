// CUDA state-similarity kernel on raw pointers (no torch includes): cosine of two hidden states per row
// (state_similarity.h: the contract and the one-pass / rescue scheme), one warp per row pair, 8 rows per
// 256-thread block. Launcher: state_similarity_cuda.cu; the host emulator (tests/cuda_emu) runs the same
// kernel with the same grid.
//
// Each lane accumulates dot, hh and pp over its own elements in float32, in a fixed order (16-byte loads
// when every address, row stride and d allow it, else one element per lane per step), then the warp adds
// the lanes with an xor butterfly. Every lane ends with the same bits (float addition commutes), so the
// rescue branch is warp-uniform and the result is deterministic. Bytes per call: N * d * elt for each of h
// and p, 4 N written; no workspace, no atomics, no host synchronization (CUDA-graph capturable).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "state_similarity_math.h"

namespace earlyexit {
namespace cuda {
namespace state_kernels {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Calls f(x, y) for this lane's elements of the row pair, in a fixed order. kVec: E = 16 / sizeof(T)
// elements per 16-byte load (the caller checked that d, the strides and the pointers allow it).
template <typename T, bool kVec, typename F>
__device__ __forceinline__ void for_lane_elements(const T* __restrict__ h, const T* __restrict__ p, int64_t d,
                                                  int lane, const F& f) {
  if constexpr (kVec) {
    constexpr int E = 16 / sizeof(T);
#pragma unroll 4
    for (int64_t k = static_cast<int64_t>(lane) * E; k < d; k += 32 * E) {
      const int4 hv = __ldg(reinterpret_cast<const int4*>(h + k));
      const int4 pv = __ldg(reinterpret_cast<const int4*>(p + k));
      const T* he = reinterpret_cast<const T*>(&hv);
      const T* pe = reinterpret_cast<const T*>(&pv);
#pragma unroll
      for (int e = 0; e < E; ++e) f(to_float(he[e]), to_float(pe[e]));
    }
  } else {
#pragma unroll 4
    for (int64_t k = lane; k < d; k += 32) f(to_float(h[k]), to_float(p[k]));
  }
}

// dot, hh, pp of the row pair, summed over the warp; h scaled by sh1 then sh2, p by sp1 then sp2.
template <typename T, bool kVec, bool kScaled>
__device__ __forceinline__ void warp_sums(const T* h, const T* p, int64_t d, int lane, float sh1, float sh2,
                                          float sp1, float sp2, float& dot, float& hh, float& pp) {
  float sd = 0.f, sa = 0.f, sb = 0.f;
  for_lane_elements<T, kVec>(h, p, d, lane, [&](float x, float y) {
    if constexpr (kScaled) {
      x = x * sh1 * sh2;
      y = y * sp1 * sp2;
    }
    sd = fmaf(x, y, sd);
    sa = fmaf(x, x, sa);
    sb = fmaf(y, y, sb);
  });
  dot = warp_sum(sd);
  hh = warp_sum(sa);
  pp = warp_sum(sb);
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    state_similarity_kernel(const T* __restrict__ h, const T* __restrict__ p, float* __restrict__ out, int64_t n,
                            int64_t d, int64_t ldh, int64_t ldp) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= n) return;  // the whole warp leaves together
  const T* hr = h + row * ldh;
  const T* pr = p + row * ldp;
  float dot, hh, pp;
  warp_sums<T, kVec, false>(hr, pr, d, lane, 1.f, 1.f, 1.f, 1.f, dot, hh, pp);
  float cos;
  if (similarity::sums_safe(hh, pp)) {
    cos = similarity::cosine(dot, hh, pp);
  } else {
    // Rescue (huge, tiny, zero or non-finite rows): the largest magnitudes, then the scaled sums.
    float mh = 0.f, mp = 0.f;
    bool bad = false;
    for_lane_elements<T, kVec>(hr, pr, d, lane, [&](float x, float y) {
      bad = bad || !(fabsf(x) <= 3.4028234663852886e38f) || !(fabsf(y) <= 3.4028234663852886e38f);
      mh = fmaxf(mh, fabsf(x));
      mp = fmaxf(mp, fabsf(y));
    });
    bad = __any_sync(0xffffffffu, bad);
    mh = warp_max(mh);
    mp = warp_max(mp);
    cos = similarity::rescue(mh, mp, bad,
                             [&](float sh1, float sh2, float sp1, float sp2, float& sd, float& sa, float& sb) {
                               warp_sums<T, kVec, true>(hr, pr, d, lane, sh1, sh2, sp1, sp2, sd, sa, sb);
                             });
  }
  if (lane == 0) out[row] = cos;
}

// The launch: blocks of kThreads threads, one warp per row.
inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kRowsPerBlock - 1) / kRowsPerBlock); }

// Whether the 16-byte path may run: both row pointers, both row strides (ldh, ldp elements) and d in bytes
// are multiples of 16.
inline bool vectorizable(const void* h, const void* p, int64_t ldh, int64_t ldp, int64_t d, size_t elt) {
  const uint64_t bits = reinterpret_cast<uintptr_t>(h) | reinterpret_cast<uintptr_t>(p) |
                        static_cast<uint64_t>(ldh * elt) | static_cast<uint64_t>(ldp * elt) |
                        static_cast<uint64_t>(d * elt);
  return bits % 16 == 0;
}

}  // namespace state_kernels
}  // namespace cuda
}  // namespace earlyexit
