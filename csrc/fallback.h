// Registration of the boxed fallback (see fallback.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace dtr {

struct OpTraits;

// A parameter reached only through a view (Linear's weight.t()) still needs
// Note [Plain gradients] in dtr/runtime.py: its .grad would be a dtr tensor.
void hook_plain_leaf(const at::Tensor& t);

// Whether an op with only plain tensor arguments, run while a block is open,
// makes values the runtime records (Note [What the fallback handles]).
bool wraps_plain_outputs(const OpTraits& traits);

// Registers the fallback directly for every op not registered yet that
// needs_direct_registration (Note [Direct registrations]); cheap when no op
// was added since the last call.
void register_new_ops();
// What a block's entry calls: register_new_ops and sparse.h's
// register_new_sparse_ops, only when an operator was defined since the last
// call (Note [Scanning for new ops only when there are some] in fallback.cpp).
void register_kernels_for_new_ops();

}  // namespace dtr
