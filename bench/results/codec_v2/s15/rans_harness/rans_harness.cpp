// The C++ rANS coder alone on 2 M symbols (T = 512 x d = 4096 of a Laplacian-like source, 41
// symbols, K class tables assigned to channels at random), one thread, best of 21 encode + decode
// rounds; checks the round trip. Build and run: see run.sh.
// Usage: rans_harness [K classes, 0: one table without classes] [lanes 1|4|32] [isa scalar|avx512]
#include "cpu/rans.cpp"
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>
#include <algorithm>
using namespace sk;
int main(int argc, char** argv) {
  const int64_t n = 512 * 4096, d = 4096; const int K0 = argc > 1 ? atoi(argv[1]) : 16, K = K0 > 0 ? K0 : 1, nsym = 41;
  const int64_t period = K0 > 0 ? d : 1;
  if (argc > 3) set_rans_isa(argv[3]);
  int lanes = argc > 2 ? atoi(argv[2]) : 32;
  std::mt19937 rng(1);
  auto lap = [&](double b) { std::exponential_distribution<double> e(1.0 / b); double v = e(rng) * (rng() & 1 ? 1 : -1); int s = (int)std::lround(v) + nsym / 2; return (uint8_t)std::clamp(s, 0, nsym - 1); };
  std::vector<RansTables> tabs(K);
  for (int k = 0; k < K; ++k) {
    std::vector<double> c(nsym, 1.0); for (int i = 0; i < 100000; ++i) c[lap(1 + 0.3 * k)] += 1;
    double tot = 0; for (double v : c) tot += v;
    std::vector<uint32_t> f(nsym); uint32_t sum = 0; int big = 0;
    for (int s = 0; s < nsym; ++s) { f[s] = std::max<uint32_t>(1, (uint32_t)(c[s] / tot * (kRansM - nsym))); sum += f[s]; if (f[s] > f[big]) big = s; }
    f[big] += kRansM - sum;
    std::string e = rans_build_tables(f.data(), nsym, &tabs[k]); if (!e.empty()) { printf("%s\n", e.c_str()); return 1; }
  }
  std::vector<const RansTables*> ptrs(d); for (int64_t c = 0; c < d; ++c) ptrs[c] = &tabs[rng() % K];
  std::vector<uint8_t> sym(n); for (auto& s : sym) s = lap(3.1);
  std::vector<uint8_t> out(4 * 32 + 2 * n), dec(n);
  int64_t m = 0; double be = 1e9, bd = 1e9;
  for (int r = 0; r < 21; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    m = rans_encode(sym.data(), n, ptrs.data(), period, lanes, out.data(), out.size());
    auto t1 = std::chrono::steady_clock::now();
    std::string err = rans_decode(out.data(), m, n, ptrs.data(), period, lanes, dec.data(), -1, nullptr);
    auto t2 = std::chrono::steady_clock::now();
    if (!err.empty() || dec != sym) { printf("mismatch %s\n", err.c_str()); return 1; }
    be = std::min(be, std::chrono::duration<double>(t1 - t0).count()); bd = std::min(bd, std::chrono::duration<double>(t2 - t1).count());
  }
  printf("K=%d period=%lld lanes=%d bits %.3f enc %.2f ms (%.0f M/s) dec %.2f ms (%.0f M/s)\n", K0, (long long)period, lanes, m * 8.0 / n, be * 1e3, n / be / 1e6, bd * 1e3, n / bd / 1e6);
}
