// A host emulator of the CUDA execution model, enough to run earlyexit's CUDA kernels unchanged on a
// machine without a GPU (tests only; see tests/test_cuda_emulated.py).
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one after another in a
// chosen order. A fiber runs until it reaches a barrier: __syncthreads waits for every thread of the block
// that has not exited, a warp collective (__shfl_*_sync, __all_sync, __any_sync, mma) for the 32 lanes of
// its warp. What a GPU would hang on or leave undefined is reported as an error instead: a barrier that
// can never be released (a __syncthreads inside a branch some threads skip, a shuffle some lanes of the
// warp never reach), a warp collective after some of its lanes exited, a mask other than the full warp,
// __trap. Threads between two barriers run in the launch's order (forward, reverse or shuffled), and so
// do blocks, so a missing barrier or an order-dependent merge shows as results that differ between orders.
// __shared__ variables are function statics (one block runs at a time); dynamic shared memory is a
// buffer filled with 0xff (NaN as floats) before every block, so reading it unwritten is visible.
// Built with AddressSanitizer, every out-of-bounds global or shared access stops the run.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EE_EMU_ASAN 1
#endif

#define EE_CUDA_EMU 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define EE_DYNAMIC_SMEM(name) unsigned char* name = ::ee_emu::dynamic_smem()

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) int2 {
  int x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace ee_emu {

enum State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };
enum Order { kForward = 0, kReverse = 1, kShuffled = 2 };

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSmemBytes = 256 * 1024;
constexpr int kWordsPerLane = 6;  // the most a warp collective exchanges per lane (an mma's A and B registers)

struct Emulator {
  int threads = 0;
  int current = -1;
  std::vector<ucontext_t> ctx;
  std::vector<int> state;
  std::vector<std::vector<char>> stacks;
  std::vector<uint32_t> words;  // two banks of, per lane, what a warp collective exchanges
  std::vector<int> bank;        // per lane, the bank of its next collective
  std::vector<int> order;       // scheduling order of the block's threads
  ucontext_t main_ctx;
  alignas(16) unsigned char smem[kSmemBytes];
  size_t smem_size = 0;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::string error;
#ifdef EE_EMU_ASAN
  const void* main_bottom = nullptr;
  size_t main_size = 0;
#endif
};

inline Emulator& emu() {
  static Emulator* e = new Emulator();
  return *e;
}

inline unsigned char* dynamic_smem() { return emu().smem; }

inline void fail(const std::string& why) {
  Emulator& e = emu();
  if (e.error.empty()) e.error = why;
}

// Back to the scheduler; the fiber resumes when its barrier is released (never once an error is set).
inline void yield_as(int state) {
  // A compiler barrier too: __shared__ statics written by other fibers must be re-read after it.
  asm volatile("" ::: "memory");
  Emulator& e = emu();
  const int me = e.current;
  e.state[me] = state;
#ifdef EE_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, e.main_bottom, e.main_size);
  swapcontext(&e.ctx[me], &e.main_ctx);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  swapcontext(&e.ctx[me], &e.main_ctx);
#endif
  asm volatile("" ::: "memory");
}

inline void fiber_entry() {
  Emulator& e = emu();
#ifdef EE_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &e.main_bottom, &e.main_size);
#endif
  e.body(e.body_arg);
  e.state[e.current] = kDone;
#ifdef EE_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, e.main_bottom, e.main_size);
#endif
  // uc_link returns to the scheduler
}

inline void switch_to(int t) {
  Emulator& e = emu();
  e.current = t;
  threadIdx = uint3{static_cast<unsigned>(t) % blockDim.x, static_cast<unsigned>(t) / blockDim.x, 0};
#ifdef EE_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, e.stacks[t].data(), e.stacks[t].size());
  swapcontext(&e.main_ctx, &e.ctx[t]);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  swapcontext(&e.main_ctx, &e.ctx[t]);
#endif
}

// Runs one block to completion; false (with e.error set) on a deadlock or a reported fault.
inline bool run_block() {
  Emulator& e = emu();
  for (int t = 0; t < e.threads; ++t) {
    getcontext(&e.ctx[t]);
    e.ctx[t].uc_stack.ss_sp = e.stacks[t].data();
    e.ctx[t].uc_stack.ss_size = e.stacks[t].size();
    e.ctx[t].uc_link = &e.main_ctx;
    makecontext(&e.ctx[t], fiber_entry, 0);
    e.state[t] = kRunnable;
    e.bank[t] = 0;
  }
  std::memset(e.smem, 0xff, e.smem_size);
  for (;;) {
    bool ran = false;
    for (int t : e.order) {
      if (e.state[t] != kRunnable) continue;
      switch_to(t);
      ran = true;
      if (!e.error.empty()) return false;
    }
    if (ran) continue;
    int live = 0, at_block = 0;
    for (int t = 0; t < e.threads; ++t) {
      live += e.state[t] != kDone;
      at_block += e.state[t] == kBlockBarrier;
    }
    if (live == 0) return true;
    bool released = false;
    for (int w = 0; w * 32 < e.threads; ++w) {
      int waiting = 0, done = 0;
      for (int l = w * 32; l < w * 32 + 32 && l < e.threads; ++l) {
        waiting += e.state[l] == kWarpBarrier;
        done += e.state[l] == kDone;
      }
      if (waiting == 0) continue;
      if (done > 0) {
        fail("warp " + std::to_string(w) + " of block (" + std::to_string(blockIdx.x) + ", " +
             std::to_string(blockIdx.y) + "): a warp collective after " + std::to_string(done) +
             " of its lanes exited");
        return false;
      }
      if (waiting == std::min(32, e.threads - w * 32)) {
        for (int l = w * 32; l < w * 32 + waiting; ++l) e.state[l] = kRunnable;
        released = true;
      }
    }
    if (!released && at_block == live) {
      for (int t = 0; t < e.threads; ++t)
        if (e.state[t] == kBlockBarrier) e.state[t] = kRunnable;
      released = true;
    }
    if (!released) {
      std::string where;
      for (int t = 0; t < e.threads && where.size() < 200; ++t)
        if (e.state[t] != kDone)
          where += " t" + std::to_string(t) + (e.state[t] == kBlockBarrier ? ":syncthreads" : ":warp");
      fail("deadlock in block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) +
           "): threads wait at barriers that can never be released:" + where);
      return false;
    }
  }
}

inline std::vector<int> permutation(int n, int order, uint32_t seed) {
  std::vector<int> p(n);
  std::iota(p.begin(), p.end(), 0);
  if (order == kReverse) std::reverse(p.begin(), p.end());
  if (order == kShuffled) {
    std::mt19937 rng(seed);
    std::shuffle(p.begin(), p.end(), rng);
  }
  return p;
}

// Launches body(arg) as a grid of `grid` blocks of `threads` threads with `smem` bytes of dynamic shared
// memory; blocks and threads are scheduled in `order`. Returns false with the error in last_error().
inline bool launch(dim3 grid, int threads, size_t smem, int order, void (*body)(void*), void* arg) {
  Emulator& e = emu();
  e.error.clear();
  if (smem > kSmemBytes) {
    fail("dynamic shared memory " + std::to_string(smem) + " B exceeds the emulator's " + std::to_string(kSmemBytes));
    return false;
  }
  if (threads <= 0 || threads > 1024) {
    fail("block of " + std::to_string(threads) + " threads");
    return false;
  }
  e.threads = threads;
  e.ctx.resize(threads);
  e.state.assign(threads, kDone);
  e.bank.assign(threads, 0);
  e.words.assign(2 * static_cast<size_t>(threads) * kWordsPerLane, 0u);
  if (static_cast<int>(e.stacks.size()) < threads) e.stacks.resize(threads, std::vector<char>(kStackBytes));
  e.order = permutation(threads, order, 12345u);
  e.smem_size = smem;
  e.body = body;
  e.body_arg = arg;
  blockDim = dim3(threads);
  gridDim = grid;
  const int blocks = static_cast<int>(grid.x * grid.y * grid.z);
  for (int b : permutation(blocks, order, 777u)) {
    blockIdx = uint3{b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y)};
    if (!run_block()) return false;
  }
  return true;
}

