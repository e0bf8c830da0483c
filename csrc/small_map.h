// A map for what one op looks up: a few entries, searched in place.
//
// Note [Maps of one op]
// An in-place op keeps three maps while it runs: the storages it writes, the
// new cell of each alias it rebinds, the wrapper behind each value it returns.
// They hold one to three entries for almost every op (autograd's in-place
// gradient sums among them: about 550 a TreeLSTM step). As std::unordered
// containers they were about a dozen glibc allocations and frees an op, as
// open-addressed tables a bucket array each to clear and give back. Here the
// entries sit inline and are searched in order; past kLinear entries (a
// _foreach_ op over many tensors) an index is built, so a lookup never costs
// more than a hash. References into the map, as into any vector, last until
// the next insertion.
#pragma once

#include <c10/util/SmallVector.h>

#include <cstddef>
#include <memory>
#include <utility>

#include "bookkeeping_memory.h"

namespace dtr {

template <class K, class V, unsigned N = 4>
class SmallMap {
 public:
  // The value of `key`, or null.
  V* find(const K& key) {
    if (index_) {
      auto it = index_->find(key);
      return it == index_->end() ? nullptr : &items_[it->second].second;
    }
    for (auto& item : items_) {
      if (item.first == key) return &item.second;
    }
    return nullptr;
  }

  bool contains(const K& key) { return find(key) != nullptr; }

  // Inserts `key` with a default value if it is absent.
  V& operator[](const K& key) {
    if (V* v = find(key)) return *v;
    return insert_new(key, V());
  }

  // False, and nothing changed, if `key` is already there.
  bool insert(const K& key, V value) {
    if (find(key) != nullptr) return false;
    insert_new(key, std::move(value));
    return true;
  }

 private:
  static constexpr size_t kLinear = 16;

  V& insert_new(const K& key, V value) {
    items_.emplace_back(key, std::move(value));
    if (index_) {
      index_->emplace(key, items_.size() - 1);
    } else if (items_.size() > kLinear) {
      index_ = std::make_unique<bookkeeping::FlatMap<K, size_t>>();
      for (size_t i = 0; i < items_.size(); ++i) index_->emplace(items_[i].first, i);
    }
    return items_.back().second;
  }

  c10::SmallVector<std::pair<K, V>, N> items_;
  std::unique_ptr<bookkeeping::FlatMap<K, size_t>> index_;  // past kLinear entries
};

}  // namespace dtr
