// Runs the CUDA state-similarity kernel (csrc/cuda/state_similarity_kernels.cuh) on the host emulator with
// the launcher's grid and path choice, for tests/test_cuda_emulated_similarity.py. No torch, no CUDA toolkit.
//
// Usage: state_similarity_emu DIR. DIR/args.txt holds "key value" lines (the keys run reads); DIR/h.bin and
// DIR/p.bin hold the two [n, d] inputs as raw arrays with their row strides. Writes DIR/out.bin (f32 [n])
// and DIR/plan.txt (which instantiation ran with which grid). Exit status 0; 2 when the emulator reports a
// fault (message on stderr); 1 for bad usage.
#include <cstdio>
#include <fstream>
#include <string>
#include <type_traits>

#include "cuda/state_similarity_kernels.cuh"
#include "emu_io.h"

using namespace earlyexit::cuda::state_kernels;
using ee_emu::Args;
using ee_emu::Buffer;

namespace {

template <typename T>
int run(const Args& a, const std::string& dir) {
  const int64_t n = static_cast<int64_t>(a.num("n")), d = static_cast<int64_t>(a.num("d"));
  const int64_t ldh = static_cast<int64_t>(a.num("ldh", static_cast<double>(d)));
  const int64_t ldp = static_cast<int64_t>(a.num("ldp", static_cast<double>(d)));
  const int order = static_cast<int>(a.num("order", 0));
  const std::string path = a.str("path", "auto");
  Buffer h(ee_emu::read_file(dir + "/h.bin"), static_cast<size_t>(a.num("h_shift", 0)) * sizeof(T));
  Buffer p(ee_emu::read_file(dir + "/p.bin"), static_cast<size_t>(a.num("p_shift", 0)) * sizeof(T));
  Buffer out;
  out.alloc(4 * static_cast<size_t>(n));
  const T* hp = reinterpret_cast<const T*>(h.data());
  const T* pp = reinterpret_cast<const T*>(p.data());
  float* o = reinterpret_cast<float*>(out.data());
  const bool vec = path == "auto" ? vectorizable(hp, pp, ldh, ldp, d, sizeof(T)) : path == "vector";
  const dim3 blocks(blocks_for(n));
  bool ok = true;
  if (n > 0) {  // the launcher returns before launching an empty grid
    auto body = [&] {
      if (vec) {
        state_similarity_kernel<T, true>(hp, pp, o, n, d, ldh, ldp);
      } else {
        state_similarity_kernel<T, false>(hp, pp, o, n, d, ldh, ldp);
      }
    };
    ok = ee_emu::grid(blocks, kThreads, 0, order, body);
  }
  const std::string plan = std::string("state_similarity_kernel vec=") + (vec ? "1" : "0") +
                           " grid=" + std::to_string(blocks.x) + " threads=" + std::to_string(kThreads);
  if (!ok) {
    std::fprintf(stderr, "emulator: %s (%s)\n", ee_emu::last_error(), plan.c_str());
    return 2;
  }
  std::ofstream(dir + "/out.bin", std::ios::binary).write(reinterpret_cast<const char*>(out.data()), 4 * n);
  std::ofstream(dir + "/plan.txt") << plan << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return ee_emu::harness_main(argc, argv, [](auto* tag, const Args& a, const std::string& dir) {
    return run<std::remove_pointer_t<decltype(tag)>>(a, dir);
  });
}
