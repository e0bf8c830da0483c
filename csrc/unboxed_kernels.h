// Unboxed kernels on kDTRKey for the commonest op signatures (Note [Unboxed
// kernels] in unboxed_kernels.cpp).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

namespace dtr {

// Registers the unboxed kernel for `op` on kDTRKey when its signature is one
// of those unboxed_kernels.cpp instantiates, it is a functional aten op with
// one tensor result (or one list of them), and a kernel on kDTRKey would not
// change how the dispatcher resolves its autograd key (see the Note). Null
// otherwise: the op keeps the boxed fallback.
std::optional<c10::RegistrationHandleRAII> register_unboxed_kernel(const c10::OperatorHandle& op);

}  // namespace dtr
