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

EE_MULTIVERSION void row_dots_bf16_widen(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw,
                                         int64_t nc, float* z) {
  row_dots_impl<BF16>(x, n, d, w, ldw, nc, z);
}

namespace {
bool use_bf16_pairs() {
#ifdef EE_X86_GCC
  static const bool pairs = row_dots_bf16_pairs_available();
  return pairs;
#else
  return false;
#endif
}
}  // namespace

void row_dots_bf16(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc, float* z) {
#ifdef EE_X86_GCC
  if (use_bf16_pairs()) return row_dots_bf16_pairs(x, n, d, w, ldw, nc, z);
#endif
  row_dots_bf16_widen(x, n, d, w, ldw, nc, z);
}

int64_t row_dots_bf16_max_rows() { return use_bf16_pairs() ? INT64_MAX : kRowDotsMaxRows; }

const char* row_dots_bf16_path() { return use_bf16_pairs() ? "avx512bf16" : "widen"; }

EE_MULTIVERSION void row_dots_f16_portable(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw,
                                           int64_t nc, float* z) {
  row_dots_impl<F16>(x, n, d, w, ldw, nc, z);
}

void row_dots_f16(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc, float* z) {
#ifdef EE_X86_GCC
  static const bool f16c = row_dots_f16c_available();
  if (f16c) return row_dots_f16c(x, n, d, w, ldw, nc, z);
#endif
  row_dots_f16_portable(x, n, d, w, ldw, nc, z);
}

}  // namespace cpu
}  // namespace earlyexit
