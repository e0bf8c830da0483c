// Lifetimes of cells, recipes and storage records (csrc/records.h).
#include "records.h"

#include "runtime.h"
#include "thread_state.h"
#include "weak_lists.h"

namespace dtr {

// Its pool entry makes it over-aligned: bookkeeping::Object serves such
// objects only from its size classes.
static_assert(sizeof(StorageRecord) <= bookkeeping::kLargestBlock);

const RecipeExtras Recipe::kNoExtras;

StorageRecord::StorageRecord(c10::intrusive_ptr<Runtime> rt, int64_t sid, int64_t nbytes, bool pinned)
    : runtime(std::move(rt)), sid(sid), nbytes(nbytes), pinned(pinned) {}

StorageRecord::~StorageRecord() { release_resources(); }

// Note [Dead view cells]
// A storage's cell list is weak, and only eviction empties it. A view taken
// and dropped (`v = y[0]` in a loop) leaves an expired entry, and a weak
// reference keeps its cell's block allocated (an intrusive_ptr's object is
// freed with its last weak reference): 200,000 views of one value kept
// 200,000 cells in one block's bookkeeping memory, which no budget counts.
// Expired entries are pruned by the rule of Note [Pruning weak lists] (at
// least 8 entries), so an append costs O(1) amortized. Eviction empties the
// list, and the threshold starts again from 8 (Runtime::evict): left at twice
// the list's last length, the next dead views would pile up to it first.
void StorageRecord::add_cell(const c10::intrusive_ptr<Cell>& cell) {
  cells.emplace_back(cell);
  prune_when_doubled(cells, prune_cells_at, kFirstCellPrune);
}

void StorageRecord::release_resources() {
  if (!runtime) return;
  runtime->storage_died(this);
  cells.clear();
  wrappers.clear();
  runtime.reset();
}

Cell::~Cell() { release_resources(); }

void Cell::release_resources() {
  value.reset();
  recipe.reset();
  storage.reset();
}

void Recipe::release_resources() {
  ThreadState& g = thread_state();
  if (!g.exited) {  // the exited state keeps no list: its cells go right here
    for (RecipeInput& in : inputs) {
      if (in.cell) g.dying_cells.push_back(std::move(in.cell));
    }
  }
  inputs.clear();
  args.clear();
  outputs.clear();
  extras.reset();
  if (g.exited || g.draining) return;
  g.draining = true;
  while (!g.dying_cells.empty()) {
    c10::intrusive_ptr<Cell> c = std::move(g.dying_cells.back());
    g.dying_cells.pop_back();
    c.reset();  // may free recipes, which add their inputs to dying_cells
  }
  g.draining = false;
}

}  // namespace dtr
