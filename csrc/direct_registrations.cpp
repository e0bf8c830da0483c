// Note [Direct registrations]
// A backend fallback comes last in the dispatcher's choice of a kernel for a
// key (OperatorEntry::computeDispatchTableEntryWithDebug): a kernel
// registered on the key itself, then one on an alias key that covers it, then
// the fallback. Two kinds of alias kernels would take our key from the boxed
// fallback, so the same boxed function is registered directly on kDTRKey for
// the ops that have them:
//  - CompositeExplicitAutograd(NonFunctional) kernels cover every backend key,
//    ours included: structured ops (add, mm, neg) would run their composite
//    kernel on the wrapper and fail on its missing storage.
//  - CompositeImplicitAutograd kernels cover the autograd keys of backends
//    with no kernel of their own. An op with one and a backend kernel
//    (mish_backward: CPU and CUDA kernels) decomposes above
//    autograd on AutogradPrivateUse3 (a backend fallback is not a kernel of
//    the backend), while a plain CPU tensor's AutogradCPU takes the Autograd
//    kernel and then the CPU kernel: the two differ in the last bits. With a
//    direct kernel on kDTRKey the dispatcher resolves AutogradPrivateUse3 as
//    it resolves AutogradCPU (the Autograd kernel, else the autograd fallback),
//    so forward, backward and double backward are eager's, errors included
//    (native_channel_shuffle has no derivative on CPU, in eager as in dtr).
//    That holds for every device only if the op has a kernel on every dense
//    backend this torch was built with: an op with a CPU kernel and no CUDA
//    one decomposes in eager on CUDA, and one entry per op cannot follow the
//    wrapper's device (native_channel_shuffle: registered on the CPU wheel,
//    not on a CUDA build). Such ops stay unregistered and keep decomposing
//    (bit exact to eager on devices without the kernel, not on the others).
//    An op with both a CompositeImplicitAutograd and an explicit kernel
//    (silu_backward) already has its direct registration by the first rule.
// Ops that are only CompositeImplicitAutograd are left alone: they must keep
// decomposing above autograd, as on every backend.
#include "direct_registrations.h"

#include <array>

namespace dtr {
namespace {

// The dense backends a wrapper can hold a value of.
constexpr std::array<c10::DispatchKey, 5> kDenseBackends = {
    c10::DispatchKey::CPU, c10::DispatchKey::CUDA, c10::DispatchKey::XPU,
    c10::DispatchKey::MPS, c10::DispatchKey::PrivateUse1};

// Whether this torch has `backend`: every backend has a kernel for empty.
bool backend_is_built(c10::DispatchKey backend) {
  static const c10::OperatorHandle empty =
      c10::Dispatcher::singleton().findSchemaOrThrow("aten::empty", "memory_format");
  return empty.hasKernelForDispatchKey(backend);
}

bool has_kernel_on_every_built_backend(const c10::OperatorHandle& op) {
  bool any = false;
  for (c10::DispatchKey backend : kDenseBackends) {
    if (!backend_is_built(backend)) continue;
    if (!op.hasKernelForDispatchKey(backend)) return false;
    any = true;
  }
  return any;
}

}  // namespace

bool needs_direct_registration(const c10::OperatorHandle& op) {
  if (op.hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd) ||
      op.hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutogradNonFunctional)) {
    return true;
  }
  return op.hasKernelForDispatchKey(c10::DispatchKey::CompositeImplicitAutograd) &&
         has_kernel_on_every_built_backend(op);
}

}  // namespace dtr
