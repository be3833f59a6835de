// A small thread pool for the decode-time kernels: the caller waits for the work, not for the threads.
//
// Why not OpenMP here: a batch-1 decode step is ~50 short parallel calls, and an OpenMP region
// ends at a barrier that every thread of the team must reach. On a shared machine the OS takes a
// core away for milliseconds at a time; a worker that has not even started then holds up the
// whole call (measured on a busy 2-core VM: median steps 10x the best ones). Here the items of a
// job are handed out one at a time, the caller takes them too, and it returns as soon as every
// item is done: a worker that never woke up costs nothing, one preempted mid-item costs that item.
//
// Protocol. One 64-bit `state_`: generation << 17 | closed << 16 | workers inside the job.
// A worker enters a job only by CAS on an open state of a generation it has not served, so the
// job's fields (written before the state is published) are consistent for it; the caller closes
// the job after the last item and waits for the workers inside to leave before the next job.
// Workers spin briefly between jobs (decode calls come every few microseconds), then sleep.
#pragma once

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

namespace lk {

class Pool {
 public:
  using Fn = void (*)(void* ctx, int64_t item);

  static Pool& get() {
    static Pool* pool = [] {
      pthread_atfork(nullptr, nullptr, [] { new (&get()) Pool(); });  // a forked child starts with no workers
      return new Pool();
    }();
    return *pool;
  }

  // Runs fn(ctx, i) for i in [0, items) on up to `threads` threads (the caller is one of them).
  void run(int threads, int64_t items, Fn fn, void* ctx) {
    std::unique_lock<std::mutex> one(submit_, std::try_to_lock);
    if (!one.owns_lock() || threads <= 1 || items <= 1) {  // busy (another caller) or nothing to share
      for (int64_t i = 0; i < items; ++i) fn(ctx, i);
      return;
    }
    grow(threads - 1);
    fn_ = fn;
    ctx_ = ctx;
    items_ = items;
    limit_.store(threads - 1, std::memory_order_relaxed);
    next_.store(0, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = ++gen_;
    state_.store(gen << 17, std::memory_order_seq_cst);  // open, nobody inside
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lk(m_);
      cv_.notify_all();
    }
    for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < items;) {
      fn(ctx, i);
      done_.fetch_add(1, std::memory_order_release);
    }
    wait([&] { return done_.load(std::memory_order_acquire) >= items; });
    uint64_t s = state_.load(std::memory_order_acquire);
    while (!state_.compare_exchange_weak(s, s | kClosed, std::memory_order_acq_rel)) {
    }
    wait([&] { return (state_.load(std::memory_order_acquire) & kInside) == 0; });
  }

  // Workers running so far, and how many of them are pinned to one CPU each.
  int started() const { return started_.load(); }
  int pinned() const { return pinned_.load(); }
  // Whether workers started from now on pin themselves (LABKIT_PIN_THREADS=0 turns it off).
  void set_pinning(bool on) { pin_.store(on); }
  void grow(int n) {
    while (count_.load() < n) {
      const int id = count_.fetch_add(1);
      std::thread([this, id] { loop(id); }).detach();  // detached: nothing to join at exit
    }
  }

 private:
  static constexpr uint64_t kClosed = 1ull << 16, kInside = kClosed - 1;
  static constexpr int kIdleSpins = 5000;  // ~0.1 ms of pause between jobs, then sleep

  template <class Pred>
  static void wait(Pred done) {
    for (int spins = 0; !done(); ++spins) {
      if (spins < 4096) _mm_pause();
      else std::this_thread::yield();
    }
  }

  void pin(int id) {
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return;
    std::vector<int> cpus;
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &allowed)) cpus.push_back(c);
    if (cpus.size() < 2) return;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpus[(id + 1) % cpus.size()], &one);  // worker id on the (id+1)-th CPU: the caller usually has the first
    if (pthread_setaffinity_np(pthread_self(), sizeof(one), &one) == 0) pinned_.fetch_add(1);
  }

  void loop(int id) {
    if (pin_.load()) pin(id);
    started_.fetch_add(1);
    uint64_t seen = 0;
    int spins = 0;
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      const uint64_t g = s >> 17;
      if (g != seen && !(s & kClosed)) {  // a job this worker has not served is open
        if (id >= limit_.load(std::memory_order_relaxed)) {  // the caller asked for fewer threads
          seen = g;
          continue;
        }
        if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
        seen = g;
        spins = 0;
        for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < items_;) {
          fn_(ctx_, i);
          done_.fetch_add(1, std::memory_order_release);
        }
        state_.fetch_sub(1, std::memory_order_release);
        continue;
      }
      seen = g;  // a closed job is over: nothing to wake up for
      if (++spins < kIdleSpins) {
        _mm_pause();
        continue;
      }
      std::unique_lock<std::mutex> lk(m_);
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      cv_.wait(lk, [&] {
        const uint64_t t = state_.load(std::memory_order_seq_cst);
        return (t >> 17) != seen && !(t & kClosed);
      });
      sleepers_.fetch_sub(1, std::memory_order_seq_cst);
      spins = 0;
    }
  }

  std::mutex submit_, m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int64_t> next_{0}, done_{0};
  std::atomic<int> count_{0}, started_{0}, pinned_{0}, sleepers_{0}, limit_{0};
  std::atomic<bool> pin_{true};
  uint64_t gen_ = 0;
  Fn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t items_ = 0;
};

}  // namespace lk
