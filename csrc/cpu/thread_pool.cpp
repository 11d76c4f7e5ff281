#include "cpu/thread_pool.h"

#include <algorithm>
#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace sk {
namespace {

// Chunks are split into one contiguous home range per thread, claimed through the range's own
// counter: with the same shape call after call each thread takes the same weight rows, which stay
// in its core's cache (a layer that fits the L2s of the team), while a thread whose range is done
// claims chunks from the others' ranges in turn, so one that starts late still finds less to do.
struct Job {
  static constexpr int kMaxHomes = 64;
  struct alignas(64) Home {
    std::atomic<int64_t> next{0};  // next chunk of the range to claim
    int64_t end = 0;
  };
  const std::function<void(int64_t, int64_t)>* body = nullptr;
  int64_t n = 0, grain = 1, chunks = 0;
  int homes = 1;
  Home home[kMaxHomes];
  std::atomic<int64_t> done{0};  // chunks finished

  void split(int threads) {
    homes = static_cast<int>(std::clamp<int64_t>(std::min<int64_t>(threads, chunks), 1, kMaxHomes));
    for (int h = 0; h < homes; ++h) {
      home[h].next.store(chunks * h / homes, std::memory_order_relaxed);
      home[h].end = chunks * (h + 1) / homes;
    }
  }
};

// Thread `self` claims and runs chunks of its home range, then of the others', until none are left.
void drain(Job& job, int self) {
  for (int i = 0; i < job.homes; ++i) {
    Job::Home& home = job.home[(self + i) % job.homes];
    for (;;) {
      const int64_t c = home.next.fetch_add(1, std::memory_order_relaxed);
      if (c >= home.end) break;
      const int64_t begin = c * job.grain;
      (*job.body)(begin, std::min(job.n, begin + job.grain));
      job.done.fetch_add(1, std::memory_order_release);
    }
  }
}

// Set in a child process after fork() (registered when the module loads, so a parent that forks
// before its first kernel call is covered too).
std::atomic<bool> forked_child{false};
[[maybe_unused]] const int kAtforkRegistered = pthread_atfork(nullptr, nullptr, [] { forked_child.store(true); });

// One iteration of a busy wait: tells the core (and a hyper-threaded sibling) that this is a spin.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

// How long an idle worker watches for the next job before it sleeps (SPLITKERNELS_SPIN_US,
// default kDefaultSpinUs; 0 sleeps at once). A native decode step is ~100-150 jobs back to back,
// each tens to hundreds of microseconds; a sleeping worker pays a futex wake-up (on a VM an idle
// vCPU's wake-up) at the start of every one while the caller runs that job's chunks alone.
// SmolLM2-135M's edge step at two threads, Zen 4, ms a token: 5.8-6.0 sleeping at once, 4.2-4.3
// spinning 50 us, 3.4-3.5 spinning 100 us (one thread 5.3-5.6; bench/results/edge_decode/s65).
// The spin is bounded and yields the core every 16 pauses. On a machine busy with other processes
// a spinning worker takes CPU share from the caller, and a yielding one can wait a whole time
// slice for its turn: measured neutral to 40% slower there (bench/server_step_parts.py, session 6),
// which kept the spin off until the pool learnt to notice (spin_for_job): a check that comes
// kPreempted or more after the one before means another thread ran on this core, and then no
// worker spins for a while. The pause starts at kMinBackoff and doubles, up to kMaxBackoff, each
// time the first spin after one finds the core taken again: another process that keeps a core
// busy leaves one probe a second, while torch's own OpenMP workers, which spin for some
// milliseconds after each parallel torch op, cost only a few short pauses.
constexpr int kMaxSpinUs = 10000;
constexpr int kDefaultSpinUs = 100;
constexpr std::chrono::nanoseconds kPreempted = std::chrono::microseconds(200);
constexpr std::chrono::nanoseconds kMinBackoff = std::chrono::milliseconds(4);
constexpr std::chrono::nanoseconds kMaxBackoff = std::chrono::seconds(1);
int spin_us_from_env() {
  if (const char* env = std::getenv("SPLITKERNELS_SPIN_US")) {
    const int n = std::atoi(env);
    if (n >= 0) return std::min(n, kMaxSpinUs);
  }
  return kDefaultSpinUs;
}

class Pool {
 public:
  Pool() : threads_(usable_cpus()), spin_us_(spin_us_from_env()) {}
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void set_threads(int n) {
    std::lock_guard<std::mutex> lock(busy_mu_);
    threads_ = std::max(1, n);
  }
  int threads() const { return threads_; }
  void set_spin_us(int us) { spin_us_.store(std::clamp(us, 0, kMaxSpinUs), std::memory_order_relaxed); }
  int spin_us() const { return spin_us_.load(std::memory_order_relaxed); }

