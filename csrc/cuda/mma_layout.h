// Which lane holds what in the tensor-core decode kernel (exit_check_mma.cuh): host/device index maps, no
// CUDA types, so tests/mma_layout_harness.cpp checks them on the host against the PTX fragment layouts.
//
// mma.sync.m16n8k16 (.f16/.bf16, PTX ISA "Matrix Fragments for mma.m16n8k16"), lane = 4 group + quad:
//   A 16x16 row-major, 4 words: (row group, cols 2 quad + {0,1}), (row group + 8, same cols),
//                               (row group, cols 2 quad + 8 + {0,1}), (row group + 8, those cols)
//   B 16x8, 2 words: (k 2 quad + {0,1}, col group), (k 2 quad + 8 + {0,1}, col group)
//   C 16x8 float: c0, c1 = (row group, cols 2 quad + {0,1}); c2, c3 = (row group + 8, same cols)
// The kernel's A rows are vocabulary rows, B columns are token rows; the K order is permuted (see below).
#pragma once

#include "exit_check_stats.h"  // EE_HD

namespace earlyexit {
namespace cuda {

// K step of 64 columns: lane quad q loads two 16-byte vectors (8 elements each, 4 words) of each of its
// rows, vector e at step column mma_vector_col(q, e). 4 lanes x 16 bytes = 64 contiguous bytes per load.
EE_HD int mma_vector_col(int quad, int e) { return 8 * quad + 32 * e; }

// MMA sub-step j (0..3) of a K step takes its K slots from vector mma_sub_vector(j): fragment words
// (a0,a1)/(b0,b1) from word mma_sub_word(j, 0), (a4,a5)/(b2,b3) from word mma_sub_word(j, 1).
// Each physical column of the step lands in exactly one slot of one sub-step, for A and B alike.
EE_HD int mma_sub_vector(int j) { return j / 2; }
EE_HD int mma_sub_word(int j, int half) { return (2 * j + half) % 4; }

// Accumulator acc[mt][nt][2 h + e] of lane (group, quad) holds the logit of vocabulary row
// tile_row0 + mma_acc_row(mt, h, group) and token mma_acc_token(nt, quad, e).
EE_HD int mma_acc_row(int mt, int h, int group) { return 16 * mt + 8 * h + group; }
EE_HD int mma_acc_token(int nt, int quad, int e) { return 8 * nt + 2 * quad + e; }

// After the butterfly every lane of a quad holds the same statistics for the tokens (nt, e); lane group
// mma_owner_group(nt, e) keeps them in its running slot mma_owner_slot(nt, e).
EE_HD int mma_owner_group(int nt, int e) { return (2 * nt + e) % 8; }
EE_HD int mma_owner_slot(int nt, int e) { return (2 * nt + e) / 8; }
template <int NT>
constexpr int mma_owner_slots() {
  return (2 * NT + 7) / 8;
}

}  // namespace cuda
}  // namespace earlyexit
