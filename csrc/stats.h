// Counters of one C++ runtime, read by dtr.Stats (the same fields).
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>

namespace dtr {

struct Stats {
  int64_t ops = 0;
  int64_t evictions = 0;
  int64_t eager_evictions = 0;
  int64_t rematerializations = 0;
  double remat_seconds = 0.0;
  double search_seconds = 0.0;
  double op_seconds = 0.0;
  int64_t peak_bytes = 0;
  int64_t tracked_bytes = 0;
  int64_t unplanned_ops = 0;
  int64_t oom_retries = 0;  // Note [Out of memory in C++]
  double recomputed_cost = 0.0;  // the pool's: summed costs of what it rematerialized
  int64_t thrash_guard_trips = 0;  // the pool's (Note [Thrash guard] in pool.cpp)
  // Note [Recording steps for lookahead]: ops of this block that followed the
  // previous step's plan, and the op where it diverged (-1: it did not, or no plan).
  int64_t plan_ops = 0;
  int64_t plan_diverged_at = -1;
  // op name -> (recomputations, seconds running that op, not its inputs' recomputes)
  std::unordered_map<std::string, std::pair<int64_t, double>> remat_by_op;
};

}  // namespace dtr
