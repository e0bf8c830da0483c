// Cells, recipes and storage records: the values the C++ runtime tracks.
//
// Note [Ownership in C++]
// The rule of docs/design.md, in intrusive pointers: strong references go from
// a value to its inputs, never back.
//   wrapper (DTRTensorImpl) -> Cell -> Recipe -> input Cells -> their Recipes ...
//   Cell -> StorageRecord -> Runtime
// A StorageRecord refers to its cells and wrappers weakly, a Recipe to its
// output cells weakly. A value nobody can reach is freed by reference
// counting, and its StorageRecord tells the runtime (and its pool) it is gone.
// Every mutation of these objects happens under the owning runtime's lock.
//
// Note [Weak references keep members alive]
// c10::intrusive_ptr deletes an object when its last strong reference goes
// only if no weak reference remains; otherwise it calls release_resources()
// and deletes the object when the last weak reference goes. A recipe refers
// to its output cells weakly, and a cell to its recipe strongly: without
// release_resources() dropping a cell's strong members, a cell nobody holds
// kept its recipe, which kept the weak reference to the cell, forever (every
// value of every block leaked, found by tests/test_soak.py). So each record
// drops what it owns in release_resources(), and the destructor only repeats it.
//
// Note [Iterative teardown]
// Freeing the last wrapper of a chain of N values frees N recipes and cells,
// each from inside the one before: recursion N deep, which overflows the stack
// for long chains (an RNN's hidden state, tests' 20,000-op chain). A dying
// recipe hands its input cells to a per-thread list instead, and the outermost
// teardown on the thread frees them one at a time.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>
#include <c10/util/SmallVector.h>
#include <c10/util/intrusive_ptr.h>

#include <memory>
#include <optional>
#include <vector>

#include "bookkeeping_memory.h"
#include "live_count.h"
#include "pool.h"
#include "rng.h"

namespace dtr {

class Runtime;
struct Cell;
struct Entry;
struct Recipe;
struct StorageRecord;
class DTRTensorImpl;

// One tensor value. Defined first: the inline lists of storage records and
// recipes (Note [Inline lists in records]) need its complete type.
struct Cell : c10::intrusive_ptr_target, LiveCount<Counted::kCell>, bookkeeping::Object {
  Cell(c10::intrusive_ptr<Recipe> recipe, int32_t out_index, int32_t view_src,
       c10::intrusive_ptr<StorageRecord> storage)
      : recipe(std::move(recipe)), out_index(out_index), view_src(view_src),
        storage(std::move(storage)) {}

  at::Tensor value;                 // undefined while evicted
  c10::intrusive_ptr<Recipe> recipe;  // null: cannot be recomputed (pinned storage)
  int32_t out_index;                // which flat output of the recipe
  int32_t view_src;                 // >= 0: a view of recipe->inputs[view_src], same storage
  c10::intrusive_ptr<StorageRecord> storage;

  Cell* view_parent() const;
  ~Cell() override;
  void release_resources() override;  // Note [Weak references keep members alive]
};

// The unit of eviction: one storage and every cell (view) living in it.
struct StorageRecord : c10::intrusive_ptr_target, LiveCount<Counted::kStorageRecord>, bookkeeping::Object {
  StorageRecord(c10::intrusive_ptr<Runtime> runtime, int64_t sid, int64_t nbytes, bool pinned);
  ~StorageRecord() override;
  // Tells the runtime this storage is gone (Note [Weak references keep members alive]).
  void release_resources() override;
  // A cell that now holds a value in this storage (Note [Dead view cells]).
  void add_cell(const c10::intrusive_ptr<Cell>& cell);

