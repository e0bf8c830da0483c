// The TensorImpl user code holds in place of an evictable value.
//
// Note [The wrapper]
// A DTRTensorImpl carries its value's metadata (sizes, strides, offset, dtype,
// device) and a reference to its Cell; the data lives in the cell, which the
// runtime may evict and recompute at any time. Its key set is the value's
// minus the Python keys plus the runtime's backend key (kDTRKey), so ops that
// see one reach the boxed fallback (csrc/fallback.cpp), and the TensorImpl
// constructor adds that key's autograd key: autograd runs above the wrapper
// with its ordinary kernels. The device reported is the value's own (a
// PrivateUse device aborts in autograd's InputMetadata). Storage access throws;
// the torch.Tensor methods that read raw memory escape the value first (Note
// [Escapes of C++ wrappers] in escapes.h), other readers need dtr.unwrap. The
// one exception is autograd's gradient buffer (Note [Gradients accumulate in
// place] in wrapper.cpp).
// Shallow copies (autograd's SavedVariable, detach) share the cell and count
// as wrappers of its storage.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/AutogradState.h>
#include <c10/core/TensorImpl.h>

#include <typeinfo>

#include "bookkeeping_memory.h"
#include "records.h"

namespace dtr {

// The backend key of dtr tensors. PrivateUse3: accelerator plug-ins take
// PrivateUse1 first.
constexpr c10::DispatchKey kDTRKey = c10::DispatchKey::PrivateUse3;
constexpr c10::BackendComponent kDTRBackend = c10::BackendComponent::PrivateUse3Bit;

// Allocated from bookkeeping memory (Note [Bookkeeping memory]).
class DTRTensorImpl final : public c10::TensorImpl, public bookkeeping::Object {
 public:
  DTRTensorImpl(c10::DispatchKeySet ks, caffe2::TypeMeta dtype, c10::Device device,
                c10::intrusive_ptr<Cell> cell);

  // A wrapper of `value` sharing its version counter (Note [Wrappers share
  // their value's version counter] in wrapper.cpp).
  // `autograd` is the thread's AutogradState, which the caller may have at hand.
  static c10::intrusive_ptr<DTRTensorImpl> make(c10::intrusive_ptr<Cell> cell,
                                                const at::Tensor& value,
                                                c10::AutogradState& autograd);

  const c10::intrusive_ptr<Cell>& cell() const { return cell_; }
  // Points this wrapper at another cell (in-place ops rebind every alias).
  void rebind(c10::intrusive_ptr<Cell> cell, const at::Tensor& value);
  // Copies sizes and strides from the value (after in-place metadata changes).
  void sync_metadata(const at::Tensor& value);

  c10::intrusive_ptr<c10::TensorImpl> shallow_copy_and_detach(
      const c10::VariableVersion& version_counter,
      bool allow_tensor_metadata_change) const override;
  c10::intrusive_ptr<c10::TensorImpl> shallow_copy_and_detach(
      c10::VariableVersion&& version_counter,
      bool allow_tensor_metadata_change) const override;
  void shallow_copy_from(const c10::intrusive_ptr<c10::TensorImpl>& impl) override;
  void release_resources() override;
  // A storage of its own only where autograd may add a gradient into it in
  // place (Note [Gradients accumulate in place] in wrapper.cpp); else none.
  bool has_storage() const override;
  const c10::Storage& storage() const override;

 private:
  const char* tensorimpl_type_name() const override { return "DTRTensorImpl"; }
  template <typename Version>
  c10::intrusive_ptr<c10::TensorImpl> copy_core(Version&& version, bool allow_change) const;
  friend at::Tensor make_wrapper(c10::intrusive_ptr<Cell> cell, const at::Tensor& value,
                                 c10::AutogradState& autograd);
  // Counts this wrapper in its storage record.
  void attach();

  c10::intrusive_ptr<Cell> cell_;
};

// Asked for every argument of every op: DTRTensorImpl is final, so comparing
// the dynamic type is exact, and cheaper than a dynamic_cast (which walks the
// class hierarchy).
inline DTRTensorImpl* dtr_impl(const at::TensorBase& t) {
  c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (!impl->key_set().has_backend(kDTRBackend)) return nullptr;
  return typeid(*impl) == typeid(DTRTensorImpl) ? static_cast<DTRTensorImpl*>(impl) : nullptr;
}

inline bool is_dtr(const at::TensorBase& t) { return t.defined() && dtr_impl(t) != nullptr; }

// A new wrapper of `value`, which lives in `cell`. The thread's AutogradState
// is a call into libc10 and a TLS lookup: an op that has already looked it up
// passes it.
at::Tensor make_wrapper(c10::intrusive_ptr<Cell> cell, const at::Tensor& value,
                        c10::AutogradState& autograd);
inline at::Tensor make_wrapper(c10::intrusive_ptr<Cell> cell, const at::Tensor& value) {
  return make_wrapper(std::move(cell), value, c10::AutogradState::get_tls_state());
}

}  // namespace dtr
