// File input and output of the emulator harnesses (exit_check_emu.cpp, state_similarity_emu.cpp): a
// DIR/args.txt of "key value" lines, raw input arrays, device-memory stand-ins and a launch helper.
#pragma once

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_emu.h"
#include "cuda_fp16.h"

namespace ee_emu {

struct Args {
  std::map<std::string, std::string> kv;
  std::string str(const std::string& k, const std::string& def = "") const {
    auto it = kv.find(k);
    return it == kv.end() ? def : it->second;
  }
  double num(const std::string& k, double def = 0) const {
    auto it = kv.find(k);
    return it == kv.end() ? def : std::stod(it->second);
  }
};

inline std::vector<unsigned char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<unsigned char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// Device memory stand-in: an exact-size heap copy (AddressSanitizer sees one byte past its end),
// placed `shift` bytes past a 16-byte boundary.
struct Buffer {
  size_t shift = 0;
  Buffer() = default;
  Buffer(const std::vector<unsigned char>& src, size_t shift_) : shift(shift_) { set(src); }
  void set(const std::vector<unsigned char>& src) {
    storage.reset(static_cast<unsigned char*>(::operator new[](src.size() + shift, std::align_val_t(16))));
    std::memcpy(storage.get() + shift, src.data(), src.size());
    size = src.size();
  }
  void alloc(size_t n) { set(std::vector<unsigned char>(n, 0xab)); }
  unsigned char* data() const { return size ? storage.get() + shift : nullptr; }
  struct Free {
    void operator()(unsigned char* ptr) const { ::operator delete[](ptr, std::align_val_t(16)); }
  };
  std::unique_ptr<unsigned char, Free> storage;
  size_t size = 0;
};

inline Args read_args(const std::string& dir) {
  Args a;
  std::ifstream f(dir + "/args.txt");
  std::string key, value;
  while (f >> key >> value) a.kv[key] = value;
  return a;
}

// Runs the callable f as the body of every thread of a grid (see launch); false on an emulator fault.
template <typename F>
bool grid(dim3 g, int threads, size_t smem, int order, F& f) {
  return ee_emu::launch(g, threads, smem, order, [](void* a) { (*static_cast<F*>(a))(); }, &f);
}

// The harnesses' main: `harness DIR`; calls run(tag, args, DIR) with tag a T* (nullptr) for the element
// type named by args' dtype (0 float, 1 __half, 2 __nv_bfloat16) and returns its exit status.
template <typename Run>
int harness_main(int argc, char** argv, const Run& run) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
    return 1;
  }
  const std::string dir = argv[1];
  const Args a = read_args(dir);
  const int dtype = static_cast<int>(a.num("dtype"));
  if (dtype == 0) return run(static_cast<float*>(nullptr), a, dir);
  if (dtype == 1) return run(static_cast<__half*>(nullptr), a, dir);
  return run(static_cast<__nv_bfloat16*>(nullptr), a, dir);
}

}  // namespace ee_emu
