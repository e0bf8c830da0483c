// In-place ops in the C++ runtime: recipes for written values, rebinding every
// alias, and stealing on recompute. The Runtime's other methods are in
// csrc/runtime.cpp; the reference is dtr/runtime.py's _run_mutation.
//
// Note [In-place ops in the C++ runtime]
// An in-place op (or an out= op, or a _foreach_*_ op) on a dtr tensor runs for
// real on its value, as in eager: for each written argument, the op writes
// into the memory of the storage that argument lives in (the "old" storage).
// The old storage then no longer holds its old value, so it is marked evicted
// (its recipes rebuild the old value for whoever recorded it) and the written
// memory becomes a *new* storage. Its base cell's recipe is the op's, with the
// old base cell as an extra input and, per written argument, the chain of
// view cells from the old base to the written view (Recipe::mutation):
// recompute takes the old base's value, replays the view chain on it and
// applies the op. Every live wrapper of the old storage (the base, its views,
// detached aliases) is rebound to the matching cell of the new storage: the
// base's to the new base, a view's to a copy of its view recipe reading the
// translated parent. Strong references still go only from a value to its
// inputs (Note [Ownership in C++]): the new value keeps the old base and the
// chain's cells, nothing keeps the new one.
//
// Where no recipe can exist the write stays exact instead, as before recipes
// (the "pinned" way): the new storage holds the written memory with no recipe
// and is never evicted, and an old storage that cannot lose its value (pinned:
// escaped, a collective's output; or a base with no recipe) keeps a copy of
// it. That is the case for collectives, for a write into a plain tensor in the
// same call (a recompute would write it again), for an alias the view chain
// cannot rebuild (a cell of the storage not derived from the written base, a
// view recipe reading another dtr value), and for an op that reallocated the
// written memory (out= resizing its output).
//
// Note [Stealing on recompute] (as in dtr/runtime.py)
// Recomputing an in-place recipe writes into the old base's value itself when
// nothing else can see it: no wrapper (rebinding moved them all), not pinned,
// and locked only by this recompute (an op in progress may be about to read
// it). The old storage is then evicted and the recompute needs no room;
// otherwise it writes into a copy, for which it makes room.

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <c10/util/SmallVector.h>

#include <algorithm>

#include "capture.h"
#include "errors.h"
#include "op_memory.h"
#include "op_traits.h"
#include "recipe_stack.h"
#include "rng.h"
#include "runtime.h"
#include "scratch.h"
#include "small_map.h"
#include "tensor_walk.h"
#include "wrapper.h"

