// The C++ runtime's per-thread objects, reached through one pointer.
//
// Note [The thread's state]
// The per-op path keeps a few objects per thread: the dtr block open on it,
// spare per-op vectors and stacks (kept for their capacity), the list a
// teardown drains, its copies of the op-memory and op-traits tables, and the
// live-object counts. As thread_locals of their own, each was reached through
// __tls_get_addr (Note [Initial-exec TLS] in bookkeeping_memory.cpp), about a
// dozen calls per op, and the live counts cost an atomic add per record made
// and freed, six per op. They live in one ThreadState instead, reached through
// one initial-exec pointer, and each thread counts its own records (one
// writer, no atomic add), summed when asked.
//
// A thread's state is made on its first use and freed when the thread ends.
// What runs on the thread after that (another thread_local's destructor
// dropping a dtr tensor) meets the process's shared `exited` state: it counts
// atomically, borrows no spares and keeps no teardown list.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/stack.h>
#include <c10/util/flat_hash_map.h>
#include <c10/util/intrusive_ptr.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace dtr {

class Runtime;
struct Cell;
struct OpMemory;
struct OpTraits;
struct StorageRecord;

// The storages an op (or a recompute) holds locked, held strongly so that one
// whose last cell goes during the op is still there to unlock.
using LockedStorages = std::vector<c10::intrusive_ptr<StorageRecord>>;

// What one Runtime::dispatch fills (Note [Per-op vectors reused] in runtime.cpp).
struct OpVectors {
  std::vector<c10::intrusive_ptr<Cell>> cells;  // per input; null for plain ones
  std::vector<at::Tensor> vals;
  LockedStorages locked;
};

// The records whose live objects are counted (Note [Live object counts]).
enum class Counted : uint8_t { kCell, kRecipe, kStorageRecord };
constexpr size_t kCountedKinds = 3;

struct ThreadState {
  explicit ThreadState(bool exited = false);
  ~ThreadState();
  ThreadState(const ThreadState&) = delete;
  ThreadState& operator=(const ThreadState&) = delete;

  const bool exited;  // the shared state of threads whose own state is gone
  Runtime* active_runtime = nullptr;  // the dtr block open on this thread (capture.h)
  std::vector<std::unique_ptr<OpVectors>> spare_op_vectors;  // runtime.cpp
  std::vector<std::unique_ptr<torch::jit::Stack>> spare_stacks;  // unboxed_kernels.cpp
  // Note [Iterative teardown] in records.h.
  std::vector<c10::intrusive_ptr<Cell>> dying_cells;
  bool draining = false;
  // Note [Per-thread copies of the op-memory table] in op_memory.cpp, and op_traits.cpp's.
  // Note [Per-op hash tables] in bookkeeping_memory.h.
  ska::flat_hash_map<uint64_t, OpMemory*> seen_op_memory;
  ska::flat_hash_map<const void*, const OpTraits*> seen_op_traits;
  // Written by this thread only (atomically in the exited state); a count may
  // go below zero here when another thread made what this one freed.
  std::array<std::atomic<int64_t>, kCountedKinds> live{};
};

extern constinit thread_local ThreadState* t_thread_state __attribute__((tls_model("initial-exec")));

ThreadState& make_thread_state();

inline ThreadState& thread_state() {
  ThreadState* s = t_thread_state;
  return s != nullptr ? *s : make_thread_state();
}

inline void count_live(Counted kind, int64_t delta) {
  ThreadState& s = thread_state();
  std::atomic<int64_t>& c = s.live[static_cast<size_t>(kind)];
  if (s.exited) {
    c.fetch_add(delta, std::memory_order_relaxed);
  } else {
    c.store(c.load(std::memory_order_relaxed) + delta, std::memory_order_relaxed);
  }
}

// Over every thread, those that ended included.
int64_t live_count(Counted kind);

}  // namespace dtr
