// The per-thread "mode" and the guard kernels run under.
//
// Note [Capturing plain-only ops]
// An op whose inputs are all plain tensors (the first op on a parameter) has
// no dtr tensor to route it to the fallback. While a block is open on a
// thread, kDTRKey is in that thread's TLS include set, so every op there
// reaches the fallback, which decides (Note [What gets wrapped] in
// dtr/runtime.py). Factories are not captured (BackendSelect redispatches
// with an explicit key set), which is what PITFALLS 10 wants; room is made
// for what they allocate on CPU through the counting allocator's hook (Note
// [Room for allocations outside ops] in plain_ops.cpp). The include
// bit is set and cleared on the raw key set: removing a backend key with
// DispatchKeySet subtraction keeps its backend bit, and a stray PrivateUse
// bit sends every later CPU op to a backend that does not exist.
#pragma once

#include <c10/core/impl/LocalDispatchKeySet.h>

#include "alloc_meter.h"

namespace dtr {

class Runtime;

// The runtime of the block open on this thread (null when none).
Runtime* active_runtime();

struct BlockToken {
  Runtime* previous = nullptr;
  bool was_included = false;
  meter::AllocationHookSetting previous_hook;  // Note [Room for allocations outside ops]
};
// Whether ops on this thread reach dtr now: a block is open and no kernel of
// dtr's own is running (BelowDTRGuard, NoCaptureGuard take kDTRKey out).
bool captured_now();
BlockToken enter_block(Runtime* rt);
void exit_block(const BlockToken& token);
// Takes this thread out of its block until exit_block(token): no op is
// captured and plain results stay plain (Note [Tracing outside the block] in
// dtr/compile.py).
BlockToken suspend_block();

// Sets the thread's included and excluded keys, computed by the guard that
// owns it from the keys it read first, and restores those at its end.
//
// Note [Writing the thread's keys in place]
// Where c10 exports the thread's key sets as a thread_local (every platform
// but MSVC and mobile, LocalDispatchKeySet.h), the guard reads and writes
// them there itself, through one address it looks up once: what
// tls_local_dispatch_key_set and _force_tls_local_dispatch_key_set do,
// without a call into libc10 and a TLS lookup each time (three of both per
// kernel run, about 75 instructions).
class KeySetsGuard {
 public:
  // Reads the thread's keys (before()); the owning guard then set()s its own.
  KeySetsGuard() : before_(read()) {}
  ~KeySetsGuard() { set(before_.included_, before_.excluded_); }
  KeySetsGuard(const KeySetsGuard&) = delete;
  KeySetsGuard& operator=(const KeySetsGuard&) = delete;

  const c10::impl::LocalDispatchKeySet& before() const { return before_; }

#if defined(_MSC_VER) || defined(C10_ANDROID) || defined(C10_IPHONE)
  void set(c10::DispatchKeySet included, c10::DispatchKeySet excluded) {
    c10::impl::LocalDispatchKeySet now = before_;
    now.included_ = included;
    now.excluded_ = excluded;
    c10::impl::_force_tls_local_dispatch_key_set(now);
  }

 private:
  static c10::impl::LocalDispatchKeySet read() { return c10::impl::tls_local_dispatch_key_set(); }
#else
  void set(c10::DispatchKeySet included, c10::DispatchKeySet excluded) {
    keys_->set_included(included);
    keys_->set_excluded(excluded);
  }

 private:
  // Read through the same address the guard writes through: one TLS lookup
  // for the guard's whole life, not a call into libc10 and another lookup.
  c10::impl::LocalDispatchKeySet read() const { return c10::impl::LocalDispatchKeySet(*keys_); }
  c10::impl::PODLocalDispatchKeySet* keys_ = &c10::impl::raw_local_dispatch_key_set;  // before before_
#endif
  c10::impl::LocalDispatchKeySet before_;
};

// Kernels run below dtr and below autograd: kDTRKey out of the TLS include
// set (so the plain values the op now has stay plain), autograd excluded (a
// recompute must not record a graph; see Note [Recompute below autograd] in
// dtr/runtime.py).
class BelowDTRGuard {
 public:
  BelowDTRGuard();

 private:
  KeySetsGuard guard_;
};

// Ops on plain tensors stay plain (kDTRKey out of the TLS include set; the
// block stays open: ops on dtr tensors still reach the fallback). Escapes run
// under it: what they compute from an escaped value is not a value of the block.
class NoCaptureGuard {
 public:
  NoCaptureGuard();

 private:
  KeySetsGuard guard_;
};

}  // namespace dtr
