// A small worker pool for the CPU kernels, built so that a busy core costs at most one chunk.
//
// OpenMP's parallel-for ends in a barrier that waits for every team thread, including one the
// OS has not scheduled yet; on a machine where another process holds a core that turns a 1 ms
// kernel into several time slices. Here the calling thread takes part, work is handed out in
// chunks through an atomic counter, and the caller waits only for chunks that were claimed:
// a worker that wakes late finds nothing left and goes back to sleep. Idle workers sleep on a
// condition variable, optionally after a bounded spin for the next job (SPLITKERNELS_SPIN_US,
// default 0; back-to-back jobs then start without a wake-up on an idle machine).
#pragma once

#include <cstdint>
#include <functional>

namespace sk {

// Runs body(begin, end) over [0, n) in chunks of `grain` items on the pool (the caller
// included). Calls made while the pool is busy (another Python thread, or nested) run inline.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

// Threads parallel_for uses, the caller included (default: SPLITKERNELS_NUM_THREADS, else the
// CPUs this process may run on).
void set_num_threads(int n);
int num_threads();

// How long an idle worker spins for the next job before it sleeps, in microseconds (0..10000;
// default: SPLITKERNELS_SPIN_US, else 0).
void set_spin_us(int us);
int spin_us();

}  // namespace sk
