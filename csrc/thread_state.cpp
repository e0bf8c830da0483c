// Note [The thread's state] (thread_state.h).
#include "thread_state.h"

#include <algorithm>
#include <mutex>

#include "records.h"

namespace dtr {

constinit thread_local ThreadState* t_thread_state __attribute__((tls_model("initial-exec"))) = nullptr;

namespace {

// Every state whose counts live_count sums; a state leaves it when its thread
// ends, adding its counts to `ended`. Never destroyed: threads end until exit.
struct Registry {
  std::mutex mu;
  std::vector<ThreadState*> states;
  std::array<int64_t, kCountedKinds> ended{};
};

Registry& registry() {
  static auto* r = new Registry();
  return *r;
}

ThreadState& exited_state() {
  static auto* s = new ThreadState(/*exited=*/true);
  return *s;
}

// Frees the thread's state when the thread ends; a thread_local of its own,
// reached once per thread.
struct StateOwner {
  ThreadState* state = new ThreadState();
  StateOwner() { t_thread_state = state; }
  ~StateOwner() {
    t_thread_state = &exited_state();
    delete state;
  }
};

}  // namespace

ThreadState::ThreadState(bool exited) : exited(exited) {
  Registry& r = registry();
  std::lock_guard<std::mutex> g(r.mu);
  r.states.push_back(this);
}

ThreadState::~ThreadState() {
  Registry& r = registry();
  std::lock_guard<std::mutex> g(r.mu);
  r.states.erase(std::find(r.states.begin(), r.states.end(), this));
  for (size_t k = 0; k < kCountedKinds; ++k) r.ended[k] += live[k].load(std::memory_order_relaxed);
}

ThreadState& make_thread_state() {
  thread_local StateOwner owner;  // constructed here once per thread
  return *t_thread_state;
}

int64_t live_count(Counted kind) {
  const auto k = static_cast<size_t>(kind);
  Registry& r = registry();
  std::lock_guard<std::mutex> g(r.mu);
  int64_t n = r.ended[k];
  for (const ThreadState* s : r.states) n += s->live[k].load(std::memory_order_relaxed);
  return n;
}

}  // namespace dtr
