// Walking the tensors of an argument or return value, and a storage's size as
// the allocator counts it: shared by the per-op path (runtime.cpp), in-place
// ops (mutation.cpp) and writes into what recipes read (hidden_writes.cpp), so
// that all of them see the same tensors in the same order.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <optional>

namespace dtr {

// Calls f(tensor) for every tensor of a return or argument value, in order;
// an absent optional tensor is passed as an undefined tensor.
template <typename F>
void for_each_tensor(const c10::IValue& v, F&& f) {
  if (v.isTensor()) {
    f(v.toTensor());
  } else if (v.isTensorList()) {
    for (const at::Tensor& t : v.toTensorList()) f(t);
  } else if (v.isOptionalTensorList()) {
    for (std::optional<at::Tensor> t : v.toOptionalTensorList()) f(t ? *t : at::Tensor());
  } else if (v.isList()) {  // Tensor[][] (c10d's allgather_, reduce_scatter_)
    for (const c10::IValue& e : v.toListRef()) {
      if (e.isTensorList()) for_each_tensor(e, f);
    }
  }
}

// Bytes the device's allocator takes for a storage (see allocated_bytes in dtr/runtime.py).
inline int64_t storage_bytes(const at::Tensor& t) {
  int64_t n = static_cast<int64_t>(t.storage().nbytes());
  if (t.is_cuda() && n) n = (n + 511) & ~int64_t(511);
  return n;
}

}  // namespace dtr