inline const char* last_error() { return emu().error.c_str(); }

// A warp collective: every lane publishes n words, waits for its warp, then reads what it needs through
// `read` (lane index -> word pointer). The words alternate between two banks per lane, so a lane that
// runs ahead into the next collective never overwrites words still being read: the one after that
// reuses this bank only once every lane has reached it, hence has finished reading this one.
template <typename Read>
inline void exchange(unsigned mask, const uint32_t* mine, int n, const Read& read) {
  Emulator& e = emu();
  if (mask != 0xffffffffu)
    fail("warp collective with mask " + std::to_string(mask) + " (only full warps are emulated)");
  const int me = e.current;
  const int bank = e.bank[me];
  e.bank[me] ^= 1;
  const size_t per_bank = static_cast<size_t>(e.threads) * kWordsPerLane;
  std::memcpy(&e.words[bank * per_bank + static_cast<size_t>(me) * kWordsPerLane], mine, n * sizeof(uint32_t));
  yield_as(kWarpBarrier);
  const int base = me / 32 * 32;
  read([&](int lane) { return &e.words[bank * per_bank + static_cast<size_t>(base + lane) * kWordsPerLane]; });
}

template <typename V>
inline V shfl_from(unsigned mask, V v, int src_of_lane_xor, bool is_xor) {
  static_assert(sizeof(V) <= 8, "shuffles move at most 8 bytes");
  uint32_t w[2] = {0u, 0u};
  std::memcpy(w, &v, sizeof(V));
  V out{};
  const int lane = emu().current % 32;
  const int src = is_xor ? (lane ^ src_of_lane_xor) : src_of_lane_xor;
  exchange(mask, w, 2, [&](const auto& at) { std::memcpy(&out, at(src & 31), sizeof(V)); });
  return out;
}

