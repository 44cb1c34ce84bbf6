// What the emulator's cub::BlockScan and cub::BlockReduce share: temporary storage with one input per
// thread, published to the block at a barrier. No barrier after the read, as in cub: the caller must
// __syncthreads before reusing the storage, or threads still reading see the next call's inputs.
#pragma once

#include "cuda_emu.h"

namespace cub {
namespace emu_detail {

template <typename T, int BLOCK_THREADS>
class BlockCollective {
 public:
  struct TempStorage {
    T input[BLOCK_THREADS];
  };

 protected:
  __device__ BlockCollective(TempStorage& storage, const char* name) : storage_(storage) {
    if (blockDim.x != BLOCK_THREADS) ee_emu::fail(std::string(name) + " with a block size other than BLOCK_THREADS");
  }

  // Stores this thread's input, waits for the block, returns every thread's input.
  __device__ const T* publish(T input) {
    storage_.input[threadIdx.x] = input;
    __syncthreads();
    return storage_.input;
  }

 private:
  TempStorage& storage_;
};

}  // namespace emu_detail
}  // namespace cub
