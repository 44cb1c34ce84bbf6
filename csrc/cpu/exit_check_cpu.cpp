// CPU fused exit check: RMSNorm prologue, head GEMM on cache-sized vocabulary chunks, statistics fused
// on each chunk while it is hot, fixed-order merge; then exit_check finalizes each row and exit_stats
// writes its merged statistics.
//
// Work is split into tasks (row block x vocabulary chunk) run by at::parallel_for. Each task computes the
// chunk's logits into a per-thread [rows, chunk] float32 buffer of ~256 KiB that stays in L2 (row_dots.cpp
// for up to 8 rows, where the GEMM is memory-bound, and for any number of rows of a bf16 head on CPUs with
// AVX512-BF16; otherwise the optimized BLAS GEMM through at::mm_out, which inside a parallel region runs on
// the calling thread), then reduces each row of it to RowStats (chunk_stats.cpp). Bytes moved from memory
// per call: V*d*elt for the weight (read once per row block; one row block up to kRowBlock rows), N*d*4 for
// the normalized rows; the logits never leave the cache. row_dots reads a bf16/fp16 weight in its own
// dtype; the GEMM path upcasts each bf16/fp16 weight chunk first. Extra memory: per thread rows*chunk
// floats (+ chunk*d floats for that upcast), plus N * n_chunks RowStats for the partials.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/chunk_stats.h"
#include "cpu/row_dots.h"
#include "exit_check.h"
#include "exit_check_stats.h"

namespace earlyexit {
namespace {

// Row block: the GEMM reads the weight once per block, so blocks are large; 128 rows x 512 columns
// of float32 logits is 256 KiB, half an L2.
constexpr int64_t kRowBlock = 128;
constexpr int64_t kChunkBytes = 256 * 1024;

// Columns per chunk: about kChunkBytes of logits, a multiple of 64, between 256 and 8192.
int64_t chunk_columns(int64_t rows) {
  const int64_t c = kChunkBytes / (4 * std::max<int64_t>(rows, 1));
  return std::clamp<int64_t>(c / 64 * 64, 256, 8192);
}

// Prologue: x[i] = round_to_weight_dtype(rmsnorm(hidden[i])) as float32, finite[i] = hidden row is finite.
// N * d work; the normalization matches LlamaRMSNorm (float32 statistics, x * rsqrt(mean(x^2) + eps) * w),
// with w = norm_offset + norm_weight in float32 (Gemma's 1 + w).
template <typename scalar_t>
void normalize_rows(const ExitArgs& a, float* x, uint8_t* finite) {
  const int64_t n = a.hidden.size(0), d = a.hidden.size(1), row_stride = a.hidden.stride(0);
  const scalar_t* h = a.hidden.const_data_ptr<scalar_t>();
  const c10::NoGradGuard no_grad;  // nw below is a kernel temporary, never part of a graph
  at::Tensor nw;
  if (a.norm_weight) {
    nw = a.norm_weight->to(at::kFloat).contiguous();
    if (a.norm_offset != 0) nw = nw + a.norm_offset;  // float32 + float32, as the reference adds them
  }
  const float* g = a.norm_weight ? nw.const_data_ptr<float>() : nullptr;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* hr = h + i * row_stride;
      float* xr = x + i * d;
      bool ok = true;
      double sumsq = 0.0;
      for (int64_t k = 0; k < d; ++k) {
        const float v = static_cast<float>(hr[k]);
        ok = ok && std::isfinite(v);
        sumsq += static_cast<double>(v) * v;
        xr[k] = v;
      }
      finite[i] = ok;
      if (g) {
        // Rounded to float32 before the mean, as the reference and the GPU kernels sum: beyond the float
        // range the sum is inf and the row normalizes to zeros there too, not to a finite row here.
        const float inv = 1.f / std::sqrt(static_cast<float>(sumsq) / static_cast<float>(d) + static_cast<float>(a.eps));
        for (int64_t k = 0; k < d; ++k) xr[k] = static_cast<float>(static_cast<scalar_t>(xr[k] * inv * g[k]));
      }
    }
  });
}

