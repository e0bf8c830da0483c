// Registration of the boxed fallback (see fallback.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace dtr {

class Runtime;
struct OpTraits;

// The runtime of `t` if it is a dtr tensor; null for a plain or undefined one.
Runtime* runtime_of(const at::Tensor& t);

// Note [What the fallback handles]: the runtime that takes an op whose first
// dtr tensor argument belongs to `owner` (null: it has none) on a thread where
// `active`'s block is open (null: none is); null when the op runs below dtr
// as it is. Shared by the boxed fallback and the unboxed kernels.
Runtime* runtime_taking_op(Runtime* owner, Runtime* active, const OpTraits& traits);

// A parameter reached only through a view (Linear's weight.t()) still needs
// Note [Plain gradients] in dtr/runtime.py: its .grad would be a dtr tensor.
void hook_plain_leaf(const at::Tensor& t);

// Registers the fallback directly for every op not registered yet that
// needs_direct_registration (Note [Direct registrations]); cheap when no op
// was added since the last call.
void register_new_ops();
// What a block's entry calls: register_new_ops and sparse.h's
// register_new_sparse_ops, only when an operator was defined since the last
// call (Note [Scanning for new ops only when there are some] in fallback.cpp).
void register_kernels_for_new_ops();

}  // namespace dtr
