// Lifetimes of cells, recipes and storage records (csrc/records.h).
#include "records.h"

#include <algorithm>

#include "runtime.h"

namespace dtr {
namespace {

// Note [Iterative teardown]
struct Graveyard {
  std::vector<c10::intrusive_ptr<Cell>> cells;
  bool draining = false;
};
thread_local Graveyard graveyard;

}  // namespace

// Its pool entry makes it over-aligned: bookkeeping::Object serves such
// objects only from its size classes.
static_assert(sizeof(StorageRecord) <= bookkeeping::kLargestBlock);

StorageRecord::StorageRecord(c10::intrusive_ptr<Runtime> rt, int64_t sid, int64_t nbytes, bool pinned)
    : runtime(std::move(rt)), sid(sid), nbytes(nbytes), pinned(pinned) {}

StorageRecord::~StorageRecord() { release_resources(); }

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
  // Called twice for most recipes (by intrusive_ptr, then by the destructor),
  // and reaching the graveyard is a thread_local lookup, two calls into the
  // dynamic linker (Note [Initial-exec TLS]): only a recipe with input cells
  // needs it.
  const bool any_cell =
      std::any_of(inputs.begin(), inputs.end(), [](const RecipeInput& in) { return bool(in.cell); }) ||
      !mutation.empty();
  if (!any_cell) {
    inputs.clear();
    args.clear();
    outputs.clear();
    rng.reset();
    return;
  }
  Graveyard& g = graveyard;
  for (RecipeInput& in : inputs) {
    if (in.cell) g.cells.push_back(std::move(in.cell));
  }
  inputs.clear();
  args.clear();
  outputs.clear();
  mutation.clear();
  rng.reset();
  if (g.draining) return;
  g.draining = true;
  while (!g.cells.empty()) {
    c10::intrusive_ptr<Cell> c = std::move(g.cells.back());
    g.cells.pop_back();
    c.reset();  // may free recipes, which add their inputs to g.cells
  }
  g.draining = false;
}

}  // namespace dtr
