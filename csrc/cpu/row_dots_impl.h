// The row_dots kernels as templates over the weight format, shared by row_dots.cpp (multiversioned
// entry points) and row_dots_f16c.cpp (compiled for F16C). Everything here has internal linkage, so each
// file gets its own copy, compiled for that file's target: no instantiation can be merged across targets.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace earlyexit {
namespace cpu {
namespace {

// One AVX2 register (two SSE ones on baseline x86-64); AVX-512 gains nothing in a memory-bound loop.
// GCC vector types keep the R accumulators in registers, which plain arrays did not (they spilled).
typedef float Vec8 __attribute__((vector_size(32)));
typedef uint16_t U16x8 __attribute__((vector_size(16)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));
constexpr int kLanes = 8;

// Each weight load also prefetches a line at least this far ahead: without it the loops leave too few
// reads in flight to stream the weight from memory at its rate (benchmarks/results/cpu_exit_check.md,
// 2026-12-02).
constexpr int64_t kPrefetchBytes = 8192;

// The prefetch distance for J weight rows read side by side, `span` = J * ldw * element bytes apart
// per group: kPrefetchBytes rounded up to whole groups, so that a row's prefetch lands on the line the
// same row of a later group reads (the rows of a chunk are one stream when ldw == d), never on a line
// of the group being read. A span of 0 (a broadcast weight, row stride 0) reads one line over and over.
inline int64_t prefetch_ahead(int64_t span) {
  return span > 0 ? (kPrefetchBytes + span - 1) / span * span : kPrefetchBytes;
}

// Weight element formats (load8: 8 elements as float32 into v; load1: one): the weight streams from memory in its own dtype (2 bytes for bf16/fp16, half
// the traffic of an upcast copy) and is widened to float32 in registers; the widening is exact.
struct F32 {
  using elem = float;
  static void load8(const float* p, Vec8& v) { std::memcpy(&v, p, sizeof(v)); }  // unaligned load
  static float load1(const float* p) { return *p; }
};
struct BF16 {  // bfloat16 bits: the high half of a float32
  using elem = uint16_t;
  static void load8(const uint16_t* p, Vec8& v) {
    U16x8 u;
    std::memcpy(&u, p, sizeof(u));
    const U32x8 bits = __builtin_convertvector(u, U32x8) << 16;
    std::memcpy(&v, &bits, sizeof(v));
  }
  static float load1(const uint16_t* p) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
};
struct F16 {  // IEEE half, widened with integer and float vector ops (GCC 12 scalarizes a _Float16 vector
              // conversion, and a per-clone F16C intrinsic is not allowed in the baseline clone)
  using elem = uint16_t;
  static void load8(const uint16_t* p, Vec8& v) {
    U16x8 u;
    std::memcpy(&u, p, sizeof(u));
    const U32x8 h = __builtin_convertvector(u, U32x8);
    const U32x8 exp_mask = U32x8{} + (0x7c00u << 13);
    U32x8 o = (h & 0x7fffu) << 13;  // exponent and mantissa in float32 position
    const U32x8 e = o & exp_mask;
    o += (127u - 15u) << 23;  // rebias the exponent
    o += static_cast<U32x8>(e == exp_mask) & ((128u - 16u) << 23);  // Inf/NaN: exponent all ones
    // Zeros and subnormals: renormalize through a float subtraction of 2^-14. Both operands are normal
    // floats, so this stays exact under flush-denormal (DAZ) mode too, unlike a 2^112 rescale.
    U32x8 sub = o + (1u << 23);
    Vec8 subf;
    std::memcpy(&subf, &sub, sizeof(subf));
    subf -= 0x1p-14f;
    std::memcpy(&sub, &subf, sizeof(sub));
    const U32x8 tiny = static_cast<U32x8>(e == 0);
    o = (sub & tiny) | (o & ~tiny);
    o |= (h & 0x8000u) << 16;  // sign
    std::memcpy(&v, &o, sizeof(v));
  }
  static float load1(const uint16_t* p) {
    _Float16 h;
    std::memcpy(&h, p, sizeof(h));
    return static_cast<float>(h);
  }
};

// R x rows (R <= 8) against J consecutive weight rows w, w + ldw, ...; writes out[r * out_stride + j].
// J > 1 for few x rows: J * R independent accumulators keep the FMA latency chain and the memory stream of
// one weight row from bounding the loop (a single row's dot is a chain of dependent FMAs).
template <typename W, int R, int J>
__attribute__((always_inline)) inline void dot_group(const float* x, int64_t d, const typename W::elem* w,
                                                     int64_t ldw, float* out, int64_t out_stride) {
  Vec8 acc[J][R];
#pragma GCC unroll 8
  for (int j = 0; j < J; ++j) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[j][r] = Vec8{};
  }
  const int64_t body = d - d % kLanes;
  const int64_t ahead = prefetch_ahead(J * ldw * static_cast<int64_t>(sizeof(typename W::elem)));
  for (int64_t k = 0; k < body; k += kLanes) {
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
      Vec8 wv, xv;  // loaded through out-parameters: no function returns a Vec8 (psABI)
      W::load8(w + j * ldw + k, wv);
      __builtin_prefetch(reinterpret_cast<const char*>(w + j * ldw + k) + ahead);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        std::memcpy(&xv, x + r * d + k, sizeof(xv));
        acc[j][r] += wv * xv;
      }
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < J; ++j) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t k = body; k < d; ++k) s += W::load1(w + j * ldw + k) * x[r * d + k];
      for (int l = 0; l < kLanes; ++l) s += acc[j][r][l];
      out[r * out_stride + j] = s;
    }
  }
}

