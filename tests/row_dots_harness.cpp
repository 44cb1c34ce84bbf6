// C entry points to csrc/cpu/row_dots.cpp for tests/test_row_dots.py (ctypes; no torch).
#include "cpu/row_dots.h"

extern "C" {
void rd_f32(const float* x, int64_t n, int64_t d, const float* w, int64_t ldw, int64_t nc, float* z) {
  earlyexit::cpu::row_dots(x, n, d, w, ldw, nc, z);
}
void rd_bf16(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc, float* z) {
  earlyexit::cpu::row_dots_bf16(x, n, d, w, ldw, nc, z);
}
void rd_bf16_widen(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc, float* z) {
  earlyexit::cpu::row_dots_bf16_widen(x, n, d, w, ldw, nc, z);
}
#ifdef EE_X86_GCC
int rd_bf16_pairs_available() { return earlyexit::cpu::row_dots_bf16_pairs_available(); }
void rd_bf16_pairs(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc, float* z) {
  earlyexit::cpu::row_dots_bf16_pairs(x, n, d, w, ldw, nc, z);
}
#endif
void rd_f16(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc, float* z) {
  earlyexit::cpu::row_dots_f16(x, n, d, w, ldw, nc, z);
}
void rd_f16_portable(const float* x, int64_t n, int64_t d, const uint16_t* w, int64_t ldw, int64_t nc, float* z) {
  earlyexit::cpu::row_dots_f16_portable(x, n, d, w, ldw, nc, z);
}
}