// Merged statistics of every row, handed to write(row, stats, hidden row finite) in parallel.
template <typename Write>
void row_stats(const ExitArgs& a, const Write& write) {
  const int64_t n = a.hidden.size(0), d = a.hidden.size(1), v = a.weight.size(0);
  if (n == 0) return;
  at::Tensor x = at::empty({n, d}, a.hidden.options().dtype(at::kFloat));
  std::vector<uint8_t> finite(n);
  EE_DISPATCH_FLOAT_TYPES(a.hidden.scalar_type(), "exit_check_cpu_norm", [&] {
    normalize_rows<scalar_t>(a, x.mutable_data_ptr<float>(), finite.data());
  });

  const int64_t rows = std::min(n, kRowBlock), cols = chunk_columns(rows);
  const int64_t row_blocks = (n + rows - 1) / rows, chunks = (v + cols - 1) / cols;
  const bool upcast = a.weight.scalar_type() != at::kFloat;
  const int64_t dots_max_rows =
      a.weight.scalar_type() == at::kBFloat16 ? cpu::row_dots_bf16_max_rows() : cpu::kRowDotsMaxRows;
  const bool bias_f32 = a.bias && a.bias->scalar_type() == at::kFloat;
  const float temperature = static_cast<float>(a.temperature), softcap = static_cast<float>(a.softcap);
  std::vector<RowStats> parts(chunks * n);

  // Tasks in chunk-major order: consecutive tasks share a weight chunk across row blocks.
  at::parallel_for(0, row_blocks * chunks, 1, [&](int64_t begin, int64_t end) {
    // The ATen calls below (mm_out, copy_) are kernel internals: a weight that requires grad (an
    // nn.Parameter) must not make them record history or reject out=. Grad mode is thread-local and
    // at::parallel_for does not carry it to its worker threads, so the guard is set here, per thread.
    const c10::NoGradGuard no_grad;
    at::Tensor zbuf = at::empty({rows * cols}, x.options());
    at::Tensor wbuf = upcast && rows > dots_max_rows ? at::empty({cols, d}, x.options()) : at::Tensor();
    at::Tensor bbuf = (a.bias && !bias_f32) ? at::empty({cols}, x.options()) : at::Tensor();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / row_blocks, rb = task % row_blocks;
      const int64_t v0 = c * cols, nc = std::min(cols, v - v0);
      const int64_t r0 = rb * rows, nr = std::min(rows, n - r0);
      at::Tensor w = a.weight.narrow(0, v0, nc);
      at::Tensor z = zbuf.narrow(0, 0, nr * nc).view({nr, nc});
      const float* xr = x.const_data_ptr<float>() + r0 * d;
      if (nr <= dots_max_rows) {
        // The weight in its own dtype: no upcast copy, half the bytes for bf16/fp16.
        const auto wt = w.scalar_type();
        const auto* w16 = static_cast<const uint16_t*>(w.const_data_ptr());
        if (wt == at::kBFloat16) {
          cpu::row_dots_bf16(xr, nr, d, w16, w.stride(0), nc, z.mutable_data_ptr<float>());
        } else if (wt == at::kHalf) {
          cpu::row_dots_f16(xr, nr, d, w16, w.stride(0), nc, z.mutable_data_ptr<float>());
        } else {
          cpu::row_dots(xr, nr, d, w.const_data_ptr<float>(), w.stride(0), nc, z.mutable_data_ptr<float>());
        }
      } else {
        if (upcast) w = wbuf.narrow(0, 0, nc).copy_(w);  // exact: bf16/fp16 -> fp32, so the GEMM accumulates in fp32
        at::mm_out(z, x.narrow(0, r0, nr), w.t());
      }
      const float* b = nullptr;
      if (a.bias) b = bias_f32 ? a.bias->const_data_ptr<float>() + v0
                               : bbuf.narrow(0, 0, nc).copy_(a.bias->narrow(0, v0, nc)).const_data_ptr<float>();
      float* zp = z.mutable_data_ptr<float>();
      for (int64_t i = 0; i < nr; ++i) parts[c * n + r0 + i] = cpu::chunk_stats(zp + i * nc, nc, b, softcap, temperature, v0);
    }
  });

  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      RowStats st = parts[i];
      for (int64_t c = 1; c < chunks; ++c) merge_stats(st, parts[c * n + i]);  // fixed order: deterministic
      write(i, st, finite[i] != 0);
    }
  });
}

}  // namespace

void exit_check_cpu(const ExitArgs& a, const ExitRule& rule, const ExitOutputs& out) {
  const float* thr = rule.threshold.const_data_ptr<float>();
  int64_t* token = out.token.mutable_data_ptr<int64_t>();
  bool* ex = out.exit.mutable_data_ptr<bool>();
  float* conf = out.confidence.mutable_data_ptr<float>();
  float* maxp = out.max_prob.mutable_data_ptr<float>();
  float* margin = out.margin.mutable_data_ptr<float>();
  float* entropy = out.entropy.mutable_data_ptr<float>();
  float* lse = out.lse.mutable_data_ptr<float>();
  row_stats(a, [&](int64_t i, const RowStats& st, bool finite) {
    const RowResult r = finalize_stats(st, finite, thr[i], rule.statistic, rule.exit_above);
    token[i] = r.token;
    ex[i] = r.exit;
    conf[i] = r.confidence;
    maxp[i] = r.max_prob;
    margin[i] = r.margin;
    entropy[i] = r.entropy;
    lse[i] = r.lse;
  });
}

void exit_stats_cpu(const ExitArgs& a, const StatsOutputs& out) {
  float* max_logit = out.max_logit.mutable_data_ptr<float>();
  int64_t* argmax = out.argmax.mutable_data_ptr<int64_t>();
  float* second = out.second_logit.mutable_data_ptr<float>();
  float* sum_exp = out.sum_exp.mutable_data_ptr<float>();
  float* sum_exp_z = out.sum_exp_z.mutable_data_ptr<float>();
  bool* invalid = out.invalid.mutable_data_ptr<bool>();
  row_stats(a, [&](int64_t i, const RowStats& st, bool finite) {
    max_logit[i] = st.m;
    argmax[i] = st.idx;
    second[i] = st.top2;
    sum_exp[i] = st.s;
    sum_exp_z[i] = st.t;
    invalid[i] = st.bad || !finite;
  });
}

}  // namespace earlyexit