template <typename W, int R>
__attribute__((always_inline)) inline void dot_rows_fixed(const float* x, int64_t d, const typename W::elem* w,
                                                          int64_t ldw, int64_t nc, float* z) {
  constexpr int J = R == 1 ? 4 : (R <= 3 ? 2 : 1);  // J * R <= 6 accumulators: they stay in registers
  int64_t j = 0;
  for (; j + J <= nc; j += J) dot_group<W, R, J>(x, d, w + j * ldw, ldw, z + j, nc);
  for (; j < nc; ++j) dot_group<W, R, 1>(x, d, w + j * ldw, ldw, z + j, nc);
}

// Calls rows(std::integral_constant<int, R>{}, r0) for each group of 8 rows from r0 = 0, then once for the
// remaining R < 8 rows: a fixed-size kernel instantiation per R. Each group re-reads the weight chunk,
// which is why the widening path stops at kRowDotsMaxRows.
template <typename Rows>
__attribute__((always_inline)) inline void for_row_groups(int64_t n, const Rows& rows) {
  int64_t r0 = 0;
  for (; r0 + 8 <= n; r0 += 8) rows(std::integral_constant<int, 8>{}, r0);
  switch (n - r0) {
    case 7: rows(std::integral_constant<int, 7>{}, r0); break;
    case 6: rows(std::integral_constant<int, 6>{}, r0); break;
    case 5: rows(std::integral_constant<int, 5>{}, r0); break;
    case 4: rows(std::integral_constant<int, 4>{}, r0); break;
    case 3: rows(std::integral_constant<int, 3>{}, r0); break;
    case 2: rows(std::integral_constant<int, 2>{}, r0); break;
    case 1: rows(std::integral_constant<int, 1>{}, r0); break;
    default: break;
  }
}

template <typename W>
__attribute__((always_inline)) inline void row_dots_impl(const float* x, int64_t n, int64_t d,
                                                         const typename W::elem* w, int64_t ldw, int64_t nc,
                                                         float* z) {
  for_row_groups(n, [&](auto rows, int64_t r0) {
    dot_rows_fixed<W, decltype(rows)::value>(x + r0 * d, d, w, ldw, nc, z + r0 * nc);
  });
}

}  // namespace
}  // namespace cpu
}  // namespace earlyexit
