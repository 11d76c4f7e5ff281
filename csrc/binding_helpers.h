// Shared by the pybind11 modules: Python hands buffers over as integer addresses (data_ptr()),
// and the torch-free kernels report bad arguments as a message string.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace sk::bind {

template <typename T>
inline T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline void check(const std::string& err) {
  if (!err.empty()) throw std::invalid_argument(err);
}

}  // namespace sk::bind
