// EE_MULTIVERSION: compile a hot CPU function once per x86-64 ISA level (AVX-512, AVX2, baseline) and let
// the loader pick the clone for the running CPU (GCC target_clones / ifunc). Elsewhere: one plain build.
// EE_X86_GCC: defined where that holds (x86-64, GCC): there the per-ISA files (row_dots_f16c.cpp,
// row_dots_avx512bf16.cpp) are compiled and their entry points exist.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EE_X86_GCC 1
#define EE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EE_MULTIVERSION
#endif