template <typename V>
inline V shfl_sync(unsigned mask, V v, int src) {
  return shfl_from(mask, v, src, false);
}

inline bool vote(unsigned mask, bool pred, bool all) {
  const uint32_t w = pred;
  bool out = all;
  exchange(mask, &w, 1, [&](const auto& at) {
    for (int l = 0; l < 32; ++l) out = all ? (out && *at(l) != 0) : (out || *at(l) != 0);
  });
  return out;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} as the PTX ISA defines its fragments: lane = 4 g + q;
// A (16 x 16, row major) registers a0: (g, 2q..2q+1), a1: (g + 8, 2q..), a2: (g, 2q + 8..), a3: (g + 8, 2q + 8..);
// B (16 x 8, column major) b0: (k = 2q..2q+1, col g), b1: (k = 2q + 8.., col g); C/D c0, c1: (g, 2q..2q+1),
// c2, c3: (g + 8, 2q..). Each register holds two 16-bit elements, the lower one first. float32 accumulation
// (products of 16-bit floats are exact in float32; the order of the sums is the emulator's own).
template <typename T>
float element_to_float(uint16_t bits);

template <typename T>
inline void mma_m16n8k16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                         uint32_t b1) {
  const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
  float a[16][16], b[16][8];
  exchange(0xffffffffu, mine, 6, [&](const auto& at) {
    for (int lane = 0; lane < 32; ++lane) {
      const uint32_t* w = at(lane);
      const int g = lane / 4, q = lane % 4;
      for (int h = 0; h < 2; ++h) {
        a[g][2 * q + h] = element_to_float<T>(static_cast<uint16_t>(w[0] >> (16 * h)));
        a[g + 8][2 * q + h] = element_to_float<T>(static_cast<uint16_t>(w[1] >> (16 * h)));
        a[g][2 * q + 8 + h] = element_to_float<T>(static_cast<uint16_t>(w[2] >> (16 * h)));
        a[g + 8][2 * q + 8 + h] = element_to_float<T>(static_cast<uint16_t>(w[3] >> (16 * h)));
        b[2 * q + h][g] = element_to_float<T>(static_cast<uint16_t>(w[4] >> (16 * h)));
        b[2 * q + 8 + h][g] = element_to_float<T>(static_cast<uint16_t>(w[5] >> (16 * h)));
      }
    }
  });
  const int lane = emu().current % 32, g = lane / 4, q = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * q + i % 2;
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc = std::fma(a[row][k], b[k][col], acc);
    c[i] = acc;
  }
}

}  // namespace ee_emu

inline void __syncthreads() { ee_emu::yield_as(ee_emu::kBlockBarrier); }
inline void __threadfence() {}
inline void __trap() {
  ee_emu::fail("__trap()");
  ee_emu::yield_as(ee_emu::kDone);
}
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
  if (width != 32) ee_emu::fail("shuffle width other than 32");
  return ee_emu::shfl_from(mask, v, lane_mask, true);
}
template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src, int width = 32) {
  if (width != 32) ee_emu::fail("shuffle width other than 32");
  return ee_emu::shfl_sync(mask, v, src);
}
inline bool __all_sync(unsigned mask, bool pred) { return ee_emu::vote(mask, pred, true); }
inline bool __any_sync(unsigned mask, bool pred) { return ee_emu::vote(mask, pred, false); }
template <typename V>
inline V __ldg(const V* p) {
  return *p;
}
template <typename V>
inline V __ldcg(const V* p) {
  return *p;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int atomicAdd(int* address, int v) {
  const int old = *address;
  *address = old + v;
  return old;
}
template <typename A>
inline A min(A a, A b) {
  return b < a ? b : a;
}
template <typename A>
inline A max(A a, A b) {
  return a < b ? b : a;
}
