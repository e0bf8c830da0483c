// Note [Live object counts]
// How many cells, recipes and storage records exist right now, over every C++
// runtime of the process. A runtime that leaks shows here long before it shows
// as memory: tests/test_soak.py checks that these stay flat over hundreds of
// training steps. A relaxed atomic add per construction and destruction (a few
// nanoseconds, three objects per op at most) is the whole cost.
#pragma once

#include <atomic>
#include <cstdint>

namespace dtr {

template <typename T>
struct LiveCount {
  LiveCount() { count.fetch_add(1, std::memory_order_relaxed); }
  LiveCount(const LiveCount&) { count.fetch_add(1, std::memory_order_relaxed); }
  LiveCount& operator=(const LiveCount&) = default;
  ~LiveCount() { count.fetch_sub(1, std::memory_order_relaxed); }

  static int64_t live() { return count.load(std::memory_order_relaxed); }

 private:
  static inline std::atomic<int64_t> count{0};
};

}  // namespace dtr