  void run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body, Team team) {
    grain = std::max<int64_t>(1, grain);
    const int64_t chunks = (n + grain - 1) / grain;
    std::unique_lock<std::mutex> busy(busy_mu_, std::try_to_lock);
    if (chunks <= 1 || threads_ <= 1 || !busy.owns_lock()) {
      if (n > 0) body(0, n);
      return;
    }
    Job job;
    job.body = &body;
    job.n = n;
    job.grain = grain;
    job.chunks = chunks;
    job.split(threads_);
    if (team == Team::kAuto && on_openmp_team()) {
      run_on_openmp_team(job);
      return;
    }
    pool_calls_.fetch_add(1, std::memory_order_relaxed);
    start_workers(threads_ - 1);
    bool sleeping;
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &job;
      active_ = threads_ - 1;
      generation_.fetch_add(1, std::memory_order_release);
      sleeping = sleepers_ > 0;  // spinning workers see the new generation without a wake-up
    }
    if (sleeping) wake_.notify_all();
    drain(job, 0);
    // Wait for chunks that workers claimed; a bounded spin first (they are short), then sleep.
    for (int spin = 0; job.done.load(std::memory_order_acquire) < chunks; ++spin) {
      if (spin < 2000) {
        std::this_thread::yield();
      } else {
        std::unique_lock<std::mutex> lock(mu_);
        finished_.wait_for(lock, std::chrono::microseconds(200),
                           [&] { return job.done.load(std::memory_order_acquire) >= chunks; });
      }
    }
    // Retire the job; workers still holding it only find the counter exhausted.
    std::unique_lock<std::mutex> lock(mu_);
    job_ = nullptr;
    finished_.wait(lock, [&] { return holders_ == 0; });
  }

  TeamStats stats() const { return {team_calls_.load(), pool_calls_.load(), spin_backoffs_.load()}; }

 private:
  // The calling thread's OpenMP team (torch's, where torch is loaded) has more than one thread,
  // and this is not a process forked from one that used it: GNU OpenMP cannot start a region in
  // such a child (it waits for the parent's workers, which the child does not have), while the
  // pool only ever waits for chunks that some thread claimed.
  static bool on_openmp_team() {
#ifdef _OPENMP
    return !forked_child.load(std::memory_order_relaxed) && !omp_in_parallel() && omp_get_max_threads() > 1;
#else
    return false;
#endif
  }

  // One OpenMP region drains the job; its threads claim chunks like the pool's.
  void run_on_openmp_team(Job& job) {
    team_calls_.fetch_add(1, std::memory_order_relaxed);
#pragma omp parallel num_threads(threads_)
    drain(job, omp_get_thread_num());
  }

  void start_workers(int want) {
    while (static_cast<int>(workers_.size()) < want) {
      const int index = static_cast<int>(workers_.size());
      workers_.emplace_back([this, index] { loop(index); });
    }
  }

  // SPLITKERNELS_NUM_THREADS if set, else the CPUs this process may run on.
  static int usable_cpus() {
    if (const char* env = std::getenv("SPLITKERNELS_NUM_THREADS")) {
      const int n = std::atoi(env);
      if (n > 0) return n;
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1u, std::thread::hardware_concurrency());
  }

  static int64_t ns_of(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count();
  }

  // Spins up to spin_us() for a job newer than `seen`; true when one was posted. Not at all while
  // the machine was last seen contended (see kPreempted above).
  bool spin_for_job(unsigned long seen) {
    const int us = spin_us();
    if (us <= 0) return false;
    using Clock = std::chrono::steady_clock;
    auto last = Clock::now();
    if (ns_of(last) < no_spin_until_.load(std::memory_order_relaxed)) return false;
    const auto until = last + std::chrono::microseconds(us);
    for (unsigned i = 1;; ++i) {
      if (generation_.load(std::memory_order_acquire) != seen) return true;
      if (i % 16 == 0) {
        // Hand the core to any other runnable thread (another process, or this one's own): on an
        // idle machine yield returns at once.
        sched_yield();
        const auto now = Clock::now();
        if (now - last >= kPreempted) {
          back_off(ns_of(now));
          return false;
        }
        if (now >= until) return false;
        last = now;
      } else {
        cpu_relax();
      }
    }
  }

  // No spin from `now` for a pause twice the last one where that one ended less than its own
  // length ago, else for kMinBackoff. Workers race here harmlessly: any of their pauses will do.
  void back_off(int64_t now) {
    const int64_t last = backoff_ns_.load(std::memory_order_relaxed);
    const int64_t pause = now < no_spin_until_.load(std::memory_order_relaxed) + last
                              ? std::min<int64_t>(2 * last, kMaxBackoff.count())
                              : kMinBackoff.count();
    backoff_ns_.store(pause, std::memory_order_relaxed);
    no_spin_until_.store(now + pause, std::memory_order_relaxed);
    spin_backoffs_.fetch_add(1, std::memory_order_relaxed);
  }

  // Worker `index` takes part in jobs while index < active_ (set_num_threads may shrink the team).
  void loop(int index) {
    unsigned long seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    const auto ready = [&] { return stop_ || (job_ != nullptr && generation_.load() != seen && index < active_); };
    for (;;) {
      if (!ready()) {
        lock.unlock();
        spin_for_job(seen);
        lock.lock();
        if (!ready()) {  // the caller notifies only while a worker is counted here (under mu_)
          ++sleepers_;
          wake_.wait(lock, ready);
          --sleepers_;
        }
      }
      if (stop_) return;
      seen = generation_.load();
      Job* job = job_;
      ++holders_;
      lock.unlock();
      drain(*job, index + 1);
      lock.lock();
      --holders_;
      finished_.notify_all();
    }
  }

  std::mutex busy_mu_;  // one parallel_for at a time; others run inline
  std::mutex mu_;
  std::condition_variable wake_, finished_;
  std::vector<std::thread> workers_;
  Job* job_ = nullptr;
  std::atomic<unsigned long> generation_{0};  // written under mu_, read without it by spinning workers
  int sleepers_ = 0;                          // workers waiting on wake_
  int holders_ = 0;
  int active_ = 0;
  bool stop_ = false;
  int threads_;
  std::atomic<int> spin_us_;
  std::atomic<int64_t> no_spin_until_{0};  // steady_clock ns: no spin before (contended machine)
  std::atomic<int64_t> backoff_ns_{kMinBackoff.count()};  // the last pause
  std::atomic<int64_t> team_calls_{0}, pool_calls_{0}, spin_backoffs_{0};
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: workers may outlive static destruction order
  return *p;
}

}  // namespace

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body, Team team) {
  pool().run(n, grain, body, team);
}

TeamStats team_stats() { return pool().stats(); }

void set_num_threads(int n) { pool().set_threads(n); }
int num_threads() { return pool().threads(); }
void set_spin_us(int us) { pool().set_spin_us(us); }
int spin_us() { return pool().spin_us(); }

}  // namespace sk
