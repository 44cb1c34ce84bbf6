// The emulator's cub::BlockScan (tests/cuda_emu/cuda_emu.h): the part of its interface earlyexit's kernels
// use, with cub's contract kept strict (block_collective.cuh): a second use of the same TempStorage without
// a __syncthreads in between overwrites inputs other threads still read, and the results differ between
// the emulator's thread orders.
#pragma once

#include "block_collective.cuh"

namespace cub {

template <typename T, int BLOCK_THREADS>
class BlockScan : public emu_detail::BlockCollective<T, BLOCK_THREADS> {
  using Base = emu_detail::BlockCollective<T, BLOCK_THREADS>;

 public:
  __device__ explicit BlockScan(typename Base::TempStorage& storage) : Base(storage, "cub::BlockScan") {}

  // output: the sum of the inputs of threads 0 .. threadIdx.x - 1; aggregate: of all threads.
  __device__ void ExclusiveSum(T input, T& output, T& aggregate) {
    const T* all = this->publish(input);
    T before = T(0), total = T(0);
    for (unsigned i = 0; i < BLOCK_THREADS; ++i) {
      if (i < threadIdx.x) before += all[i];
      total += all[i];
    }
    output = before;
    aggregate = total;
  }
};

}  // namespace cub