namespace dtr {
namespace {

// The cell of `cell`'s storage it is a view of (itself if none); `chain` gets
// the view cells from there (exclusive) to `cell` (inclusive).
c10::intrusive_ptr<Cell> base_of(const c10::intrusive_ptr<Cell>& cell,
                                 std::vector<c10::intrusive_ptr<Cell>>* chain) {
  c10::intrusive_ptr<Cell> base = cell;
  while (Cell* p = base->view_parent()) {
    if (chain) chain->push_back(base);
    base = c10::intrusive_ptr<Cell>::reclaim_copy(p);
  }
  if (chain) std::reverse(chain->begin(), chain->end());
  return base;
}

// A chain recompute can replay from the base alone: no view reads another dtr value.
bool replayable(const std::vector<c10::intrusive_ptr<Cell>>& chain) {
  for (const auto& c : chain) {
    const auto& ins = c->recipe->inputs;
    for (size_t i = 0; i < ins.size(); ++i) {
      if (static_cast<int32_t>(i) != c->view_src && ins[i].cell) return false;
    }
  }
  return true;
}

// The written view, rebuilt from `x` (a value of its base) by the view chain.
// Runs below dtr (the caller holds a BelowDTRGuard).
at::Tensor replay_chain(const std::vector<c10::intrusive_ptr<Cell>>& chain, at::Tensor x) {
  for (const auto& c : chain) {
    const Recipe& r = *c->recipe;
    const OpTraits& traits = op_traits(r.op);
    std::vector<at::Tensor> vals;
    vals.reserve(r.inputs.size());
    for (size_t i = 0; i < r.inputs.size(); ++i) {
      vals.push_back(static_cast<int32_t>(i) == c->view_src ? x : plain_value(r.inputs[i], traits));
    }
    torch::jit::Stack stack;
    fill_stack(r, vals, stack);
    r.op.callBoxed(&stack);
    at::Tensor next;
    int32_t k = 0;
    for (const c10::IValue& iv : stack) {
      for_each_tensor(iv, [&](const at::Tensor& t) {
        if (k++ == c->out_index) next = t;
      });
    }
    TORCH_INTERNAL_ASSERT(next.defined(), "dtr: replaying the view ", traits.name,
                          " of an in-place op's target gave no value");
    x = std::move(next);
  }
  return x;
}

// View cell `old`, re-rooted onto `parent` (a cell of the new storage `rec`).
c10::intrusive_ptr<Cell> view_over(const Cell& old, c10::intrusive_ptr<Cell> parent,
                                   const c10::intrusive_ptr<StorageRecord>& rec) {
  const Recipe& r = *old.recipe;
  auto nr = c10::make_intrusive<Recipe>(r.op);
  nr->args = r.args;
  nr->slots = r.slots;
  if (!r.list_sizes().empty()) nr->extra().list_sizes = r.list_sizes();
  nr->inputs = r.inputs;
  nr->inputs[old.view_src].cell = std::move(parent);
  nr->cost = r.cost;
  nr->grad_enabled = r.grad_enabled;
  nr->outputs.assign(std::max<size_t>(r.outputs.size(), old.out_index + 1),
                     c10::weak_intrusive_ptr<Cell>(c10::intrusive_ptr<Cell>()));
  auto nc = c10::make_intrusive<Cell>(nr, old.out_index, old.view_src, rec);
  nr->outputs[old.out_index] = c10::weak_intrusive_ptr<Cell>(nc);
  return nc;
}

}  // namespace

void Runtime::dispatch_mutation(const c10::OperatorHandle& op, const OpTraits& traits,
                                torch::jit::Stack* stack, size_t first, const MutationCall& call) {
  struct Target {
    int32_t input;  // index among the op's inputs
    c10::intrusive_ptr<StorageRecord> old;
    c10::intrusive_ptr<Cell> base;
    std::vector<c10::intrusive_ptr<Cell>> chain;
    const c10::StorageImpl* memory;  // the base value's storage before the op
    at::Tensor base_copy;            // pinned way, for an old storage that keeps its value
  };
  // Note [Maps of one op] (small_map.h).
  c10::SmallVector<Target, 2> targets;
  SmallMap<int64_t, bool> seen;
  LockedStorages locked;
  UnlockOnExit unlock{this, locked};
  bool with_recipe = !traits.collective;
  auto add_target = [&](int32_t input, const c10::intrusive_ptr<Cell>& cell) {
    c10::intrusive_ptr<StorageRecord> old = cell->storage;
    if (!seen.insert(old->sid, true)) {
      throw DTRError(DTRError::kUnsupportedOp,
                     "dtr: " + traits.name +
                         " writes to two views of the same storage at once; dtr cannot preserve "
                         "that aliasing. Run it outside the dtr block.");
    }
    Target tg{input, old, c10::intrusive_ptr<Cell>(), {}, nullptr, at::Tensor()};
    tg.base = base_of(cell, &tg.chain);
    materialize(tg.base);
    pool_.lock(old->entry);
    locked.push_back(old);
    // Every alias gets its value now, so that it can be rebound to the written memory.
    for (auto& ref : old->wrappers) {
      auto wimpl = ref.lock();
      if (!wimpl) continue;
      const c10::intrusive_ptr<Cell>& wc = static_cast<DTRTensorImpl*>(wimpl.get())->cell();
      if (wc->storage.get() != old.get()) continue;
      materialize(wc);
      if (base_of(wc, nullptr).get() != tg.base.get()) with_recipe = false;
    }
    if (old->pinned || !tg.base->recipe || !replayable(tg.chain)) with_recipe = false;
    tg.memory = tg.base->value.storage().unsafeGetStorageImpl();
    targets.push_back(std::move(tg));
  };
  auto is_written = [&](int32_t arg) {
    return std::find(traits.written.begin(), traits.written.end(), arg) != traits.written.end();
  };
  for (size_t i = 0; i < call.slots.size(); ++i) {
    if (!is_written(call.slots[i].arg)) continue;
    const c10::intrusive_ptr<Cell>& cell = call.cells[i];
    if (!cell) {  // a plain tensor, or another session's value: written as in eager
      // Note [Writes into what recipes read in C++] (hidden_writes.h)
      readers_.before_write(call.vals[i], [&](const at::Tensor& copy) { count_plain(copy); });
      with_recipe = false;
      continue;
    }
    add_target(static_cast<int32_t>(i), cell);
  }
  for (const auto& [arg, cell] : call.nested) {
    if (!is_written(arg)) continue;
    with_recipe = false;  // no recipe input stands for a Tensor[][] element
    add_target(-1, cell);
  }
  if (!with_recipe) {
    for (Target& tg : targets) {
      if (tg.old->pinned || !tg.base->recipe) {
        make_room(tg.old->nbytes, traits.name, tg.old->nbytes);
        BelowDTRGuard below;
        tg.base_copy = tg.base->value.clone();
      }
    }
  }

  // Note [Room for an in-place op]
  // An in-place op makes no new storage, but its kernel may allocate scratch
  // while it runs and a seeded one's recipe keeps the RNG state it captures
  // (5 KiB on CPU): room is made for both first, as dispatch does for a
  // functional op and dtr/runtime.py for every op (dropout's bernoulli_ passed
  // a tight budget by its RNG state before). The scratch is measured on the
  // first run of an (op, input metadata), as a functional op's is, and kept
  // in the recipe for its recomputes.
  OpMemory* memory = nullptr;
  planned_output_bytes(op, traits, *stack, first, &memory);  // 0: only the table's entry
  const c10::Device device = call.vals.empty() ? c10::Device(c10::kCPU) : call.vals[0].device();
  const PlannedScratch scratch =
      planned_scratch(memory, traits.workspace, 0, call.vals, device.is_cpu());
  const bool keeps_rng = traits.seeded && with_recipe && !targets.empty();
  const int64_t rng_bytes = keeps_rng ? rng_state_bytes(device) : 0;
  if (scratch.bytes + rng_bytes > 0) {
    int64_t locked_bytes = 0;
    for (const auto& c : call.cells) {
      if (c) locked_bytes += c->storage->nbytes;
    }
    make_room(scratch.bytes + rng_bytes, traits.name, scratch.bytes + rng_bytes + locked_bytes);
    note_peak(scratch.bytes + rng_bytes);
  }
  int64_t scratch_seen = -1;
  auto run_measured = [&]() -> double {
    ScratchWindow window(scratch.measure);
    const double cost = run_timed(op, stack);
    scratch_seen = window.close();
    if (scratch_seen >= 0) memory->keep_scratch(scratch_seen);
    return cost;
  };

  if (targets.empty()) {  // only plain tensors are written: nothing to record
    const double cost = run_measured();
    clock_ += cost;
    return;
  }

  // The recipe's argument template, taken before the kernel consumes the stack.
  c10::intrusive_ptr<Recipe> recipe;
  if (with_recipe) {
    recipe = c10::make_intrusive<Recipe>(op);
    recipe->args.assign(stack->begin() + first, stack->end());
    for (const Slot& s : call.slots) recipe->args[s.arg] = c10::IValue();
    recipe->slots = call.slots;
    if (!call.list_sizes.empty()) recipe->extra().list_sizes = call.list_sizes;
    recipe->grad_enabled = c10::GradMode::is_enabled();
    if (traits.seeded) {
      const c10::IValue* gen = traits.generator >= 0 ? &(*stack)[first + traits.generator] : nullptr;
      const RNGState& rng = recipe->extra().rng.emplace(capture_rng(gen, device));
      if (rng_bytes) count_plain(rng.state);
    }
  }

  const double cost = run_measured();
  if (recipe) recipe->scratch_bytes = scratch_seen >= 0 ? scratch_seen : scratch.bytes;
  clock_ += cost;
  for (const auto& c : call.cells) {
    if (c) pool_.touch(c->storage->entry, clock_);
  }
  // An out= op may have reallocated its output (resized it): then the view
  // chain no longer rebuilds it.
  for (const Target& tg : targets) {
    if (tg.base->value.storage().unsafeGetStorageImpl() != tg.memory) with_recipe = false;
  }
  if (!with_recipe) recipe.reset();

  std::vector<Entry*> parents;
  if (recipe) {
    recipe->cost = cost;
    recipe->inputs.resize(call.vals.size());
    for (size_t i = 0; i < call.vals.size(); ++i) {
      RecipeInput& in = recipe->inputs[i];
      if (call.cells[i]) {
        in.cell = call.cells[i];
        parents.push_back(&call.cells[i]->storage->entry);
      } else {
        record_plain_input(in, call.vals[i]);
        readers_.add(recipe, i);
      }
    }
  }

  for (size_t k = 0; k < targets.size(); ++k) {
    Target& tg = targets[k];
    StorageRecord& old = *tg.old;
    const int64_t nb = storage_bytes(tg.base->value);
    auto fresh = new_storage(nb, cost + old.entry.cost, /*pinned=*/!recipe,
                             recipe ? c10::ArrayRef<Entry*>(parents) : c10::ArrayRef<Entry*>());
    auto nbase = c10::make_intrusive<Cell>(recipe, static_cast<int32_t>(k), -1, fresh);
    nbase->value = tg.base->value;
    fresh->add_cell(nbase);
    if (recipe) {
      recipe->outputs.emplace_back(nbase);
      recipe->inputs.push_back(RecipeInput{tg.base, at::Tensor(), 0, false});
      recipe->extra().mutation.push_back(MutationTarget{
          tg.input, static_cast<int32_t>(recipe->inputs.size() - 1), std::move(tg.chain)});
      recipe->out_bytes += nb;
    }
    // The cell of the new storage matching each cell of the old one.
    SmallMap<const Cell*, c10::intrusive_ptr<Cell>> moved;
    auto moved_at = [&](const Cell* c) -> const c10::intrusive_ptr<Cell>& {
      const c10::intrusive_ptr<Cell>* nc = moved.find(c);
      TORCH_INTERNAL_ASSERT(nc != nullptr, "dtr: a view's parent was not rebound before the view");
      return *nc;
    };
    moved[tg.base.get()] = nbase;
    auto translate = [&](const c10::intrusive_ptr<Cell>& cell) -> c10::intrusive_ptr<Cell> {
      if (!recipe) {  // the pinned way: a cell with no recipe holding the written memory
        auto& nc = moved[cell.get()];
        if (!nc) {
          nc = c10::make_intrusive<Cell>(c10::intrusive_ptr<Recipe>(), 0, -1, fresh);
          nc->value = cell->value;
          fresh->add_cell(nc);
        }
        return nc;
      }
      c10::SmallVector<Cell*, 4> path;  // iteratively: view chains can be long
      for (Cell* c = cell.get(); !moved.contains(c); c = c->view_parent()) {
        TORCH_INTERNAL_ASSERT(c != nullptr, "dtr: an alias of an in-place op's target is not a view of its base");
        path.push_back(c);
      }
      for (auto it = path.rbegin(); it != path.rend(); ++it) {
        Cell* c = *it;
        auto nc = view_over(*c, moved_at(c->view_parent()), fresh);
        nc->value = c->value;
        fresh->add_cell(nc);
        moved[c] = std::move(nc);
      }
      return moved_at(cell.get());
    };
    c10::SmallVector<std::pair<c10::intrusive_ptr<c10::TensorImpl>, c10::intrusive_ptr<Cell>>, 2> rebinds;
    for (auto& ref : old.wrappers) {
      auto wimpl = ref.lock();
      if (!wimpl) continue;
      auto* w = static_cast<DTRTensorImpl*>(wimpl.get());
      if (w->cell()->storage.get() != &old) continue;
      rebinds.emplace_back(std::move(wimpl), translate(w->cell()));
    }
    if (tg.base_copy.defined()) {
      for (auto& ref : old.cells) {
        if (auto c = ref.lock()) c->value.reset();
      }
      old.cells.clear();
      set_value(*tg.base, tg.base_copy);
    } else {
      evict(old, /*counted=*/false);  // its memory is the new storage's now
    }
    for (auto& [wimpl, nc] : rebinds) {
      auto* w = static_cast<DTRTensorImpl*>(wimpl.get());
      at::Tensor v = nc->value;
      w->rebind(nc, v);
    }
  }
  // Return what eager returns: the written arguments themselves.
  SmallMap<const c10::TensorImpl*, at::Tensor> by_inner;
  for (const c10::IValue& a : call.original_args) {
    for_each_tensor(a, [&](const at::Tensor& t) {
      if (DTRTensorImpl* impl = t.defined() ? dtr_impl(t) : nullptr) {
        if (impl->cell()->value.defined()) by_inner[impl->cell()->value.unsafeGetTensorImpl()] = t;
      }
    });
  }
  auto back = [&](const at::Tensor& o) -> at::Tensor {
    if (!o.defined()) return o;
    const at::Tensor* wrapper = by_inner.find(o.unsafeGetTensorImpl());
    if (wrapper == nullptr) return o;
    dtr_impl(*wrapper)->sync_metadata(o);
    return *wrapper;
  };
  for (size_t i = first; i < stack->size(); ++i) {
    c10::IValue& r = (*stack)[i];
    if (r.isTensor()) {
      r = back(r.toTensor());
    } else if (r.isTensorList()) {
      c10::List<at::Tensor> in = r.toTensorList();
      c10::List<at::Tensor> out;
      for (const at::Tensor& t : in) out.push_back(back(t));
      r = out;
    }
  }
  note_peak();
}

std::vector<StorageRecord*> Runtime::stealable_bases(const Recipe& r,
                                                     const LockedStorages& locked) {
  std::vector<StorageRecord*> out;
  for (const MutationTarget& m : r.mutation()) {
    StorageRecord* rec = r.inputs[m.base].cell->storage.get();
    const int64_t ours = std::count_if(locked.begin(), locked.end(),
                                       [&](const auto& l) { return l.get() == rec; });
    if (!rec->pinned && rec->nwrappers == 0 && rec->resident && rec->entry.locks == ours) {
      out.push_back(rec);
    }
  }
  return out;
}

// Runs below dtr, under the recipe's grad mode (see Runtime::recompute).
std::vector<at::Tensor> Runtime::run_mutation_recipe(const Recipe& r, std::vector<at::Tensor> vals) {
  std::vector<at::Tensor> bases;
  bases.reserve(r.mutation().size());
  for (const MutationTarget& m : r.mutation()) {
    at::Tensor base = vals[m.base];
    // Still resident: not stolen (Note [Stealing on recompute]), so write into a copy.
    if (r.inputs[m.base].cell->storage->resident) base = base.clone();
    vals[m.written] = replay_chain(m.chain, base);
    bases.push_back(std::move(base));
  }
  torch::jit::Stack stack;
  fill_stack(r, vals, stack);
  RNGReplayGuard rng(r.rng());
  r.op.callBoxed(&stack);
  return bases;
}

}  // namespace dtr
