// Note [Writes into what recipes read in C++] (hidden_writes.h).
#include "hidden_writes.h"
#include "tensor_walk.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <unordered_map>

#include "capture.h"
#include "op_traits.h"
#include "runtime.h"
#include "wrapper.h"
#include "weak_lists.h"

namespace dtr {
namespace {

// An efficient zero tensor has a storage without data and cannot be written.
const c10::StorageImpl* key_of(const at::Tensor& t) {
  if (!t.defined() || t.layout() != c10::kStrided || t._is_zerotensor() || !t.has_storage()) {
    return nullptr;
  }
  const c10::StorageImpl* st = t.storage().unsafeGetStorageImpl();
  return st->data() != nullptr ? st : nullptr;
}

// A reader entry (recipe, input) whose recipe has died.
bool reader_gone(const std::pair<c10::weak_intrusive_ptr<Recipe>, size_t>& e) {
  return e.first.expired();
}

}  // namespace

at::Tensor exact_copy(const at::Tensor& t) {
  BelowDTRGuard below;
  at::Tensor src = t.detach();
  c10::Storage st = src.storage();
  at::Tensor whole = at::empty({static_cast<int64_t>(st.nbytes())},
                               src.options().dtype(at::kByte));
  at::Tensor bytes = at::empty({0}, src.options().dtype(at::kByte))
                         .set_(st, 0, {static_cast<int64_t>(st.nbytes())}, {1});
  whole.copy_(bytes);
  at::Tensor out = at::empty({0}, src.options());
  out.set_(whole.storage(), src.storage_offset(), src.sizes(), src.strides());
  return out;
}

void PlainReaders::add(const c10::intrusive_ptr<Recipe>& recipe, size_t input) {
  const RecipeInput& in = recipe->inputs[input];
  if (in.scratch) return;
  const c10::StorageImpl* key = key_of(in.plain);
  if (key == nullptr) return;
  if (by_storage_.size() >= sweep_at_) {
    for (auto it = by_storage_.begin(); it != by_storage_.end();) {
      auto& r = it->second.list;
      erase_expired(r, reader_gone);
      it = r.empty() ? by_storage_.erase(it) : std::next(it);
    }
    sweep_at_ = std::max<size_t>(1024, 2 * by_storage_.size());
  }
  Readers& readers = by_storage_[key];
  readers.list.emplace_back(recipe, input);
  prune_when_doubled(readers.list, readers.prune_at, size_t{64}, reader_gone);
}

void PlainReaders::before_write(const at::Tensor& t,
                                c10::function_ref<void(const at::Tensor&)> count) {
  const c10::StorageImpl* key = key_of(t);
  if (key == nullptr) return;
  auto it = by_storage_.find(key);
  if (it == by_storage_.end()) return;
  auto readers = std::move(it->second.list);
  by_storage_.erase(it);
  std::unordered_map<const c10::TensorImpl*, at::Tensor> copies;
  for (auto& [ref, index] : readers) {
    c10::intrusive_ptr<Recipe> recipe = ref.lock();
    if (!recipe || index >= recipe->inputs.size()) continue;
    RecipeInput& in = recipe->inputs[index];
    // Dead, or already stale (its recompute raises StaleInputError).
    if (key_of(in.plain) != key || in.plain._version() != in.version) continue;
    at::Tensor& snap = copies[in.plain.unsafeGetTensorImpl()];
    if (!snap.defined()) {
      snap = exact_copy(in.plain);
      count(snap);
    }
    in.plain = snap;
    in.version = snap._version();
  }
}

void Runtime::before_plain_writes(const OpTraits& traits, const torch::jit::Stack& stack,
                                  size_t first) {
  Lock g(mu_);
  for (int w : traits.written) {
    for_each_tensor(stack[first + w], [&](const at::Tensor& t) {
      if (t.defined()) readers_.before_write(t, [&](const at::Tensor& copy) { count_plain(copy); });
    });
  }
}

std::vector<std::pair<c10::intrusive_ptr<Cell>, at::Tensor>> Runtime::take_hidden_writes(
    const OpTraits& traits, torch::jit::Stack* stack, size_t first,
    std::vector<c10::intrusive_ptr<Cell>>& cells, std::vector<at::Tensor>& vals,
    const Slots& slots) {
  // Called only for ops with running stats (dispatch checks first: it is on every op's path).
  TORCH_INTERNAL_ASSERT(traits.running_mean >= 0);
  std::vector<std::pair<c10::intrusive_ptr<Cell>, at::Tensor>> copies;
  if (traits.training >= 0) {
    const c10::IValue& tr = (*stack)[first + traits.training];
    if (tr.isBool() && !tr.toBool()) return copies;
  }
  for (size_t i = 0; i < slots.size(); ++i) {
    const int32_t arg = slots[i].arg;
    if ((arg != traits.running_mean && arg != traits.running_var) ||
        slots[i].kind != Slot::kTensor || !vals[i].defined()) {
      continue;
    }
    if (!cells[i]) {
      readers_.before_write(vals[i], [&](const at::Tensor& copy) { count_plain(copy); });
      continue;
    }
    at::Tensor copy = exact_copy(vals[i]);
    count_plain(copy);
    vals[i] = copy;
    (*stack)[first + arg] = copy;
    copies.emplace_back(std::move(cells[i]), copy);
    cells[i].reset();  // recorded as a plain scratch input (Note [Hidden running-stat updates])
  }
  return copies;
}

void Runtime::write_back(const std::vector<std::pair<c10::intrusive_ptr<Cell>, at::Tensor>>& copies) {
  static const c10::OperatorHandle copy_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("aten::copy_", "");
  for (const auto& [cell, updated] : copies) {
    materialize(cell);
    torch::jit::Stack s{make_wrapper(cell, cell->value), updated, false};
    dispatch(copy_op, &s);
  }
}

}  // namespace dtr
