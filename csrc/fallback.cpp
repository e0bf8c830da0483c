// The boxed fallback on kDTRKey: every op that sees a dtr tensor, or runs on
// a thread with an open block, comes here (below autograd).
//
// Note [What the fallback handles]
// Ops with a dtr tensor among their arguments go to its runtime
// (Runtime::dispatch: materialize -> make room -> run -> record). Ops with
// only plain tensors are captured by the block's TLS include (Note [Capturing
// plain-only ops]); they become dtr values only when autograd records them and
// they make new memory (Note [What gets wrapped] in dtr/runtime.py): under
// no_grad (optimizers), views of plain tensors, in-place writes into plain
// tensors and ops without tensor results run as they are.
//
// The boxed function is also registered directly on kDTRKey for the ops whose
// alias kernels would outrank the fallback or send the wrapper down another
// path than a plain tensor (Note [Direct registrations] in
// direct_registrations.cpp), and ops of the commonest signatures get an
// unboxed kernel that does the same (Note [Unboxed kernels] in
// unboxed_kernels.cpp). Ops registered later (custom ops) are picked up
// by register_new_ops(), which a block's entry calls through
// register_kernels_for_new_ops().
//
// Note [Scanning for new ops only when there are some]
// Finding the ops registered since the last block means listing every
// operator name (getAllOpNames: ~3,000 names copied, about 280 us, and as much
// again for the sparse keys' forwarding in sparse.cpp), which was most of the
// time an empty block took, and a tenth of a small model's step. A dispatcher
// registration listener counts schema registrations instead, and a block
// entry lists the names only when the count moved since the last scan.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <unordered_set>

#include "capture.h"
#include "direct_registrations.h"
#include "errors.h"
#include "fallback.h"
#include "grad_hook.h"
#include "op_traits.h"
#include "runtime.h"
#include "sparse.h"
#include "unboxed_kernels.h"
#include "wrapper.h"

namespace dtr {
namespace {

// The runtime of the first dtr tensor among the arguments (null if none).
Runtime* runtime_of_args(const torch::jit::Stack& stack, size_t first) {
  for (size_t i = first; i < stack.size(); ++i) {
    const c10::IValue& v = stack[i];
    if (v.isTensor()) {
      if (Runtime* rt = runtime_of(v.toTensor())) return rt;
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorList()) {
        if (Runtime* rt = runtime_of(t)) return rt;
      }
    } else if (v.isOptionalTensorList()) {
      for (std::optional<at::Tensor> t : v.toOptionalTensorList()) {
        if (Runtime* rt = t ? runtime_of(*t) : nullptr) return rt;
      }
    }
  }
  return nullptr;
}

bool wraps_plain_outputs(const OpTraits& traits) {
  return c10::GradMode::is_enabled() && traits.makes_new_storage() && !traits.unsupported;
}

void hook_plain_leaves(const torch::jit::Stack& stack, size_t first) {
  for (size_t i = first; i < stack.size(); ++i) {
    if (stack[i].isTensor()) hook_plain_leaf(stack[i].toTensor());
  }
}

void fallback(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  with_python_errors([&] {
    const size_t first = stack->size() - op.schema().arguments().size();
    const OpTraits& traits = op_traits(op);
    Runtime* active = active_runtime();
    Runtime* rt = runtime_taking_op(runtime_of_args(*stack, first), active, traits);
    if (rt == nullptr) {
      if (active != nullptr && c10::GradMode::is_enabled()) {
        hook_plain_leaves(*stack, first);
        // Note [Writes into what recipes read in C++] (hidden_writes.h). Under
        // no_grad (an optimizer's step) a write is the user's, as in Python.
        if (!traits.written.empty()) active->before_plain_writes(traits, *stack, first);
      }
      if (active != nullptr && active->allocates_plain(traits)) {
        active->run_plain(op, traits, stack);  // Note [Room for plain ops]
        return;
      }
      BelowDTRGuard below;
      op.callBoxed(stack);
      return;
    }
    if (traits.run_as) {
      rt->dispatch(*traits.run_as, stack);
    } else {
      rt->dispatch(op, traits, stack);
    }
  });
}

// Note [Scanning for new ops only when there are some]
struct CountDefinitions final : c10::OpRegistrationListener {
  void onOperatorRegistered(const c10::OperatorHandle&) override {
    definitions.fetch_add(1, std::memory_order_release);
  }
  void onOperatorDeregistered(const c10::OperatorHandle&) override {}
  static inline std::atomic<uint64_t> definitions{0};
};

std::mutex registration_mu;
std::unordered_set<std::string>* registered = nullptr;
std::vector<c10::RegistrationHandleRAII>* handles = nullptr;
size_t ops_seen = 0;

}  // namespace

