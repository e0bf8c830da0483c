#include "capture.h"

#include "wrapper.h"

namespace dtr {
namespace {

thread_local Runtime* tls_runtime = nullptr;

const uint64_t kDTRBits = c10::DispatchKeySet(kDTRKey).raw_repr();

c10::DispatchKeySet without_dtr(c10::DispatchKeySet ks) {
  return c10::DispatchKeySet(c10::DispatchKeySet::RAW, ks.raw_repr() & ~kDTRBits);
}

c10::DispatchKeySet with_dtr(c10::DispatchKeySet ks) {
  return c10::DispatchKeySet(c10::DispatchKeySet::RAW, ks.raw_repr() | kDTRBits);
}

}  // namespace

Runtime* active_runtime() { return tls_runtime; }

BlockToken enter_block(Runtime* rt) {
  BlockToken token;
  token.previous = tls_runtime;
  auto local = c10::impl::tls_local_dispatch_key_set();
  token.was_included = (local.included_.raw_repr() & kDTRBits) == kDTRBits;
  local.included_ = with_dtr(local.included_);
  c10::impl::_force_tls_local_dispatch_key_set(local);
  tls_runtime = rt;
  return token;
}

BlockToken suspend_block() {
  BlockToken token;
  token.previous = tls_runtime;
  auto local = c10::impl::tls_local_dispatch_key_set();
  token.was_included = (local.included_.raw_repr() & kDTRBits) == kDTRBits;
  local.included_ = without_dtr(local.included_);
  c10::impl::_force_tls_local_dispatch_key_set(local);
  tls_runtime = nullptr;
  return token;
}

void exit_block(const BlockToken& token) {
  tls_runtime = token.previous;
  auto local = c10::impl::tls_local_dispatch_key_set();
  local.included_ = token.was_included ? with_dtr(local.included_) : without_dtr(local.included_);
  c10::impl::_force_tls_local_dispatch_key_set(local);
}

BelowDTRGuard::BelowDTRGuard() : BelowDTRGuard(c10::impl::tls_local_dispatch_key_set()) {}

BelowDTRGuard::BelowDTRGuard(c10::impl::LocalDispatchKeySet local)
    : guard_(local, without_dtr(local.included_),
             local.excluded_ | c10::autograd_dispatch_keyset_with_ADInplaceOrView) {}

NoCaptureGuard::NoCaptureGuard() : NoCaptureGuard(c10::impl::tls_local_dispatch_key_set()) {}

NoCaptureGuard::NoCaptureGuard(c10::impl::LocalDispatchKeySet local)
    : guard_(local, without_dtr(local.included_), local.excluded_) {}

}  // namespace dtr
