// In-place metadata ops on C++ wrappers: transpose_, squeeze_, as_strided_,
// resize_, set_, ... The Runtime's other methods are in csrc/runtime.cpp; the
// reference is dtr/metadata_ops.py.
//
// Note [In-place metadata ops in the C++ runtime]
// As Note [In-place metadata ops] in dtr/metadata_ops.py: the op runs on an
// alias of the materialized value (below dtr, so nothing else changes), and
// the wrapper is rebound to a new view cell in the same storage whose recipe
// is aten::as_strided(parent, size, stride, offset) with the metadata the op
// produced. Recomputing that is exact for any such op, and being a view cell
// it is evicted, recomputed and written through with its storage like every
// other view. Only the wrapper the op was called on changes (rebind syncs its
// sizes, strides and offset); its views and detached aliases keep their own
// cells and metadata, as in eager.
//
// `set_` with a dtr tensor of this session as source makes the target a view
// of the source's storage; `resize_` (and resize_as_, _resize_output_) while
// the new size fits in the storage it already has. What cannot be a view is
// refused with the Python runtime's messages.
//
// Note [Views taken before a metadata change] (dtr/metadata_ops.py) does not
// apply here: autograd replays a view of a C++ wrapper by as_strided with the
// view's own sizes, strides and offset (the wrapper is a plain TensorImpl whose
// device supports as_strided), not by the view function, so writing into a
// view taken before its base's transpose_ stays exact and is not refused.

#include <ATen/ATen.h>

#include "capture.h"
#include "errors.h"
#include "op_traits.h"
#include "runtime.h"
#include "wrapper.h"

namespace dtr {
namespace {

std::string base_name(const c10::OperatorHandle& op) {
  const std::string& full = op.schema().name();
  return full.substr(full.find("::") + 2);
}

bool is_resize(const std::string& base) {
  return base == "resize_" || base == "resize_as_" || base == "_resize_output_";
}

c10::OperatorHandle as_strided_op() {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("aten::as_strided", "");
  return op;
}

}  // namespace

void Runtime::dispatch_metadata_op(const c10::OperatorHandle& op, const OpTraits& traits,
                                   torch::jit::Stack* stack, size_t first,
                                   const std::vector<c10::IValue>& original,
                                   const std::vector<c10::intrusive_ptr<Cell>>& cells,
                                   const Slots& slots) {
  const std::string base = base_name(op);
  const size_t nargs = stack->size() - first;
  // The input cell of argument `arg` (null: plain, absent or another session's).
  auto cell_of = [&](int32_t arg) -> c10::intrusive_ptr<Cell> {
    for (size_t i = 0; i < slots.size(); ++i) {
      if (slots[i].arg == arg && slots[i].kind == Slot::kTensor) return cells[i];
    }
    return c10::intrusive_ptr<Cell>();
  };
  const c10::intrusive_ptr<Cell> target = cell_of(0);
  if (!target) {
    if (base == "set_") {
      throw DTRError(DTRError::kUnsupportedOp,
                     "dtr: " + traits.name +
                         " would make a plain tensor share the storage of a dtr tensor, whose "
                         "memory dtr may free and recompute at any time. Write `x = source` (or "
                         "`x = source.view(...)`) instead of `x.set_(source)`, or use "
                         "dtr.unwrap(source).");
    }
    // A plain target that only reads a dtr argument's metadata (resize_as_):
    // the stack holds the materialized values already.
    BelowDTRGuard below;
    op.callBoxed(stack);
    return;
  }
  const at::Tensor target_value = target->value;
  c10::intrusive_ptr<Cell> parent = target;
  at::Tensor w;
  if (base == "set_") {
    const c10::IValue* src = nargs > 1 ? &original[1] : nullptr;
    const DTRTensorImpl* src_impl =
        src && src->isTensor() && src->toTensor().defined() ? dtr_impl(src->toTensor()) : nullptr;
    if (src_impl == nullptr) {
      const char* what = src == nullptr || src->isNone() ? "nothing"
                         : src->isTensor()              ? "a plain tensor"
                                                        : "a raw storage";
      throw DTRError(DTRError::kUnsupportedOp,
                     "dtr: " + traits.name + " points a dtr tensor at " + what +
                         "; dtr can only follow a storage it computed itself. Make a new tensor "
                         "instead of re-pointing this one (for example `x = torch.empty(0)` "
                         "instead of `x.set_()`, or `x = source.as_strided(size, stride, "
                         "offset)`), or do it outside the dtr block.");
    }
    if (src_impl->cell()->storage->runtime.get() != this) {
      throw DTRError(DTRError::kUnsupportedOp,
                     "dtr: " + traits.name +
                         " joins dtr tensors of two different sessions; run it in the session "
                         "that made both, or use dtr.unwrap on one of them.");
    }
    parent = cell_of(1);
    TORCH_INTERNAL_ASSERT(parent && parent->value.defined(),
                          "dtr: set_'s source was not materialized");
    BelowDTRGuard below;
    w = at::empty({0}, target_value.options());
  } else {
    if (is_resize(base)) {
      std::vector<int64_t> size;
      if (base == "resize_as_") {
        size = (*stack)[first + 1].toTensor().sizes().vec();
      } else {
        size = (*stack)[first + 1].toIntVector();
      }
      int64_t numel = 1;
      for (int64_t s : size) numel *= s;
      const int64_t need = (target_value.storage_offset() + numel) *
                           static_cast<int64_t>(target_value.element_size());
      const int64_t have = static_cast<int64_t>(target_value.storage().nbytes());
      if (need > have) {
        throw DTRError(DTRError::kUnsupportedOp,
                       "dtr: " + traits.name + " would grow the storage of a dtr tensor from " +
                           std::to_string(have) + " to " + std::to_string(need) +
                           " bytes; dtr cannot follow a storage that changes size. Make a new "
                           "tensor instead (for example `x = x.new_empty(size)`: the elements "
                           "resize_ adds are uninitialized anyway, or `torch.cat` to append), or "
                           "do it outside the dtr block.");
      }
    }
    BelowDTRGuard below;
    w = at::alias(target_value);
  }
  (*stack)[first] = w;
  {
    BelowDTRGuard below;
    op.callBoxed(stack);
  }

  auto recipe = c10::make_intrusive<Recipe>(as_strided_op());
  recipe->args = {c10::IValue(), c10::IValue(w.sizes().vec()), c10::IValue(w.strides().vec()),
                  c10::IValue(w.storage_offset())};
  recipe->slots = {Slot{0, -1, Slot::kTensor}};
  recipe->extra().list_sizes = {0, 0, 0, 0};
  recipe->grad_enabled = false;
  recipe->inputs.resize(1);
  recipe->inputs[0].cell = parent;
  auto cell = c10::make_intrusive<Cell>(recipe, 0, /*view_src=*/0, parent->storage);
  cell->value = w;
  recipe->outputs.emplace_back(cell);
  parent->storage->add_cell(cell);

  // Eager returns the tensor the op was called on, now with the new metadata.
  const at::Tensor& self = original[0].toTensor();
  dtr_impl(self)->rebind(cell, w);
  stack->resize(first);
  stack->push_back(self);
}

}  // namespace dtr
