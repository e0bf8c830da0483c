// Sparse tensors in the C++ runtime.
//
// Note [Sparse tensors in the C++ runtime]
// As Note [Sparse tensors] in dtr/runtime.py: a sparse (COO, CSR, ...) tensor
// has no single storage, and a wrapper cannot take its layout, so sparse
// tensors are plain, unevictable values under dtr. A sparse input is a plain
// input (its index and value tensors are counted as plain memory, and its
// version is checked on recompute); a sparse output is returned as a plain
// tensor, counted the same way; dense results computed from sparse inputs are
// evictable as usual. While a block is open, kDTRKey's backend bit is in the
// thread's TLS include set (Note [Capturing plain-only ops]), so an op on a
// sparse tensor dispatches to Sparse/SparseCsr PrivateUse3, which have no
// kernels of their own: csrc/sparse.cpp registers fallbacks there that forward
// to dtr's kernel on kDTRKey, and, as Note [Direct registrations] in
// csrc/fallback.cpp explains, the same forwarding directly for each op with a
// CompositeExplicitAutograd(NonFunctional) kernel, which would otherwise run
// above dtr (addmm's makes a dense out= tensor for a sparse kernel).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace dtr {

inline bool is_sparse_value(const at::Tensor& t) {
  return t.defined() && t.layout() != c10::kStrided;
}

// Registers the forwarding on the sparse PrivateUse3 keys for every op with a
// composite kernel not registered yet; cheap when no op was added since.
void register_new_sparse_ops();

// The dense tensors a sparse tensor's memory is in.
std::vector<at::Tensor> sparse_parts(const at::Tensor& t);

}  // namespace dtr
