#include "recursive_lock.h"

namespace dtr {

void RecursiveLock::wait_for_it() {
  // A holder usually lets go within an op's bookkeeping: spin a little first.
  for (int i = 0; i < 64; ++i) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    uint32_t expected = kFree;
    if (state_.load(std::memory_order_relaxed) == kFree &&
        state_.compare_exchange_weak(expected, kHeld, std::memory_order_acquire,
                                     std::memory_order_relaxed)) {
      return;
    }
  }
  // Then sleep, marking the lock as waited for so that its holder wakes a
  // sleeper when it lets go (Drepper, "Futexes Are Tricky", mutex 2). A thread
  // that took it this way leaves it marked: at worst one needless wake.
  while (state_.exchange(kHeldWithWaiters, std::memory_order_acquire) != kFree) {
    state_.wait(kHeldWithWaiters, std::memory_order_relaxed);
  }
}

void RecursiveLock::wake_one() { state_.notify_one(); }

}  // namespace dtr
