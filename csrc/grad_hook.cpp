#include "grad_hook.h"

#include <typeinfo>

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include "errors.h"
#include "runtime.h"
#include "wrapper.h"

namespace dtr {
namespace {

using torch::autograd::PostAccumulateGradHook;
using torch::autograd::Variable;

struct PlainGradHook final : PostAccumulateGradHook {
  explicit PlainGradHook(std::unique_ptr<PostAccumulateGradHook> next) : next(std::move(next)) {}

  void operator()(const Variable& tensor) override {
    at::Tensor& g = const_cast<Variable&>(tensor).mutable_grad();
    if (g.defined()) {
      if (DTRTensorImpl* w = dtr_impl(g)) {
        c10::intrusive_ptr<Cell> cell = w->cell();
        at::Tensor plain = with_python_errors([&] { return cell->storage->runtime->escape(cell); });
        g = plain;
      }
    }
    if (next) (*next)(tensor);
  }

  std::unique_ptr<PostAccumulateGradHook> next;
};

}  // namespace

void ensure_plain_grad_hook(const at::Tensor& leaf) {
  auto& hook = torch::autograd::impl::post_acc_grad_hooks(leaf);
  // Asked for every plain leaf input of every op: the hook's exact type (the
  // class is final), cheaper than a dynamic_cast's walk of the hierarchy.
  if (hook && typeid(*hook) == typeid(PlainGradHook)) return;
  hook = std::make_unique<PlainGradHook>(std::move(hook));
}

}  // namespace dtr
