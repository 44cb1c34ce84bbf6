// Host harness for csrc/exit_check_stats.h (the online statistics the CUDA kernels run), loaded by
// tests/test_stats_header.py through ctypes: builds in a second with a plain C++ compiler, no torch.
#include <cstdint>

#include "exit_check_stats.h"

using earlyexit::RowStats;

namespace {

// Folds z[order[0..n)] (columns in the given order, as interleaved warps see them) into `parts`
// partials (element i goes to partial i % parts) and merges the partials in order.
RowStats merged(const float* z, const int64_t* order, int64_t n, int parts) {
  RowStats acc[64];
  for (int p = 0; p < parts; ++p) acc[p] = earlyexit::empty_stats();
  for (int64_t i = 0; i < n; ++i) earlyexit::push_logit(acc[i % parts], z[order[i]], order[i]);
  for (int p = 1; p < parts; ++p) earlyexit::merge_stats(acc[0], acc[p]);
  return acc[0];
}

}  // namespace

// The merged statistics as exit_stats writes them: stats = (max_logit, second_logit, sum_exp, sum_exp_z),
// then argmax and invalid.
extern "C" void fold_stats(const float* z, const int64_t* order, int64_t n, int parts, float* stats, int64_t* argmax,
                           bool* invalid) {
  const RowStats st = merged(z, order, n, parts);
  stats[0] = st.m;
  stats[1] = st.top2;
  stats[2] = st.s;
  stats[3] = st.t;
  *argmax = st.idx;
  *invalid = st.bad;
}

// The merged statistics finalized for the measure (statistic code, exit direction) at threshold.
// out: token, then confidence, max_prob, margin, entropy, lse, exit (as floats).
extern "C" void fold(const float* z, const int64_t* order, int64_t n, int parts, int statistic, bool exit_above,
                     float threshold, float* out) {
  const earlyexit::RowResult r =
      earlyexit::finalize_stats(merged(z, order, n, parts), true, threshold, statistic, exit_above);
  const float vals[7] = {static_cast<float>(r.token), r.confidence, r.max_prob, r.margin, r.entropy, r.lse,
                         r.exit ? 1.f : 0.f};
  for (int k = 0; k < 7; ++k) out[k] = vals[k];
}
