// Plain gradients for plain leaves (see Note [Plain gradients] in dtr/runtime.py).
#pragma once

#include <ATen/core/Tensor.h>

namespace dtr {

// Makes sure that the gradient AccumulateGrad stores in `leaf` is a plain,
// concrete tensor: a post-accumulate-grad hook escapes a dtr gradient. Hooks
// already there run after it. Cheap when the hook is already installed.
void ensure_plain_grad_hook(const at::Tensor& leaf);

}  // namespace dtr
