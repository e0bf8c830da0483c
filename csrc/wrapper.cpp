#include "wrapper.h"

#include "runtime.h"

namespace dtr {
namespace {

c10::DispatchKeySet wrapper_keys(const at::Tensor& value) {
  c10::DispatchKeySet ks = value.key_set() - c10::python_ks;
  ks = ks - c10::DispatchKeySet(c10::DispatchKey::PythonTLSSnapshot);
  return ks.add(kDTRKey);
}

}  // namespace

DTRTensorImpl::DTRTensorImpl(c10::DispatchKeySet ks, caffe2::TypeMeta dtype, c10::Device device,
                             c10::intrusive_ptr<Cell> cell)
    : c10::TensorImpl(ks, dtype, device), cell_(std::move(cell)) {
  set_storage_access_should_throw();
}

DTRTensorImpl::DTRTensorImpl(c10::intrusive_ptr<Cell> cell, const at::Tensor& value)
    : DTRTensorImpl(wrapper_keys(value), value.dtype(), value.device(), std::move(cell)) {
  sync_metadata(value);
}

void DTRTensorImpl::sync_metadata(const at::Tensor& value) {
  set_sizes_and_strides(value.sizes(), value.strides(), value.storage_offset());
}

// Only on a wrapper that is already owned (its refcount is positive).
void DTRTensorImpl::attach() {
  StorageRecord& rec = *cell_->storage;
  rec.nwrappers += 1;
  c10::intrusive_ptr<c10::TensorImpl> self =
      c10::intrusive_ptr<c10::TensorImpl>::unsafe_reclaim_from_nonowning(this);
  rec.wrappers.emplace_back(self);
}

void DTRTensorImpl::rebind(c10::intrusive_ptr<Cell> cell, const at::Tensor& value) {
  c10::intrusive_ptr<Cell> old = std::move(cell_);
  cell_ = std::move(cell);
  attach();
  sync_metadata(value);
  old->storage->runtime->wrapper_released(std::move(old));
}

template <typename Version>
c10::intrusive_ptr<c10::TensorImpl> DTRTensorImpl::copy_core(Version&& version,
                                                              bool allow_change) const {
  auto impl = c10::make_intrusive<DTRTensorImpl>(key_set(), dtype(), device(), cell_);
  copy_tensor_metadata(this, impl.get(), std::forward<Version>(version), allow_change);
  impl->refresh_numel();
  impl->refresh_contiguous();
  impl->attach();
  return impl;
}

c10::intrusive_ptr<c10::TensorImpl> DTRTensorImpl::shallow_copy_and_detach(
    const c10::VariableVersion& version_counter, bool allow_tensor_metadata_change) const {
  return copy_core(version_counter, allow_tensor_metadata_change);
}

c10::intrusive_ptr<c10::TensorImpl> DTRTensorImpl::shallow_copy_and_detach(
    c10::VariableVersion&& version_counter, bool allow_tensor_metadata_change) const {
  return copy_core(std::move(version_counter), allow_tensor_metadata_change);
}

void DTRTensorImpl::shallow_copy_from(const c10::intrusive_ptr<c10::TensorImpl>& impl) {
  auto* other = dynamic_cast<DTRTensorImpl*>(impl.get());
  TORCH_CHECK(other != nullptr, "dtr: cannot shallow-copy a ", impl->device(),
              " tensor into a dtr tensor; unwrap it with dtr.unwrap first");
  copy_tensor_metadata(other, this, version_counter(), allow_tensor_metadata_change());
  refresh_numel();
  refresh_contiguous();
  if (other->cell_.get() != cell_.get()) {
    c10::intrusive_ptr<Cell> old = std::move(cell_);
    cell_ = other->cell_;
    attach();
    old->storage->runtime->wrapper_released(std::move(old));
  }
}

void DTRTensorImpl::release_resources() {
  if (cell_) {
    Runtime* rt = cell_->storage->runtime.get();
    rt->wrapper_released(std::move(cell_));
  }
  c10::TensorImpl::release_resources();
}

at::Tensor make_wrapper(c10::intrusive_ptr<Cell> cell, const at::Tensor& value) {
  auto impl = c10::make_intrusive<DTRTensorImpl>(std::move(cell), value);
  impl->attach();
  return at::Tensor(std::move(impl));
}

}  // namespace dtr
