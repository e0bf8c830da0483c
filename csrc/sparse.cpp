// Note [Sparse tensors in the C++ runtime] (sparse.h).
#include "sparse.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_set>

#include "wrapper.h"

namespace dtr {

std::vector<at::Tensor> sparse_parts(const at::Tensor& t) {
  switch (t.layout()) {
    case c10::kSparse:
      return {t._indices(), t._values()};
    case c10::kSparseCsr:
    case c10::kSparseBsr:
      return {t.crow_indices(), t.col_indices(), t.values()};
    case c10::kSparseCsc:
    case c10::kSparseBsc:
      return {t.ccol_indices(), t.row_indices(), t.values()};
    default:
      return {};
  }
}

namespace {

void forward_to_dtr(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  op.redispatchBoxed(c10::DispatchKeySet(kDTRKey), stack);
}

std::mutex registration_mu;
std::vector<c10::RegistrationHandleRAII>* handles = nullptr;
size_t ops_seen = 0;

}  // namespace

void register_new_sparse_ops() {
  constexpr c10::DispatchKey kKeys[] = {c10::DispatchKey::SparsePrivateUse3,
                                        c10::DispatchKey::SparseCsrPrivateUse3};
  auto& d = c10::Dispatcher::singleton();
  std::lock_guard<std::mutex> g(registration_mu);
  // Kept for the process: deregistering at exit would race torch's own teardown.
  if (handles == nullptr) handles = new std::vector<c10::RegistrationHandleRAII>();
  std::vector<c10::OperatorName> names = d.getAllOpNames();
  if (names.size() == ops_seen) return;
  ops_seen = names.size();
  for (const auto& name : names) {
    auto op = d.findOp(name);
    if (!op) continue;
    if (!op->hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd) &&
        !op->hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutogradNonFunctional)) {
      continue;
    }
    for (c10::DispatchKey key : kKeys) {
      // hasKernelForDispatchKey does not count alias (composite) kernels.
      if (op->hasKernelForDispatchKey(key)) continue;
      handles->push_back(d.registerImpl(name, key,
                                        c10::KernelFunction::makeFromBoxedFunction<&forward_to_dtr>(),
                                        std::nullopt, nullptr, "dtr sparse forwarding"));
    }
  }
}

}  // namespace dtr

TORCH_LIBRARY_IMPL(_, SparsePrivateUse3, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&dtr::forward_to_dtr>());
}

TORCH_LIBRARY_IMPL(_, SparseCsrPrivateUse3, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&dtr::forward_to_dtr>());
}
