// Runs the CUDA exit-check kernels (csrc/cuda/exit_check_kernels.cuh, exit_check_mma.cuh) on the host
// emulator, launched from the plans the CUDA launcher uses (csrc/cuda/exit_check_plan.h), for
// tests/test_cuda_emulated.py. No torch, no CUDA toolkit.
//
// Usage: exit_check_emu DIR. DIR/args.txt holds "key value" lines (the keys run reads); DIR/hidden.bin,
// weight.bin, bias.bin, norm.bin and threshold.bin hold the inputs as raw arrays (hidden and weight with
// their row strides). Writes DIR/out.bin: exit_check mode token i64 [N], exit u8 [N], then confidence,
// max_prob, margin, entropy, lse as f32 [N] each; exit_stats mode max_logit f32, argmax i64, second_logit,
// sum_exp, sum_exp_z f32, invalid u8. DIR/plan.txt says which kernel ran with which grid.
// Exit status 0; 2 when the emulator reports a fault (message on stderr); 1 for bad usage.
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/exit_check_kernels.cuh"
#include "cuda/exit_check_mma.cuh"
#include "cuda/exit_check_plan.h"
#include "emu_io.h"

using namespace earlyexit;
using namespace earlyexit::cuda;
using ee_emu::Args;
using ee_emu::Buffer;
using ee_emu::grid;
using ee_emu::read_file;

namespace {

std::string g_plan;

template <typename T>
float elem(const T& x) {
  return to_float(x);
}

template <typename T, int RG, int VEC>
bool run_decode(const Params<T>& p, const DecodePlan& plan, int order) {
  const int64_t parts = static_cast<int64_t>(plan.groups) * plan.slices * RG;
  std::vector<float> f(5 * parts);
  std::vector<int64_t> idx(parts);
  std::vector<int> bad(parts), counters(plan.groups, 0);
  Partials part{f.data(), f.data() + parts, f.data() + 2 * parts, f.data() + 3 * parts, f.data() + 4 * parts,
                idx.data(), bad.data()};
  std::ostringstream os;
  os << "decode_kernel RG=" << RG << " VEC=" << VEC << " grid=" << plan.groups << "x" << plan.slices
     << " cols=" << plan.cols << " smem=" << plan.smem;
  g_plan = os.str();
  auto body = [&] { decode_kernel<T, RG, VEC>(p, part, counters.data(), plan.cols); };
  if (!grid(dim3(plan.groups, static_cast<unsigned>(plan.slices)), kThreads, plan.smem, order, body)) return false;
  for (int c : counters)
    if (c != 0) return ee_emu::fail("a merge counter was not reset for the next call"), false;
  return true;
}

template <typename T>
bool launch_decode(const Params<T>& p, int sms, size_t optin, int order) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = decode_vec_ok(p.weight, p.weight_stride, p.d, sizeof(T));
  // The RG = 8 kernel's static shared memory as cudaFuncGetAttributes reports it for an sm_90 build (the
  // RowStats array, the row flags, and the 1 KiB that build reserves) comes off the opt-in limit.
  const size_t static_bytes = sizeof(RowStats) * kThreads + 16 + 1024;
  if (optin <= static_bytes) return ee_emu::fail("decode plan: the rows do not fit in shared memory"), false;
  const DecodePlan plan = decode_plan(p.n, p.d, p.v, sizeof(T), vec, sms, optin - static_bytes, kWarps);
  if (plan.rg == 0) return ee_emu::fail("decode plan: the rows do not fit in shared memory"), false;
  auto go = [&](auto rg_tag) {
    constexpr int RG = decltype(rg_tag)::value;
    return plan.vec ? run_decode<T, RG, kVec>(p, plan, order) : run_decode<T, RG, 1>(p, plan, order);
  };
  switch (plan.rg) {
    case 1:
      return go(std::integral_constant<int, 1>{});
    case 2:
      return go(std::integral_constant<int, 2>{});
    case 4:
      return go(std::integral_constant<int, 4>{});
    default:
      return go(std::integral_constant<int, 8>{});
  }
}

