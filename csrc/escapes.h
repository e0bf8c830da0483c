// Escapes of C++ wrappers: the torch.Tensor methods that read raw memory.
//
// Note [Escapes of C++ wrappers]
// A DTRTensorImpl has no storage (Note [The wrapper]), and its Python type is
// torch.Tensor itself: torch wraps every C++ tensor in THPVariableClass
// (THPVariable_Wrap picks another class only for XLA), so it cannot get
// methods of its own the way dtr/tensor.py's DTRTensor does. What reads raw
// memory without dispatching an op (tolist, numpy and data_ptr read the data
// pointer in C++; untyped_storage, and through it torch.save, pickle and
// deepcopy, reads the storage; repr goes through tolist) fails on it with
// torch's "Cannot access storage", and nothing at the C++ level can step in:
// TensorImpl's data access is not virtual (has_storage() and data() read the
// storage_ field), and handing out the value's storage from the wrapper would
// need the wrapper to hold a storage that eviction frees and in-place ops
// rebind. So these few methods of torch.Tensor are replaced, once, when the
// first C++ runtime is made (install_escape_methods), by C method descriptors
// that test the C++ key set first (one bit) and call torch's own method
// unchanged for any other tensor: plain tensors and other subclasses see the
// same method, arguments and result, for the cost of one C call. For a C++
// wrapper the method either runs on its escaped value (Runtime::escape:
// materialized, its storage pinned, so a pointer, array or storage handed
// out stays valid; a wrapper that requires grad gives escaped_leaf, so
// numpy() refuses it as eager does), or, where the result must say more than
// the value (repr; the grad, requires_grad and attributes that deepcopy and
// torch.save keep), calls the escape function in dtr/tensor.py. Both run
// under NoCaptureGuard: what they compute from the value (repr's formatting,
// deepcopy's copy) stays plain instead of becoming values of an open block.
#pragma once

#include <torch/csrc/utils/pybind.h>

namespace dtr {

// Replaces the escape methods of `tensor_class` (torch.Tensor). `methods`
// maps a method name to a Python function taking the same arguments, or to
// None (run torch's method on the escaped value). Idempotent.
void install_escape_methods(pybind11::handle tensor_class, pybind11::dict methods);

// The value of a C++ wrapper as a plain tensor (pinned; see Runtime::escape),
// or `t` itself for any other tensor. Called with the GIL; releases it while
// the runtime works.
at::Tensor escaped_value(const at::Tensor& t);
// What a plain tensor holding t's value would be: a new leaf sharing the
// escaped value's memory that requires grad when t does (numpy() refuses it,
// torch.save keeps the flag, as for a plain tensor).
at::Tensor escaped_leaf(const at::Tensor& t);

}  // namespace dtr
