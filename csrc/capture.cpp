#include "capture.h"

#include <c10/util/Exception.h>

#include "runtime.h"
#include "thread_state.h"
#include "wrapper.h"

namespace dtr {
namespace {

// Where a block is entered, left or suspended: the thread's own state.
ThreadState& block_state() {
  ThreadState& s = thread_state();
  TORCH_INTERNAL_ASSERT(!s.exited, "dtr: a block entered or left on a thread that has ended");
  return s;
}

const uint64_t kDTRBits = c10::DispatchKeySet(kDTRKey).raw_repr();

c10::DispatchKeySet without_dtr(c10::DispatchKeySet ks) {
  return c10::DispatchKeySet(c10::DispatchKeySet::RAW, ks.raw_repr() & ~kDTRBits);
}

c10::DispatchKeySet with_dtr(c10::DispatchKeySet ks) {
  return c10::DispatchKeySet(c10::DispatchKeySet::RAW, ks.raw_repr() | kDTRBits);
}

bool includes_dtr(c10::DispatchKeySet ks) {
  return (ks.raw_repr() & kDTRBits) == kDTRBits;
}

}  // namespace

Runtime* active_runtime() {
  const ThreadState* s = t_thread_state;  // a thread without a state has no block open
  return s != nullptr ? s->active_runtime : nullptr;
}

bool captured_now() {
  return includes_dtr(c10::impl::tls_local_dispatch_key_set().included_);
}

BlockToken enter_block(Runtime* rt) {
  ThreadState& s = block_state();
  BlockToken token;
  token.previous = s.active_runtime;
  token.previous_hook = meter::set_allocation_hook({&Runtime::before_allocation, rt});
  auto local = c10::impl::tls_local_dispatch_key_set();
  token.was_included = includes_dtr(local.included_);
  local.included_ = with_dtr(local.included_);
  c10::impl::_force_tls_local_dispatch_key_set(local);
  s.active_runtime = rt;
  return token;
}

BlockToken suspend_block() {
  ThreadState& s = block_state();
  BlockToken token;
  token.previous = s.active_runtime;
  token.previous_hook = meter::set_allocation_hook({});
  auto local = c10::impl::tls_local_dispatch_key_set();
  token.was_included = includes_dtr(local.included_);
  local.included_ = without_dtr(local.included_);
  c10::impl::_force_tls_local_dispatch_key_set(local);
  s.active_runtime = nullptr;
  return token;
}

void exit_block(const BlockToken& token) {
  block_state().active_runtime = token.previous;
  meter::set_allocation_hook(token.previous_hook);
  auto local = c10::impl::tls_local_dispatch_key_set();
  local.included_ = token.was_included ? with_dtr(local.included_) : without_dtr(local.included_);
  c10::impl::_force_tls_local_dispatch_key_set(local);
}

BelowDTRGuard::BelowDTRGuard() {
  const c10::impl::LocalDispatchKeySet& local = guard_.before();
  guard_.set(without_dtr(local.included_),
             local.excluded_ | c10::autograd_dispatch_keyset_with_ADInplaceOrView);
}

NoCaptureGuard::NoCaptureGuard() {
  const c10::impl::LocalDispatchKeySet& local = guard_.before();
  guard_.set(without_dtr(local.included_), local.excluded_);
}

}  // namespace dtr
