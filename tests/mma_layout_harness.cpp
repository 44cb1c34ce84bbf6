// Host emulation of the tensor-core decode kernel's data movement (csrc/cuda/exit_check_mma.cuh) with the
// index maps of csrc/cuda/mma_layout.h, against an independent transcription of the PTX m16n8k16 fragment
// layouts. For every MT, NT, d and V below, each warp tile's accumulators must equal the direct dot products
// of the vocabulary rows and tokens the layout says they hold, with the hidden rows resident or staged in
// 64-column chunks; and every token must be kept by exactly one lane. Prints "ok" or the first failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "cuda/mma_layout.h"

using namespace earlyexit::cuda;

namespace {

struct Word {
  double x[2];  // low half (lower column), high half
};
struct Vec {
  Word w[4];  // one 16-byte vector of 8 elements
};

// D += A B for one warp, from the 32 lanes' fragment words (PTX ISA layouts, transcribed independently).
void mma_16816(double (&c)[32][4], const Word (&a)[32][4], const Word (&b)[32][2]) {
  double A[16][16] = {}, B[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * t + e] = a[lane][0].x[e];
      A[g + 8][2 * t + e] = a[lane][1].x[e];
      A[g][2 * t + 8 + e] = a[lane][2].x[e];
      A[g + 8][2 * t + 8 + e] = a[lane][3].x[e];
      B[2 * t + e][g] = b[lane][0].x[e];
      B[2 * t + 8 + e][g] = b[lane][1].x[e];
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 2; ++e) {
      for (int k = 0; k < 16; ++k) {
        c[lane][e] += A[g][k] * B[k][2 * t + e];
        c[lane][2 + e] += A[g + 8][k] * B[k][2 * t + e];
      }
    }
  }
}

Vec load(const std::vector<double>& src, long offset, bool ok) {
  Vec v{};
  if (ok)
    for (int i = 0; i < 8; ++i) v.w[i / 2].x[i % 2] = src[offset + i];
  return v;
}

// One warp tile (rows row0..) over all of d, as tile_mma runs it; returns false on a wrong accumulator.
bool check_tile(int MT, int NT, int d, int V, long row0, int kc_full, const std::vector<double>& W,
                const std::vector<double>& X) {
  const int NP = 8 * NT;
  std::vector<double> acc(32 * MT * NT * 4, 0.0);
  auto ACC = [&](int lane, int mt, int nt, int i) -> double& { return acc[((lane * MT + mt) * NT + nt) * 4 + i]; };
  for (int c0 = 0; c0 < d; c0 += kc_full) {
    const int ks = kc_full + 32;  // staged chunk: zeros past d
    std::vector<double> xs(NP * ks, 0.0);
    for (int r = 0; r < NP; ++r)
      for (int k = 0; k < kc_full && c0 + k < d; ++k) xs[r * ks + k] = X[r * d + c0 + k];
    const int kc = std::min(kc_full, d - c0);
    for (int kk = 0; kk < kc; kk += 64) {
      std::vector<Vec> a(32 * MT * 2 * 2);
      auto A = [&](int lane, int mt, int h, int e) -> Vec& { return a[((lane * MT + mt) * 2 + h) * 2 + e]; };
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, q = lane % 4;
        for (int mt = 0; mt < MT; ++mt)
          for (int h = 0; h < 2; ++h)
            for (int e = 0; e < 2; ++e) {
              const long v = row0 + mma_acc_row(mt, h, g);
              const int col = kk + mma_vector_col(q, e);
              A(lane, mt, h, e) = load(W, v * d + c0 + col, v < V && c0 + col < d);
            }
      }
      for (int nt = 0; nt < NT; ++nt) {
        Vec b[32][2];
        for (int lane = 0; lane < 32; ++lane)
          for (int e = 0; e < 2; ++e)
            b[lane][e] = load(xs, (8 * nt + lane / 4) * ks + kk + mma_vector_col(lane % 4, e), true);
        for (int j = 0; j < 4; ++j) {
          const int v = mma_sub_vector(j), w0 = mma_sub_word(j, 0), w1 = mma_sub_word(j, 1);
          for (int mt = 0; mt < MT; ++mt) {
            Word fa[32][4], fb[32][2];
            double c[32][4];
            for (int lane = 0; lane < 32; ++lane) {
              const Vec &lo = A(lane, mt, 0, v), &hi = A(lane, mt, 1, v);
              fa[lane][0] = lo.w[w0];
              fa[lane][1] = hi.w[w0];
              fa[lane][2] = lo.w[w1];
              fa[lane][3] = hi.w[w1];
              fb[lane][0] = b[lane][v].w[w0];
              fb[lane][1] = b[lane][v].w[w1];
              for (int i = 0; i < 4; ++i) c[lane][i] = ACC(lane, mt, nt, i);
            }
            mma_16816(c, fa, fb);
            for (int lane = 0; lane < 32; ++lane)
              for (int i = 0; i < 4; ++i) ACC(lane, mt, nt, i) = c[lane][i];
          }
        }
      }
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, q = lane % 4;
    for (int mt = 0; mt < MT; ++mt)
      for (int nt = 0; nt < NT; ++nt)
        for (int h = 0; h < 2; ++h)
          for (int e = 0; e < 2; ++e) {
            const long col = row0 + mma_acc_row(mt, h, g);
            if (col >= V) continue;
            const int token = mma_acc_token(nt, q, e);
            double want = 0;
            for (int k = 0; k < d; ++k) want += W[col * d + k] * X[token * d + k];
            if (std::fabs(want - ACC(lane, mt, nt, 2 * h + e)) > 1e-9) return false;
          }
  }
  return true;
}

template <int NT>
bool check_owners() {
  std::vector<int> count(8 * NT, 0);
  for (int lane = 0; lane < 32; ++lane)
    for (int nt = 0; nt < NT; ++nt)
      for (int e = 0; e < 2; ++e)
        if (lane / 4 == mma_owner_group(nt, e)) {
          if (mma_owner_slot(nt, e) >= mma_owner_slots<NT>()) return false;
          ++count[mma_acc_token(nt, lane % 4, e)];
        }
  return std::all_of(count.begin(), count.end(), [](int c) { return c == 1; });
}

}  // namespace

int main() {
  unsigned seed = 1;
  auto next = [&seed](int m) { return static_cast<int>((seed = seed * 1103515245u + 12345u) >> 16) % m; };
  for (int MT : {1, 2})
    for (int NT : {1, 2, 4, 8})
      for (int d : {8, 64, 72, 120, 200, 256})
        for (int V : {5, 16, 37, 64}) {
          std::vector<double> W(static_cast<size_t>(V) * d), X(static_cast<size_t>(8 * NT) * d);
          for (auto& w : W) w = next(7) - 3;
          for (auto& x : X) x = next(5) - 2;
          for (long row0 = 0; row0 < V; row0 += 16 * MT)
            for (int kc : {64, (d + 63) / 64 * 64})  // K chunks of 64, and resident rows
              if (!check_tile(MT, NT, d, V, row0, kc, W, X)) {
                std::printf("wrong accumulator: MT=%d NT=%d d=%d V=%d row0=%ld kc=%d\n", MT, NT, d, V, row0, kc);
                return 1;
              }
        }
  if (!(check_owners<1>() && check_owners<2>() && check_owners<4>() && check_owners<8>())) {
    std::printf("a token is kept by no lane or by two\n");
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
