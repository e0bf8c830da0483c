// What an op call needs, by (op, input metadata, arguments): its output bytes,
// its kernel's scratch bytes and its least-seen cost. Shared by every runtime
// in the process: a property of the op on those inputs (Note [Stable costs] in
// dtr/runtime.py), so the first runtime to see an (op, shapes) fills it.
//
// Note [One lock per op]
// The table's mutex is taken at most once per op, for the lookup, and only
// for a key the thread has not looked up before (Note [Per-thread copies of
// the op-memory table] in op_memory.cpp). An entry is never erased, so the
// pointer the lookup returns stays valid for the process, and
// its fields are relaxed atomics: a later update (the cost after the kernel
// ran, a corrected output size) needs no second lock. Two threads racing on
// one entry may each keep their own reading; each field stays a value one of
// them measured, which is all the runtime needs.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

namespace dtr {

struct OpMemory {
  static constexpr int64_t kUnmeasured = -1;

  std::atomic<int64_t> out_bytes{0};
  std::atomic<int64_t> scratch{kUnmeasured};  // Note [Measured op scratch] in dtr/scratch.py
  std::atomic<double> cost{-1.0};             // < 0: not run yet

  // Keeps the least cost seen (Note [Stable costs]) and returns it.
  double stable_cost(double seen);
  // Keeps the most scratch seen: a reservation must cover every run measured.
  void keep_scratch(int64_t seen) {
    if (seen > scratch.load(std::memory_order_relaxed)) {
      scratch.store(seen, std::memory_order_relaxed);
    }
  }
};

// The entry for `key`, or null when there is none yet.
OpMemory* find_op_memory(uint64_t key);
// The entry for `key`, made with `out_bytes` if there is none yet.
OpMemory* add_op_memory(uint64_t key, int64_t out_bytes);
// The scratch of every entry measured so far (for tests and dtr.scratch).
std::vector<int64_t> measured_scratch_bytes();

}  // namespace dtr
