// Parallel loops for the CPU kernels: on torch's own OpenMP team where torch has one, else on a
// small worker pool built so that a busy core costs at most one chunk.
//
// Either way the calling thread takes part and work is handed out in chunks: each thread claims
// those of its own contiguous home range through that range's atomic counter, then the others'
// left over, so a thread that starts late finds less to do.
//
// * The pool. OpenMP's parallel region ends in a barrier that waits for every team thread,
//   including one the OS has not scheduled yet; on a machine where another process holds a core
//   that turns a 1 ms kernel into several time slices. The pool's caller waits only for chunks
//   that were claimed: a worker that wakes late finds nothing left and goes back to sleep. Idle
//   workers sleep on a condition variable after a bounded spin for the next job
//   (SPLITKERNELS_SPIN_US, default 100 us), which stops for a while whenever a spinning worker
//   finds that another thread had its core.
// * The shared team. After each parallel torch op, GNU OpenMP's workers spin for the next region
//   (about 9 ms here); pool workers started meanwhile share a core with them, and our kernels ran
//   at one thread's speed between torch ops (bench/results/ops/README.md, session 13). A kernel
//   called from a thread whose OpenMP team has more than one thread (torch.set_num_threads; torch's
//   Linux wheels load libgomp.so.1, so this module shares their runtime) therefore runs as an
//   OpenMP region on that team, whose spinning workers join at once. Its end still waits for a
//   worker the OS has not run, as torch's own ops do: beside a busy process, at M = 16, that
//   measured worse than the pool. There OMP_WAIT_POLICY=passive (every worker sleeps at once)
//   keeps both from collapsing (same README). A child forked after the team ran uses the pool:
//   GNU OpenMP cannot start a region there.
#pragma once

#include <cstdint>
#include <functional>

namespace sk {

// Which threads run a parallel_for.
enum class Team {
  kAuto,  // the calling thread's OpenMP team when it has more than one thread, else the pool
  kPool,  // always the pool (a caller whose jobs come back to back, with no torch ops between)
};

// Runs body(begin, end) over [0, n) in chunks of `grain` items (the caller included). Calls made
// while another parallel_for runs (another Python thread, or nested) run inline.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body,
                  Team team = Team::kAuto);

// Parallel calls so far on the OpenMP team and on the pool (calls run inline are not counted),
// and how often a spinning worker found its core taken and stopped the spin for a while.
struct TeamStats {
  int64_t team_calls, pool_calls, spin_backoffs;
};
TeamStats team_stats();

// Threads parallel_for uses, the caller included (default: SPLITKERNELS_NUM_THREADS, else the
// CPUs this process may run on).
void set_num_threads(int n);
int num_threads();

// How long an idle worker spins for the next job before it sleeps, in microseconds (0..10000;
// default: SPLITKERNELS_SPIN_US, else 100; 0 sleeps at once).
void set_spin_us(int us);
int spin_us();

}  // namespace sk
