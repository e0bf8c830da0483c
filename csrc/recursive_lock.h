// The runtime's lock: recursive, as std::recursive_mutex, at a fraction of its cost.
//
// Note [The runtime's lock]
// Every op takes the runtime's lock, and so do a wrapper's release and a
// storage record's death, about three lock and unlock pairs per op on the
// TreeLSTM. std::recursive_mutex is a call into glibc each way, about 70
// instructions a pair (callgrind, twelfth session's profile), where this is
// about 15 inline. Taking it is one compare-and-swap, releasing it one
// exchange, as glibc's; a thread taking it again (a recompute or a Python
// policy running ops inside an op, a wrapper released during one) only counts.
// A thread that finds it held spins briefly, then sleeps on the state word
// (std::atomic::wait, a futex on Linux): the holder may be running a Python
// policy, waiting for the GIL, for as long as it takes.
#pragma once

#include <atomic>
#include <cstdint>

#include <pthread.h>

namespace dtr {

class RecursiveLock {
 public:
  RecursiveLock() = default;
  RecursiveLock(const RecursiveLock&) = delete;
  RecursiveLock& operator=(const RecursiveLock&) = delete;

  void lock() {
    if (!try_lock()) {
      wait_for_it();
      own();
    }
  }

  bool try_lock() {
    if (owner_.load(std::memory_order_relaxed) == this_thread()) {
      depth_ += 1;
      return true;
    }
    uint32_t expected = kFree;
    if (!state_.compare_exchange_strong(expected, kHeld, std::memory_order_acquire,
                                        std::memory_order_relaxed)) {
      return false;
    }
    own();
    return true;
  }

  // Whether the calling thread holds it.
  bool held_here() const { return owner_.load(std::memory_order_relaxed) == this_thread(); }

  void unlock() {
    if (--depth_ > 0) return;
    owner_.store(0, std::memory_order_relaxed);
    if (state_.exchange(kFree, std::memory_order_release) == kHeldWithWaiters) wake_one();
  }

 private:
  enum : uint32_t { kFree = 0, kHeld = 1, kHeldWithWaiters = 2 };

  // Any value unique among live threads. Only the owner writes its own value
  // into owner_, and clears it before letting go, so a thread reads its own
  // value there exactly when it holds the lock.
  static uintptr_t this_thread() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    return reinterpret_cast<uintptr_t>(__builtin_thread_pointer());
#else
    return reinterpret_cast<uintptr_t>(pthread_self());
#endif
  }

  // Just taken (state_ says held): records the holder.
  void own() {
    owner_.store(this_thread(), std::memory_order_relaxed);
    depth_ = 1;
  }

  void wait_for_it();  // out of line: the contended path
  void wake_one();

  std::atomic<uint32_t> state_{kFree};
  std::atomic<uintptr_t> owner_{0};
  uint32_t depth_ = 0;  // read and written by the owner only
};

}  // namespace dtr