  c10::intrusive_ptr<Runtime> runtime;
  int64_t sid;
  // Its pool entry (Note [Entry handles] in pool.h): in the pool from
  // Runtime::new_storage until Runtime::storage_died.
  Entry entry;
  int64_t nbytes;
  bool pinned;               // never evicted (no recipe, a collective's output, escaped)
  bool resident = true;
  bool escaped = false;      // handed out as a plain tensor: counted as plain memory
  bool banish_pending = false;
  // Note [Dead view cells] in records.cpp: the list's length that prunes it next.
  static constexpr uint32_t kFirstCellPrune = 8;
  uint32_t prune_cells_at = kFirstCellPrune;
  int64_t nwrappers = 0;     // live DTRTensorImpls whose cell lives here
  // Cells that hold a value now (dropped on eviction); added through add_cell.
  c10::SmallVector<c10::weak_intrusive_ptr<Cell>, 4> cells;
  // Wrappers whose cell lives here (rebound by in-place ops). Not inline: an
  // inline wrapper list was the suspect left when a heap corruption at exit
  // went away (docs/performance.md, The C++ runtime).
  bookkeeping::Vector<c10::weak_intrusive_ptr<c10::TensorImpl>> wrappers;
};

// Where an input goes in the argument stack: a Tensor argument, or element
// `elem` of a Tensor[] / Tensor?[] argument.
struct Slot {
  enum Kind : uint8_t { kTensor, kTensorList, kOptionalTensorList };
  Slot(int32_t arg, int32_t elem, Kind kind)
      : elem(elem), arg(static_cast<int16_t>(arg)), kind(kind) {}
  int32_t elem;
  int16_t arg;  // schemas have a handful of arguments
  Kind kind;
};
static_assert(sizeof(Slot) == 8,
              "three slots fit in a recipe's inline list (Note [Inline lists in records])");
// Note [Inline lists in records]
// A recipe's arguments, slots, inputs and outputs, and a storage's cells, are
// held inline up to the sizes most ops need (five arguments: addmm, add and
// most unary and reduction ops fewer; three inputs: linear, conv; three
// outputs: batch and layer norm; four cells: a value and the three chunks a
// gate layer splits it into). As heap vectors they were four of the eleven
// bookkeeping blocks an op allocated, each a take and a give back and most a
// lock (the thread cache refills in address order only). Longer lists (cat of
// many tensors) go to the heap, which is glibc's: with four arguments, every
// addmm's recipe, and with two cells about a quarter of the TreeLSTM's storages,
// allocated there, about 300 instructions each.
using Slots = c10::SmallVector<Slot, 3>;
using ListSizes = bookkeeping::Vector<int32_t>;

struct RecipeInput {
  c10::intrusive_ptr<Cell> cell;  // a dtr value, or (when null)
  at::Tensor plain;               // a tensor made outside the runtime
  uint32_t version = 0;           // plain's version when recorded (torch counts in 32 bits)
  // Pass a copy: of a running stat the op writes (Note [Hidden running-stat
  // updates]), or of the recipe's own copy of an inference tensor (Note
  // [Inference tensors as recipe inputs] in runtime.cpp).
  bool scratch = false;
};

// One argument an in-place op writes (Note [In-place ops in the C++ runtime]):
// recompute takes the old base's value (inputs[base]), replays the view chain
// from it to the written view and passes that as inputs[written].
struct MutationTarget {
  int32_t written;  // the input the op writes
  int32_t base;     // the input holding the old base cell
  // The old view cells from the base (exclusive) to the written view
  // (inclusive); replaying their recipes rebuilds the view. Strong: they are
  // inputs of the new value, as the base is.
  std::vector<c10::intrusive_ptr<Cell>> chain;
};

// What few recipes have, kept out of line: a recipe is written for every op,
// and these three fields made it a cache line longer.
struct RecipeExtras : bookkeeping::Object {
  std::optional<RNGState> rng;  // a seeded op's generator state
  ListSizes list_sizes;         // per argument: length of a tensor-list argument
  // Non-empty for an in-place op: its outputs are the written bases, in order.
  bookkeeping::Vector<MutationTarget> mutation;
};

// How to recompute one op call.
struct Recipe : c10::intrusive_ptr_target, LiveCount<Counted::kRecipe>, bookkeeping::Object {
  c10::OperatorHandle op;
  c10::SmallVector<c10::IValue, 5> args;  // the argument stack, tensors replaced by None
  Slots slots;                       // one per input, in order
  c10::SmallVector<RecipeInput, 3> inputs;  // Note [Inline lists in records]
  c10::SmallVector<c10::weak_intrusive_ptr<Cell>, 3> outputs;  // per flat tensor output
  double cost = 0.0;
  int64_t out_bytes = 0;             // bytes of the fresh storages it makes
  int64_t scratch_bytes = 0;         // its kernel's scratch, reserved before a recompute
  bool grad_enabled = true;
  std::unique_ptr<RecipeExtras> extras;  // null when it has none of them

  explicit Recipe(c10::OperatorHandle op) : op(std::move(op)) {}
  ~Recipe() override { release_resources(); }
  // Note [Iterative teardown]; also Note [Weak references keep members alive]:
  // PlainReaders (hidden_writes.h) refers to recipes weakly.
  void release_resources() override;

  const std::optional<RNGState>& rng() const { return extras ? extras->rng : kNoExtras.rng; }
  const ListSizes& list_sizes() const { return extras ? extras->list_sizes : kNoExtras.list_sizes; }
  const bookkeeping::Vector<MutationTarget>& mutation() const {
    return extras ? extras->mutation : kNoExtras.mutation;
  }
  // Made on first use.
  RecipeExtras& extra() {
    if (!extras) extras = std::make_unique<RecipeExtras>();
    return *extras;
  }

 private:
  static const RecipeExtras kNoExtras;
};

inline Cell* Cell::view_parent() const {
  return view_src >= 0 ? recipe->inputs[view_src].cell.get() : nullptr;
}

}  // namespace dtr
