// Note [Composites that read index tensors]
// A few ops have only a CompositeImplicitAutograd kernel, and that kernel reads
// the data of an integer tensor argument itself: tensor_split with a tensor of
// indices (data_ptr<int64_t>), ctc_loss with tensors of lengths (copied into a
// vector). Composites run above autograd, on AutogradPrivateUse3 for a C++
// wrapper, before any kernel of ours, and a wrapper has no storage: torch's
// "Cannot access data pointer of Tensor that doesn't have storage" (issue 13's
// OpInfo sweep: 11 samples). These ops get a kernel on AutogradPrivateUse3
// that escapes the wrappers among their integer tensor arguments
// (Runtime::escape: materialized and pinned, as .tolist() would, since their
// values are read anyway) and then runs the op's CompositeImplicitAutograd
// kernel with the other arguments unchanged, so its decomposed ops reach the
// runtime (and autograd) as any composite's do. Integer tensors carry no
// gradient, so nothing autograd records changes. The ops are listed by name:
// which composites read data is not in their schemas.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "errors.h"
#include "records.h"
#include "runtime.h"
#include "wrapper.h"

namespace dtr {
namespace {

void escape_index_tensors_then_decompose(const c10::OperatorHandle& op, c10::DispatchKeySet,
                                         torch::jit::Stack* stack) {
  with_python_errors([&] {
    const size_t first = stack->size() - op.schema().arguments().size();
    for (size_t i = first; i < stack->size(); ++i) {
      if (!(*stack)[i].isTensor()) continue;
      const at::Tensor& t = (*stack)[i].toTensor();
      DTRTensorImpl* w = t.defined() ? dtr_impl(t) : nullptr;
      if (w == nullptr || !c10::isIntegralType(t.scalar_type(), /*includeBool=*/true)) continue;
      c10::intrusive_ptr<Cell> cell = w->cell();
      (*stack)[i] = cell->storage->runtime->escape(cell);
    }
    op.callBoxedForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd, *stack);
  });
}

}  // namespace
}  // namespace dtr

TORCH_LIBRARY_IMPL(aten, AutogradPrivateUse3, m) {
  for (const char* name : {"tensor_split.tensor_indices_or_sections", "ctc_loss.Tensor"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&dtr::escape_index_tensors_then_decompose>());
  }
}
