// Lists of weak references that the runtime appends to per op: a storage's
// cells and wrappers, the recipes reading a plain tensor.
//
// Note [Pruning weak lists]
// An expired entry costs its slot and, in C++, its object's block (an
// intrusive_ptr's object is freed with its last weak reference), so the lists
// are pruned as they grow. Pruning at fixed lengths (powers of two) cost a
// whole pass per append when the live entries sat one below such a length and
// one died per append; pruning when the list reaches twice its length after
// the last pruning costs O(1) amortized per append.
#pragma once

#include <algorithm>

namespace dtr {

// Drops the entries whose referent is gone; `expired` tells from an entry.
template <class List, class Expired>
void erase_expired(List& list, Expired expired) {
  list.erase(std::remove_if(list.begin(), list.end(), expired), list.end());
}

template <class List>
void erase_expired(List& list) {
  erase_expired(list, [](const auto& w) { return w.expired(); });
}

// After an append: prunes `list` once it has reached `prune_at`, and sets the
// next threshold to twice what is left, at least `floor`.
template <class List, class Size, class Expired>
void prune_when_doubled(List& list, Size& prune_at, Size floor, Expired expired) {
  if (list.size() < prune_at) return;
  erase_expired(list, expired);
  prune_at = std::max<Size>(floor, static_cast<Size>(2 * list.size()));
}

template <class List, class Size>
void prune_when_doubled(List& list, Size& prune_at, Size floor) {
  prune_when_doubled(list, prune_at, floor, [](const auto& w) { return w.expired(); });
}

}  // namespace dtr
