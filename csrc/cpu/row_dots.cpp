// Decode-regime head GEMM on CPU. See row_dots.h; the kernels are in row_dots_impl.h.
#include "cpu/row_dots.h"

#include "cpu/multiversion.h"
#include "cpu/row_dots_impl.h"

namespace earlyexit {
namespace cpu {

EE_MULTIVERSION void row_dots(const float* x, int64_t n, int64_t d, const float* w, int64_t ldw, int64_t nc,
                              float* z) {
  row_dots_impl<F32>(x, n, d, w, ldw, nc, z);
}

EE_MULTIVERSION void row_dots_bf16(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw,
                                   int64_t nc, float* z) {
  row_dots_impl<BF16>(x, n, d, w, ldw, nc, z);
}

EE_MULTIVERSION void row_dots_f16_portable(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw,
                                           int64_t nc, float* z) {
  row_dots_impl<F16>(x, n, d, w, ldw, nc, z);
}

void row_dots_f16(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc, float* z) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool f16c = row_dots_f16c_available();
  if (f16c) return row_dots_f16c(x, n, d, w, ldw, nc, z);
#endif
  row_dots_f16_portable(x, n, d, w, ldw, nc, z);
}

}  // namespace cpu
}  // namespace earlyexit
