// Scratch vectors for the SIMD kernels, their memory aligned to a cache line.
//
// std::vector's memory is only 16-byte aligned (glibc malloc; its large blocks, mapped on their
// own, start 16 bytes past a page), so every 64-byte load from it may span two cache lines.
// Whether it did changed from process to process with the heap's state: the bf16 activations of
// 1536 x 576 W4 at M = 4 took 0.047-0.052 ms in some processes and 0.037-0.040 in others (one
// thread, warm), and all of them 0.037-0.039 once the buffer was aligned.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace sk {

constexpr std::size_t kCacheLine = 64;

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{kCacheLine}));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{kCacheLine}); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const noexcept { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const noexcept { return false; }
};

// A std::vector whose data() is 64-byte aligned.
template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace sk

// The vectors' out-of-line members are built once, for baseline x86-64, in aligned_vector.cpp.
// Instantiated implicitly, every kernel object built for its instruction set carried a weak copy,
// and the linker kept one of them for all callers: the baseline code's resize() ran an AVX-512
// copy (zmm moves), an illegal instruction on CPUs without AVX-512. The build checks that no
// kernel object defines a weak symbol outside its own namespace (csrc/check_isa_objects.py).
extern template class std::vector<float, sk::CacheLineAllocator<float>>;
extern template class std::vector<int8_t, sk::CacheLineAllocator<int8_t>>;
extern template class std::vector<uint8_t, sk::CacheLineAllocator<uint8_t>>;
extern template class std::vector<uint16_t, sk::CacheLineAllocator<uint16_t>>;
extern template class std::vector<int32_t, sk::CacheLineAllocator<int32_t>>;
extern template class std::vector<uint32_t, sk::CacheLineAllocator<uint32_t>>;
