// Writes into what recipes read, in the C++ runtime: plain tensors written
// inside the block, and running statistics a kernel updates without saying so.
//
// Note [Writes into what recipes read in C++]
// As Note [Writes into what recipes read] in dtr/hidden_writes.py (the
// reference). A recipe reads a plain tensor (a buffer) as it was when the op
// first ran, and its recorded version makes a recompute refuse once the tensor
// changed (StaleInputError). Inside a block such a change can be part of the
// very step that needs the recompute: instance norm reads running_mean
// (`repeat`) and writes it (`copy_`) in the same module call, and its backward
// needs the `repeat` again. So before the runtime runs an op that writes a
// plain tensor, every live recipe input reading that tensor's storage gets an
// exact copy of what it saw (counted as plain memory while a recipe holds it).
// An op whose arguments are all plain runs below dtr (Note [What the fallback
// handles] in csrc/fallback.cpp), but with grad enabled the fallback first
// calls Runtime::before_plain_writes, as the Python runtime's mode sends such
// ops to its runtime. Under no_grad (an optimizer's step) the write is the
// user's own: a later recompute raises StaleInputError, in both runtimes.
//
// BatchNorm's running statistics in training are written without a write
// annotation (Note [Hidden running-stat updates] in dtr/ops.py). When one is a
// dtr tensor (instance norm passes `running_mean.repeat(b)`), the kernel gets a
// scratch copy and the updated copy is then written into the dtr tensor with
// copy_ through the runtime, so its recipe records the update.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>

#include <unordered_map>
#include <utility>
#include <vector>

#include "records.h"

namespace dtr {

// Recipe inputs that read plain tensors, by storage: what to copy before a write.
class PlainReaders {
 public:
  void add(const c10::intrusive_ptr<Recipe>& recipe, size_t input);
  // `t` is about to be written in place: the recipes reading its storage keep
  // what they saw; `count` is called on each copy made.
  void before_write(const at::Tensor& t, c10::function_ref<void(const at::Tensor&)> count);

 private:
  struct Readers {
    bookkeeping::Vector<std::pair<c10::weak_intrusive_ptr<Recipe>, size_t>> list;
    size_t prune_at = 64;  // Note [Pruning weak lists] (weak_lists.h)
  };
  bookkeeping::FlatMap<const c10::StorageImpl*, Readers> by_storage_;
  // Keys of storages no live recipe reads any more are dropped by a sweep once
  // the table doubles (a block reading a fresh plain tensor each step).
  size_t sweep_at_ = 1024;
};

// A copy of `t` with the same sizes, strides and storage offset (kernels may
// choose their path by layout). Runs below dtr.
at::Tensor exact_copy(const at::Tensor& t);

}  // namespace dtr
