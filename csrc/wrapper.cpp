#include "wrapper.h"

#include "runtime.h"

#include <c10/core/AutogradState.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/graph_task.h>

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

// TensorImpl's own fields, read on another TensorImpl (the value): a member
// pointer formed in a subclass names a protected member lawfully.
struct ValueFields : c10::TensorImpl {
  static constexpr auto sizes_and_strides = &ValueFields::sizes_and_strides_;
};

// Note [Copying a value's metadata]
// A wrapper's sizes, strides, offset, element count and layout flags are its
// value's, which the value's TensorImpl has already worked out.
// set_sizes_and_strides would check them again and recompute every flag
// (contiguity, channels-last, dense), about 200 instructions a wrapper, one
// or more per op; copying the value's costs a quarter of that. Sizes and
// strides are copied as one object (a fixed-size copy while inline, five
// dimensions or fewer), not set one list at a time. A value with
// symbolic or custom sizes (none today: values are plain strided tensors)
// takes the general path.
void DTRTensorImpl::sync_metadata(const at::Tensor& value) {
  const c10::TensorImpl* v = value.unsafeGetTensorImpl();
  if (C10_UNLIKELY(v->has_symbolic_sizes_strides() || v->layout() != c10::kStrided ||
                   has_symbolic_sizes_strides_)) {
    set_sizes_and_strides(value.sizes(), value.strides(), value.storage_offset());
    return;
  }
  sizes_and_strides_ = v->*ValueFields::sizes_and_strides;
  storage_offset_ = v->storage_offset();
  numel_ = v->numel();
  is_contiguous_ = v->is_contiguous(c10::MemoryFormat::Contiguous);
  is_channels_last_contiguous_ = v->is_contiguous(c10::MemoryFormat::ChannelsLast);
  is_channels_last_3d_contiguous_ = v->is_contiguous(c10::MemoryFormat::ChannelsLast3d);
  is_channels_last_ = v->is_strides_like(c10::MemoryFormat::ChannelsLast);
  is_channels_last_3d_ = v->is_strides_like(c10::MemoryFormat::ChannelsLast3d);
  is_non_overlapping_and_dense_ = v->is_non_overlapping_and_dense();
}

// Only on a wrapper that is already owned (its refcount is positive).
void DTRTensorImpl::attach() {
  StorageRecord& rec = *cell_->storage;
  rec.nwrappers += 1;
  // Views and autograd's saved copies share their base's record, so lists
  // grow past one: starting at four spares the reallocations at two and
  // three (half a block taken and given back per op on the TreeLSTM).
  if (rec.wrappers.capacity() == 0) rec.wrappers.reserve(4);
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

// Note [Gradients accumulate in place]
// Autograd sums the gradients a tensor gets from several uses in its input
// buffer (torch/csrc/autograd/input_buffer.cpp), in place into one of them
// when that one is all that can see its memory: a plain tensor whose last
// reference the buffer holds, and whose storage's too. A wrapper has no
// storage, so every sum was out of place, a new tensor each time. For a
// weight used at every node of a TreeLSTM (393 KiB of gradient, about a
// hundred uses a step) that is a fresh block of memory written per use, where
// eager writes into the gradient it has just read: 116 of the 128 last-level
// write misses dtr added per op to the TreeLSTM's step (bench.cache_misses,
// docs/performance.md, eleventh session). So a wrapper reports a storage of
// its own, empty and held by it alone, exactly where the buffer would add in
// place and dtr agrees: inside a backward pass, with grad mode off (the only
// case where the buffer writes), while the block is open, and when it is the
// one wrapper of its value's storage and the value was never handed out
// plain (Runtime::only_wrapper_sees). The buffer's own test (its reference
// is the last) does the rest. The add_ then runs as any in-place op on a dtr
// tensor. Everywhere else storage access still throws. The empty storage is
// also storage_, so that raw data access, which reads storage_ directly after
// asking has_storage(), fails with torch's error instead of reading null. It
// is made under the runtime's lock, where it is decided: two threads asking
// at once (the wrapper held elsewhere too) would otherwise both assign it.
bool DTRTensorImpl::has_storage() const {
  if (!cell_ || c10::GradMode::is_enabled() || torch::autograd::get_current_graph_task_id() < 0) {
    return false;
  }
  auto* self = const_cast<DTRTensorImpl*>(this);
  return cell_->storage->runtime->only_wrapper_sees(*cell_, [self] {
    if (!self->storage_) {
      self->storage_ = c10::Storage(c10::Storage::use_byte_size_t(), 0,
                                    c10::DataPtr(nullptr, self->device()), /*allocator=*/nullptr,
                                    /*resizable=*/false);
    }
  });
}

const c10::Storage& DTRTensorImpl::storage() const {
  if (!has_storage()) return c10::TensorImpl::storage();  // throws "Cannot access storage"
  return storage_;
}

// Note [Wrappers share their value's version counter]
// TensorImpl's constructor gives every tensor made outside inference mode a
// version counter of its own: a heap block made and freed per op, through
// glibc's malloc (docs/performance.md, tenth session). A new wrapper instead shares
// the counter of the value it wraps, which the kernel has just made (at 0,
// like a fresh eager output) and which nothing else bumps: kernels run on
// values below ADInplaceOrView (BelowDTRGuard), so only writes through the
// wrapper move it. An escaped value (dtr.unwrap) written in place bumps its
// wrapper too, as a write through eager's .detach() does. A view's counter is
// replaced by its base's above dtr (autograd's as_view), as in eager. The
// constructor runs with the inference flag set so that it makes no counter,
// and the key set it would have made outside inference mode is then restored
// by the constructor's own rule (c10/core/TensorImpl.cpp).
c10::intrusive_ptr<DTRTensorImpl> DTRTensorImpl::make(c10::intrusive_ptr<Cell> cell,
                                                      const at::Tensor& value,
                                                      c10::AutogradState& state) {
  const c10::DispatchKeySet ks = wrapper_keys(value);
  c10::intrusive_ptr<DTRTensorImpl> impl;
  if (state.get_inference_mode()) {  // an inference tensor, as eager's output would be
    impl = c10::make_intrusive<DTRTensorImpl>(ks, value.dtype(), value.device(), std::move(cell));
  } else {
    {
      struct InferenceFlag {
        c10::AutogradState& state;
        explicit InferenceFlag(c10::AutogradState& s) : state(s) { state.set_inference_mode(true); }
        ~InferenceFlag() { state.set_inference_mode(false); }
      } flag(state);
      impl = c10::make_intrusive<DTRTensorImpl>(ks, value.dtype(), value.device(), std::move(cell));
    }
    const c10::BackendComponent k = ks.highestBackendKey();
    impl->key_set_ = ((ks | c10::getAutocastRelatedKeySetFromBackend(k)) - c10::python_ks) |
                     c10::getAutogradRelatedKeySetFromBackend(k);
    const c10::VariableVersion& counter = value.unsafeGetTensorImpl()->version_counter();
    impl->version_counter_ = counter.enabled() ? counter : c10::VariableVersion(/*version=*/0);
  }
  impl->sync_metadata(value);
  return impl;
}

at::Tensor make_wrapper(c10::intrusive_ptr<Cell> cell, const at::Tensor& value,
                        c10::AutogradState& autograd) {
  c10::intrusive_ptr<DTRTensorImpl> impl = DTRTensorImpl::make(std::move(cell), value, autograd);
  impl->attach();
  return at::Tensor(std::move(impl));
}

}  // namespace dtr