template <typename T, int NT, int MT>
bool run_mma(const Params<T>& p, int sms, size_t optin, int order) {
  constexpr int NP = 8 * NT;
  // The kernel's static shared arrays (inv_rms, row_finite, finish_group's flag), as cudaFuncGetAttributes
  // would report them, come off the opt-in limit.
  const int64_t budget = static_cast<int64_t>(optin) - (5 * NP + 16);
  const MmaPlan plan = mma_plan({NT, MT}, p.d, p.v, sizeof(T), sms, budget, kMmaK, kMmaWarps, kMmaThreads);
  if (plan.kc == 0) return ee_emu::fail("mma plan: not enough shared memory"), false;
  const int64_t parts = plan.slices * NP;
  std::vector<float> f(5 * parts);
  std::vector<int64_t> idx(parts);
  std::vector<int> bad(parts), counters(1, 0);
  Partials part{f.data(), f.data() + parts, f.data() + 2 * parts, f.data() + 3 * parts, f.data() + 4 * parts,
                idx.data(), bad.data()};
  std::ostringstream os;
  os << "decode_mma_kernel NT=" << NT << " MT=" << MT << " grid=" << plan.slices << " per_slice=" << plan.per_slice
     << " kc=" << plan.kc << " ks=" << plan.ks << " smem=" << plan.smem;
  g_plan = os.str();
  auto body = [&] {
    decode_mma_kernel<T, NT, MT>(p, part, counters.data(), static_cast<int>(plan.per_slice),
                                 static_cast<int>(plan.kc), static_cast<int>(plan.ks));
  };
  if (!grid(dim3(static_cast<unsigned>(plan.slices)), kMmaThreads, plan.smem, order, body)) return false;
  if (counters[0] != 0) return ee_emu::fail("the merge counter was not reset for the next call"), false;
  return true;
}

template <typename T>
bool launch_mma(const Params<T>& p, int sms, size_t optin, int order) {
  if constexpr (std::is_same_v<T, float>) {
    return ee_emu::fail("the tensor-core kernel takes 16-bit rows only"), false;
  } else {
    const MmaTiles t = mma_tiles(p.n);
    if (t.nt == 1 && t.mt == 2) return run_mma<T, 1, 2>(p, sms, optin, order);
    if (t.nt == 2 && t.mt == 2) return run_mma<T, 2, 2>(p, sms, optin, order);
    if (t.nt == 4 && t.mt == 1) return run_mma<T, 4, 1>(p, sms, optin, order);
    if (t.nt == 8 && t.mt == 1) return run_mma<T, 8, 1>(p, sms, optin, order);
    return ee_emu::fail("no decode_mma_kernel for these tiles"), false;
  }
}

// The chunked path: normalize_kernel, then per vocabulary chunk a float32 GEMM (on the host, standing in
// for cuBLAS) and chunk_stats_kernel.
template <typename T>
bool launch_chunked(const Params<T>& p, int order) {
  const int64_t n = p.n, v = p.v, d = p.d;
  std::vector<T> xn(n * d);
  std::vector<unsigned char> finite(n);
  bool* fin = reinterpret_cast<bool*>(finite.data());
  auto norm = [&] { normalize_kernel<T>(p, xn.data(), fin); };
  if (!grid(dim3(static_cast<unsigned>((n + kWarps - 1) / kWarps)), kThreads, 0, order, norm)) return false;
  const int64_t cols = chunk_columns(n, v);
  std::vector<float> z(n * cols);
  std::vector<RowStats> running(n);
  int chunks = 0;
  for (int64_t v0 = 0; v0 < v; v0 += cols, ++chunks) {
    const int64_t nc = std::min(cols, v - v0);
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < nc; ++j) {
        float acc = 0.f;
        const T* w = p.weight + (v0 + j) * p.weight_stride;
        for (int64_t k = 0; k < d; ++k) acc = std::fma(elem(xn[r * d + k]), elem(w[k]), acc);
        z[r * nc + j] = acc;
      }
    const bool first = v0 == 0, last = v0 + nc >= v;
    auto stats = [&] { chunk_stats_kernel<T>(p, z.data(), nc, nc, v0, running.data(), fin, first, last); };
    if (!grid(dim3(static_cast<unsigned>(n)), kThreads, 0, order, stats)) return false;
  }
  g_plan = "normalize_kernel + chunk_stats_kernel chunks=" + std::to_string(chunks) + " cols=" + std::to_string(cols);
  return true;
}

