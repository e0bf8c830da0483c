// Plain-only ops that allocate while a block with a limit is open.
//
// Note [Room for plain ops]
// An op with no dtr tensor among its arguments runs plain when its outputs
// are not to become dtr values (Note [What the fallback handles]): under
// no_grad, which is every op of a backward pass. Most of a backward's ops read
// a dtr gradient and go through Runtime::dispatch, which makes room first; but
// an autograd formula that starts from a factory does not. max(dim)'s backward
// (value_selecting_reduction_backward) is zeros(sizes) and then a scatter_
// into it: the zeros were allocated with no room made, and a random program
// passed its budget by them (34 bytes) at the backward's peak. So such an op
// gets room for its outputs and its scratch, planned and measured as a dtr
// op's are (one entry per op and argument metadata, Note [One lock per op]),
// and then runs as it is. Without a limit nothing is planned.
//
// Note [Room for allocations outside ops]
// Factories (torch.zeros, torch.empty, ...) never reach the fallback: their
// BackendSelect kernel redispatches to the device's key alone (Note
// [Capturing plain-only ops]). A model's torch.zeros in forward, and a
// backward formula's at::zeros (max(dim)'s value_selecting_reduction_backward,
// which decomposes above dtr), allocated with no room made. On CPU the
// counting allocator calls Runtime::before_allocation first, on the thread
// with the block open, for what it is about to allocate; room is made there
// unless the allocation is one dtr already made room for: a kernel dtr runs
// (below dtr, so not captured_now()) or dtr's own bookkeeping (under the
// runtime's lock). The lock is only tried: a thread holding the GIL in an
// allocation (torch.tensor from a list) must not wait for a thread that holds
// the lock and waits for the GIL (a Python policy); that allocation then goes
// unchecked, as it did before. An infeasible budget raises the dtr error from
// the allocation, and nothing is allocated.
#include <ATen/core/dispatch/Dispatcher.h>

#include "capture.h"
#include "errors.h"
#include "op_memory.h"
#include "op_traits.h"
#include "runtime.h"
#include "scratch.h"
#include "tensor_walk.h"

namespace dtr {

bool Runtime::allocates_plain(const OpTraits& traits) {
  return limited_.load(std::memory_order_relaxed) && traits.makes_new_storage() &&
         !traits.unsupported;
}

void Runtime::run_plain(const c10::OperatorHandle& op, const OpTraits& traits,
                        torch::jit::Stack* stack) {
  Lock g(mu_);
  if (!limit_) {  // lifted since allocates_plain looked
    BelowDTRGuard below;
    op.callBoxed(stack);
    return;
  }
  const size_t first = stack->size() - op.schema().arguments().size();
  OpMemory* memory = nullptr;
  const int64_t planned = planned_output_bytes(op, traits, *stack, first, &memory);
  std::vector<at::Tensor> inputs;  // for the estimate of an unmeasured op's scratch
  for (size_t i = first; i < stack->size(); ++i) {
    for_each_tensor((*stack)[i], [&](const at::Tensor& t) {
      if (t.defined()) inputs.push_back(t);
    });
  }
  std::optional<c10::Device> device;
  if (!inputs.empty()) device = inputs[0].device();
  for (int d : traits.device_args) {
    const c10::IValue& v = (*stack)[first + d];
    if (!device && v.isDevice()) device = v.toDevice();
  }
  const PlannedScratch scratch = planned_scratch(memory, traits.workspace, planned, inputs,
                                                 !device || device->is_cpu());
  const int64_t need = planned + scratch.bytes;
  if (need > 0) {
    make_room(need, traits.name, need);
    note_peak(need);
  }
  int64_t seen = -1;
  {
    ScratchWindow window(scratch.measure);
    BelowDTRGuard below;
    op.callBoxed(stack);
    seen = window.close();
  }
  if (seen >= 0) memory->keep_scratch(seen);
  for (size_t i = first; i < stack->size(); ++i) {
    for_each_tensor((*stack)[i], [&](const at::Tensor& t) {
      if (t.defined()) count_plain(t);
    });
  }
  note_peak();
}

void Runtime::before_allocation(void* runtime, int64_t nbytes) {
  auto* rt = static_cast<Runtime*>(runtime);
  if (!rt->limited_.load(std::memory_order_relaxed) || rt->mu_.held_here() || !captured_now()) {
    return;
  }
  Lock g(rt->mu_, std::try_to_lock);
  if (!g.owns_lock() || !rt->limit_ || rt->closed_) return;
  with_python_errors([&] {
    rt->make_room(nbytes, "an allocation outside any op (a factory such as torch.zeros)", nbytes);
  });
  rt->note_peak(nbytes);
}

}  // namespace dtr
