// The emulator's cub::BlockReduce (tests/cuda_emu/cuda_emu.h): Sum only, with cub's contract kept strict.
// The result is defined in thread 0 only, so every other thread gets a poison value; reusing the
// TempStorage without a __syncthreads in between overwrites inputs thread 0 may still read
// (block_collective.cuh).
#pragma once

#include "block_collective.cuh"

namespace cub {

template <typename T, int BLOCK_THREADS>
class BlockReduce : public emu_detail::BlockCollective<T, BLOCK_THREADS> {
  using Base = emu_detail::BlockCollective<T, BLOCK_THREADS>;

 public:
  __device__ explicit BlockReduce(typename Base::TempStorage& storage) : Base(storage, "cub::BlockReduce") {}

  __device__ T Sum(T input) {
    const T* all = this->publish(input);
    if (threadIdx.x != 0) return static_cast<T>(0x5a5a5a5a5a5a5a5aull);  // undefined in cub
    T total = T(0);
    for (unsigned i = 0; i < BLOCK_THREADS; ++i) total += all[i];
    return total;
  }
};

}  // namespace cub
