// row_dots for float16 weights through the F16C conversion instruction (one vcvtph2ps per 8 weights
// instead of about a dozen integer/float operations). The whole file is compiled for AVX2 + FMA + F16C
// (the templates of row_dots_impl.h included below too); row_dots_f16 calls it only on CPUs that have
// them. GCC cannot use F16C in a target_clones function's baseline clone, hence a file of its own.
#include "cpu/multiversion.h"

#ifdef EE_X86_GCC
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "cpu/row_dots.h"
#include "cpu/row_dots_impl.h"

namespace earlyexit {
namespace cpu {
namespace {

struct F16C {
  using elem = uint16_t;
  static void load8(const uint16_t* p, Vec8& v) {
    const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    std::memcpy(&v, &f, sizeof(v));
  }
  static float load1(const uint16_t* p) { return _cvtsh_ss(*p); }
};

}  // namespace

bool row_dots_f16c_available() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

void row_dots_f16c(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc, float* z) {
  row_dots_impl<F16C>(x, n, d, w, ldw, nc, z);
}

}  // namespace cpu
}  // namespace earlyexit
#endif
