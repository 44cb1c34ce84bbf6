// Kernels with the bugs the emulator exists to catch, for tests/test_cuda_emulated.py: each must be
// reported (or, for the race, give results that depend on the schedule).
// Usage: emu_selftest KERNEL ORDER; prints the kernel's output words, exit status 2 on a reported fault.
#include <cstdio>
#include <string>
#include <vector>

#include "cuda_fp16.h"

namespace {

constexpr int kThreads = 64;

__device__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Correct: a block sum through shared memory with the barrier in place.
__global__ void block_sum(float* out) {
  __shared__ float part[kThreads / 32];
  const float s = warp_sum(static_cast<float>(threadIdx.x));
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = part[0] + part[1];
}

// The same without the barrier: thread 0 may read before warp 1 wrote.
__global__ void missing_barrier(float* out) {
  __shared__ float part[kThreads / 32];
  if (blockIdx.x == 0 && threadIdx.x < kThreads / 32) part[threadIdx.x] = 0.f;
  __syncthreads();
  const float s = warp_sum(static_cast<float>(threadIdx.x));
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s + blockIdx.x;
  if (threadIdx.x == 0) out[blockIdx.x] = part[0] + part[1];
}

// Half a warp shuffles while the other half waits at __syncthreads: a hang on a GPU.
__global__ void divergent_shuffle(float* out) {
  float x = 1.f;
  if (threadIdx.x % 32 < 16) x = warp_sum(x);
  __syncthreads();
  out[blockIdx.x * kThreads + threadIdx.x] = x;
}

// Lanes leave before a full-warp shuffle.
__global__ void shuffle_after_exit(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[blockIdx.x * kThreads + threadIdx.x] = warp_sum(1.f);
}

// One element past the end of the output (caught by AddressSanitizer).
__global__ void out_of_bounds(float* out) { out[blockIdx.x * kThreads + threadIdx.x + 1] = 1.f; }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return 1;
  const std::string name = argv[1];
  const int order = std::stoi(argv[2]);
  const int blocks = 2;
  std::vector<float> out(blocks * kThreads, 0.f);
  float* o = out.data();
  void (*kernel)(float*) = name == "block_sum"           ? block_sum
                           : name == "missing_barrier"   ? missing_barrier
                           : name == "divergent_shuffle" ? divergent_shuffle
                           : name == "shuffle_after_exit" ? shuffle_after_exit
                           : name == "out_of_bounds"     ? out_of_bounds
                                                         : nullptr;
  if (kernel == nullptr) return 1;
  struct Call {
    void (*k)(float*);
    float* o;
  } call{kernel, o};
  const bool ok = ee_emu::launch(dim3(blocks), kThreads, 0, order,
                                 [](void* a) { static_cast<Call*>(a)->k(static_cast<Call*>(a)->o); }, &call);
  if (!ok) {
    std::fprintf(stderr, "emulator: %s\n", ee_emu::last_error());
    return 2;
  }
  for (float x : out) std::printf("%g ", x);
  std::printf("\n");
  return 0;
}
