// Which ops get the boxed fallback registered directly on kDTRKey.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace dtr {

// Whether the dispatcher would give kDTRKey (or its autograd key) another
// kernel than the one a plain tensor reaches, unless the fallback is
// registered directly for `op` (Note [Direct registrations]).
bool needs_direct_registration(const c10::OperatorHandle& op);

}  // namespace dtr