Runtime* runtime_of(const at::Tensor& t) {
  DTRTensorImpl* w = t.defined() ? dtr_impl(t) : nullptr;
  return w != nullptr ? w->cell()->storage->runtime.get() : nullptr;
}

Runtime* runtime_taking_op(Runtime* owner, Runtime* active, const OpTraits& traits) {
  if (owner == nullptr && (active == nullptr || !wraps_plain_outputs(traits))) return nullptr;
  // A block open on this thread takes the op, also for tensors of a finished session.
  return active != nullptr ? active : owner;
}

void hook_plain_leaf(const at::Tensor& t) {
  if (t.defined() && t.requires_grad() && t.is_leaf()) ensure_plain_grad_hook(t);
}

void register_new_ops() {
  auto& d = c10::Dispatcher::singleton();
  std::lock_guard<std::mutex> g(registration_mu);
  if (registered == nullptr) {
    // Kept for the process: deregistering at exit would race torch's own teardown.
    registered = new std::unordered_set<std::string>();
    handles = new std::vector<c10::RegistrationHandleRAII>();
  }
  std::vector<c10::OperatorName> names = d.getAllOpNames();
  if (names.size() == ops_seen) return;
  ops_seen = names.size();
  for (const auto& name : names) {
    auto op = d.findOp(name);
    if (!op) continue;
    if (op->hasKernelForDispatchKey(kDTRKey)) continue;
    std::string key = c10::toString(name);
    if (registered->count(key)) continue;
    // Note [Unboxed kernels] in unboxed_kernels.cpp.
    if (auto handle = register_unboxed_kernel(*op)) {
      registered->insert(std::move(key));
      handles->push_back(std::move(*handle));
      continue;
    }
    if (!needs_direct_registration(*op)) continue;
    registered->insert(std::move(key));
    handles->push_back(d.registerImpl(name, kDTRKey,
                                      c10::KernelFunction::makeFromBoxedFunction<&fallback>(),
                                      std::nullopt, nullptr, "dtr direct registration"));
  }
}

void register_kernels_for_new_ops() {
  static std::mutex mu;
  static uint64_t scanned = 0;  // definitions counted when the last scan started
  static std::once_flag listening;
  std::call_once(listening, [] {
    // Kept for the process, as the registrations are. The dispatcher reports
    // every operator already defined to a new listener, so the count starts above 0.
    new c10::RegistrationHandleRAII(c10::Dispatcher::singleton().addRegistrationListener(
        std::make_unique<CountDefinitions>()));
  });
  std::lock_guard<std::mutex> g(mu);
  const uint64_t now = CountDefinitions::definitions.load(std::memory_order_acquire);
  if (now == scanned) return;
  scanned = now;
  register_new_ops();
  register_new_sparse_ops();  // Note [Sparse tensors in the C++ runtime]
}

}  // namespace dtr

TORCH_LIBRARY_IMPL(_, PrivateUse3, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&dtr::fallback>());
}

// Note [Autograd fallback for our key]
// Torch registers its autograd fallback (for ops without an autograd kernel:
// the c10d collectives, custom ops with only backend kernels) on every
// Autograd<Backend> key but AutogradPrivateUse2/3, which it leaves to the
// plug-in. Without one, c10d::allreduce_ on a dtr tensor, or on any tensor
// while a block is open, fails with "Could not run 'c10d::allreduce_' with
// arguments from the 'AutogradPrivateUse3' backend". This is the one
// AutogradCPU has.
TORCH_LIBRARY_IMPL(_, AutogradPrivateUse3, m) {
  m.fallback(torch::autograd::basicAutogradNotImplementedFallback());
}