template <typename T>
int run(const Args& a, const std::string& dir) {
  const int n = static_cast<int>(a.num("n")), d = static_cast<int>(a.num("d"));
  const int64_t v = static_cast<int64_t>(a.num("v"));
  const std::string mode = a.str("mode", "check"), path = a.str("path", "auto");
  const int sms = static_cast<int>(a.num("sms", 132)), order = static_cast<int>(a.num("order", 0));
  const size_t optin = static_cast<size_t>(a.num("smem_optin", 232448));
  const size_t elt = sizeof(T);
  Buffer hidden(read_file(dir + "/hidden.bin"), static_cast<size_t>(a.num("hidden_shift", 0)) * elt);
  Buffer weight(read_file(dir + "/weight.bin"), static_cast<size_t>(a.num("weight_shift", 0)) * elt);
  Buffer bias, norm, threshold;
  if (a.num("bias_kind") != kNone) bias = Buffer(read_file(dir + "/bias.bin"), 0);
  if (a.num("norm_kind") != kNone) norm = Buffer(read_file(dir + "/norm.bin"), 0);
  if (mode == "check") threshold = Buffer(read_file(dir + "/threshold.bin"), 0);

  Params<T> p{};
  p.hidden = reinterpret_cast<const T*>(hidden.data());
  p.hidden_stride = static_cast<int64_t>(a.num("hidden_stride", d));
  p.weight = reinterpret_cast<const T*>(weight.data());
  p.weight_stride = static_cast<int64_t>(a.num("weight_stride", d));
  p.bias = bias.data();
  p.bias_kind = static_cast<int>(a.num("bias_kind"));
  p.norm_weight = norm.data();
  p.norm_kind = static_cast<int>(a.num("norm_kind"));
  p.n = n;
  p.d = d;
  p.v = v;
  p.eps = static_cast<float>(a.num("eps", 1e-6));
  p.temperature = static_cast<float>(a.num("temperature", 1.0));
  p.norm_offset = static_cast<float>(a.num("norm_offset", 0.0));
  p.softcap = static_cast<float>(a.num("softcap", 0.0));
  p.statistic = static_cast<int>(a.num("statistic", 0));
  p.exit_above = a.num("exit_above", 1) != 0;

  // Outputs: one exact-size buffer per array, as the op allocates them.
  std::vector<Buffer> out(7);
  const size_t nn = static_cast<size_t>(n);
  if (mode == "check") {
    p.threshold = reinterpret_cast<const float*>(threshold.data());
    out[0].alloc(8 * nn);
    out[1].alloc(nn);
    for (int i = 2; i < 7; ++i) out[i].alloc(4 * nn);
    p.token = reinterpret_cast<int64_t*>(out[0].data());
    p.exit = reinterpret_cast<bool*>(out[1].data());
    p.confidence = reinterpret_cast<float*>(out[2].data());
    p.max_prob = reinterpret_cast<float*>(out[3].data());
    p.margin = reinterpret_cast<float*>(out[4].data());
    p.entropy = reinterpret_cast<float*>(out[5].data());
    p.lse = reinterpret_cast<float*>(out[6].data());
  } else {
    out.resize(6);
    const size_t sizes[6] = {4 * nn, 8 * nn, 4 * nn, 4 * nn, 4 * nn, nn};
    for (int i = 0; i < 6; ++i) out[i].alloc(sizes[i]);
    p.max_logit = reinterpret_cast<float*>(out[0].data());
    p.argmax = reinterpret_cast<int64_t*>(out[1].data());
    p.second_logit = reinterpret_cast<float*>(out[2].data());
    p.sum_exp = reinterpret_cast<float*>(out[3].data());
    p.sum_exp_z = reinterpret_cast<float*>(out[4].data());
    p.invalid = reinterpret_cast<bool*>(out[5].data());
  }

  // The launcher's choice (exit_check_cuda.cu, run) on an sm_80+ device: decode kernels up to
  // kDecodeMaxRows rows, tensor cores for 16-bit rows in their layout, else the chunked path.
  std::string chosen = path;
  if (path == "auto") {
    const bool mma =
        !std::is_same_v<T, float> && mma_layout_ok(p.hidden, p.hidden_stride, p.weight, p.weight_stride, d);
    chosen = n > kDecodeMaxRows ? "chunked" : mma ? "mma" : "decode";
  }
  std::vector<std::vector<unsigned char>> first;
  const int calls = static_cast<int>(a.num("calls", 1));
  for (int call = 0; call < calls; ++call) {
    bool ok;
    if (chosen == "decode") {
      ok = launch_decode<T>(p, sms, optin, order);
    } else if (chosen == "mma") {
      ok = launch_mma<T>(p, sms, optin, order);
    } else if (chosen == "chunked") {
      ok = launch_chunked<T>(p, order);
    } else {
      std::fprintf(stderr, "unknown path %s\n", chosen.c_str());
      return 1;
    }
    if (!ok) {
      std::fprintf(stderr, "emulator: %s (%s)\n", ee_emu::last_error(), g_plan.c_str());
      return 2;
    }
    for (size_t i = 0; i < out.size(); ++i) {
      std::vector<unsigned char> now(out[i].data(), out[i].data() + out[i].size);
      if (call == 0) {
        first.push_back(now);
      } else if (now != first[i]) {
        std::fprintf(stderr, "emulator: call %d wrote other bits than call 0 (output %zu; %s)\n", call, i,
                     g_plan.c_str());
        return 2;
      }
      std::memset(out[i].data(), 0xab, out[i].size);  // the next call writes over garbage, as on a GPU
    }
  }
  std::ofstream o(dir + "/out.bin", std::ios::binary);
  for (const auto& bytes : first) o.write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  std::ofstream(dir + "/plan.txt") << g_plan << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return ee_emu::harness_main(argc, argv, [](auto* tag, const Args& a, const std::string& dir) {
    return run<std::remove_pointer_t<decltype(tag)>>(a, dir);
  });
}
