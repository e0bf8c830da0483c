#include "op_memory.h"

#include <memory>
#include <mutex>
#include <unordered_map>

#include "thread_state.h"

namespace dtr {
namespace {

std::mutex g_mu;
// unique_ptr values: the atomics inside cannot move, and rehashing moves nothing anyway.
std::unordered_map<uint64_t, std::unique_ptr<OpMemory>> g_table;

}  // namespace

double OpMemory::stable_cost(double seen) {
  double least = cost.load(std::memory_order_relaxed);
  while ((least < 0 || seen < least) &&
         !cost.compare_exchange_weak(least, seen, std::memory_order_relaxed)) {
  }
  return (least < 0 || seen < least) ? seen : least;
}

// Note [Per-thread copies of the op-memory table]
// Every op looks its entry up. Entries are never erased and never move, so a
// thread keeps the pointers it has found in a table of its own (in its state,
// thread_state.h) and takes the shared lock only for keys it has not seen yet
// (a mutex lock and unlock per op showed in the per-op profile).
static void remember(uint64_t key, OpMemory* memory) {
  ThreadState& s = thread_state();
  if (!s.exited) s.seen_op_memory.emplace(key, memory);
}

OpMemory* find_op_memory(uint64_t key) {
  ThreadState& s = thread_state();
  if (!s.exited) {
    auto hit = s.seen_op_memory.find(key);
    if (hit != s.seen_op_memory.end()) return hit->second;
  }
  std::lock_guard<std::mutex> g(g_mu);
  auto it = g_table.find(key);
  if (it == g_table.end()) return nullptr;
  remember(key, it->second.get());
  return it->second.get();
}

OpMemory* add_op_memory(uint64_t key, int64_t out_bytes) {
  std::lock_guard<std::mutex> g(g_mu);
  auto& slot = g_table[key];
  if (!slot) {
    slot = std::make_unique<OpMemory>();
    slot->out_bytes.store(out_bytes, std::memory_order_relaxed);
  }
  remember(key, slot.get());
  return slot.get();
}

std::vector<int64_t> measured_scratch_bytes() {
  std::lock_guard<std::mutex> g(g_mu);
  std::vector<int64_t> out;
  for (const auto& kv : g_table) {
    const int64_t n = kv.second->scratch.load(std::memory_order_relaxed);
    if (n != OpMemory::kUnmeasured) out.push_back(n);
  }
  return out;
}

}  // namespace dtr
