// Cells, recipes and storage records: the values the C++ runtime tracks.
//
// Note [Ownership in C++]
// The rule of docs/design.md, in intrusive pointers: strong references go from
// a value to its inputs, never back.
//   wrapper (DTRTensorImpl) -> Cell -> Recipe -> input Cells -> their Recipes ...
//   Cell -> StorageRecord -> Runtime
// A StorageRecord refers to its cells and wrappers weakly, a Recipe to its
// output cells weakly. A value nobody can reach is freed by reference
// counting (Note [Released at the last strong reference]), and the record tells the runtime (and its pool) it is gone.
// Every mutation of these objects happens under the owning runtime's lock.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>
#include <c10/util/intrusive_ptr.h>

#include <optional>
#include <vector>

#include "rng.h"

namespace dtr {

class Runtime;
struct Cell;
class DTRTensorImpl;

// The unit of eviction: one storage and every cell (view) living in it.
struct StorageRecord : c10::intrusive_ptr_target {
  StorageRecord(c10::intrusive_ptr<Runtime> runtime, int64_t sid, int64_t nbytes, bool pinned);
  // Note [Released at the last strong reference]
  // An intrusive_ptr_target is deleted only when its weak references are gone
  // too, but records are referred to weakly by design (a recipe's outputs, a
  // storage's cells, the runtime's kept list). Whatever they own is released
  // in release_resources(), which runs when the last strong reference goes:
  // otherwise a cell and its recipe (which refers back to it weakly) keep each
  // other, their inputs and their storage record alive forever.
  void release_resources() override;
  ~StorageRecord() override;

  c10::intrusive_ptr<Runtime> runtime;
  int64_t sid;
  int64_t nbytes;
  bool pinned;               // never evicted (no recipe, a collective's output, escaped)
  bool resident = true;
  bool escaped = false;      // handed out as a plain tensor: counted as plain memory
  bool banish_pending = false;
  int64_t nwrappers = 0;     // live DTRTensorImpls whose cell lives here
  // Cells that hold a value now (dropped on eviction).
  std::vector<c10::weak_intrusive_ptr<Cell>> cells;
  // Wrappers whose cell lives here (rebound by in-place ops).
  std::vector<c10::weak_intrusive_ptr<c10::TensorImpl>> wrappers;
};

// Where an input goes in the argument stack: a Tensor argument, or element
// `elem` of a Tensor[] / Tensor?[] argument.
struct Slot {
  enum Kind : uint8_t { kTensor, kTensorList, kOptionalTensorList };
  int32_t arg;
  int32_t elem;
  Kind kind;
};

struct RecipeInput {
  c10::intrusive_ptr<Cell> cell;  // a dtr value, or (when null)
  at::Tensor plain;               // a tensor made outside the runtime
  int64_t version = 0;            // plain's version when recorded
  bool scratch = false;           // pass a copy (Note [Hidden running-stat updates])
};

// How to recompute one op call.
struct Recipe : c10::intrusive_ptr_target {
  c10::OperatorHandle op;
  std::vector<c10::IValue> args;     // the argument stack, tensors replaced by None
  std::vector<Slot> slots;           // one per input, in order
  std::vector<int32_t> list_sizes;   // per argument: length of a tensor-list argument
  std::vector<RecipeInput> inputs;
  std::vector<c10::weak_intrusive_ptr<Cell>> outputs;  // per flat tensor output
  std::optional<RNGState> rng;
  double cost = 0.0;
  int64_t out_bytes = 0;             // bytes of the fresh storages it makes
  bool grad_enabled = true;

  explicit Recipe(c10::OperatorHandle op) : op(std::move(op)) {}
};

// One tensor value.
struct Cell : c10::intrusive_ptr_target {
  Cell(c10::intrusive_ptr<Recipe> recipe, int32_t out_index, int32_t view_src,
       c10::intrusive_ptr<StorageRecord> storage)
      : recipe(std::move(recipe)), out_index(out_index), view_src(view_src),
        storage(std::move(storage)) {}

  at::Tensor value;                 // undefined while evicted
  c10::intrusive_ptr<Recipe> recipe;  // null: cannot be recomputed (pinned storage)
  int32_t out_index;                // which flat output of the recipe
  int32_t view_src;                 // >= 0: a view of recipe->inputs[view_src], same storage
  c10::intrusive_ptr<StorageRecord> storage;

  // Note [Released at the last strong reference].
  void release_resources() override {
    value.reset();
    recipe.reset();
    storage.reset();
  }

  Cell* view_parent() const {
    return view_src >= 0 ? recipe->inputs[view_src].cell.get() : nullptr;
  }
};

}  // namespace dtr
