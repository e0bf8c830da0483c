// Note [Live object counts]
// How many cells, recipes and storage records exist right now, over every C++
// runtime of the process. A runtime that leaks shows here long before it shows
// as memory: tests/test_soak.py checks that these stay flat over hundreds of
// training steps. Each thread counts what it makes and frees in its own state
// (Note [The thread's state] in thread_state.h), without an atomic add: an
// atomic add per construction and destruction was six per op.
#pragma once

#include <cstdint>

#include "thread_state.h"

namespace dtr {

template <Counted kind>
struct LiveCount {
  LiveCount() { count_live(kind, 1); }
  LiveCount(const LiveCount&) { count_live(kind, 1); }
  LiveCount& operator=(const LiveCount&) = default;
  ~LiveCount() { count_live(kind, -1); }
};

}  // namespace dtr
