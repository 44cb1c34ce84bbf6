// The emulator's __nv_bfloat16 (tests/cuda_emu/cuda_emu.h): the upper 16 bits of a float32,
// round-to-nearest-even conversion.
#pragma once

#include "cuda_emu.h"

struct __nv_bfloat16 {
  uint16_t x;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};  // NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(x >> 16)};
}

namespace ee_emu {
template <>
inline float element_to_float<__nv_bfloat16>(uint16_t bits) {
  return __bfloat162float(__nv_bfloat16{bits});
}
}  // namespace ee_emu
