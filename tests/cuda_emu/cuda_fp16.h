// The emulator's __half (tests/cuda_emu/cuda_emu.h): IEEE binary16 bits, round-to-nearest-even conversion.
#pragma once

#include "cuda_emu.h"

struct __half {
  uint16_t x;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  const uint32_t exp = (h.x >> 10) & 0x1fu, mant = h.x & 0x3ffu;
  float f;
  if (exp == 0x1fu) {
    const uint32_t bits = sign | 0x7f800000u | (mant << 13);
    std::memcpy(&f, &bits, 4);
  } else if (exp == 0) {
    f = std::ldexp(static_cast<float>(mant), -24);  // zero or subnormal: mant * 2^-24, exact
    if (sign) f = -f;
  } else {
    const uint32_t bits = sign | ((exp + 112u) << 23) | (mant << 13);
    std::memcpy(&f, &bits, 4);
  }
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (ax >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: a multiple of 2^-24, rounded to nearest even (exact scaling)
    float a;
    std::memcpy(&a, &ax, 4);
    return __half{static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f)))};
  }
  uint32_t h = ((((ax >> 23) - 112u) << 10) | ((ax & 0x7fffffu) >> 13));
  const uint32_t rest = ax & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is still right
  return __half{static_cast<uint16_t>(sign | h)};
}

namespace ee_emu {
template <>
inline float element_to_float<__half>(uint16_t bits) {
  return __half2float(__half{bits});
}
}  // namespace ee_emu
