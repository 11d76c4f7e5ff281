// The cpuid check of the AVX-512 builds' flags, and the builds of one component's per-ISA kernel
// table that this CPU runs, best last; the one in use (the best at start); and a switch between
// them by name. The bit-plane and slot coders keep one each (planes.cpp, slots.cpp).
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace sk {

#if defined(__x86_64__) || defined(__i386__)
// Whether this CPU runs everything the AVX2 kernels' flags (-mavx2 -mfma -mf16c) and CMakeLists.txt's
// SK_AVX512 flags (those and AVX-512 F/BW/VL/DQ) let the compiler emit: every object built with them
// checks at least this. F16C came before AVX2 on every x86 CPU.
inline bool cpu_runs_avx2_flags() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
inline bool cpu_runs_avx512_flags() {
  return cpu_runs_avx2_flags() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#endif

template <class Kernels>
class IsaChoice {
 public:
  struct Build {
    const char* name;
    const Kernels* kernels;
  };

  // component names the switch in its error ("<component> isa must be one of ...").
  IsaChoice(const char* component, std::vector<Build> builds)
      : component_(component), builds_(std::move(builds)), current_(&builds_.back()) {}

  const Kernels* kernels() const { return current_->kernels; }
  std::string name() const { return current_->name; }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const Build& b : builds_) out.push_back(b.name);
    return out;
  }

  // "" or why not.
  std::string set(const std::string& name) {
    for (const Build& b : builds_) {
      if (name == b.name) {
        current_ = &b;
        return "";
      }
    }
    return std::string(component_) + " isa must be one of the supported ones (see " + component_ + "_isas()), got '" +
           name + "'";
  }

 private:
  const char* component_;
  std::vector<Build> builds_;
  const Build* current_;
};

}  // namespace sk
