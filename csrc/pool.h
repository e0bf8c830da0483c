// The eviction pool of dtr in C++: the same decisions as dtr.policies.PythonPool.
//
// Note [What the pool is]
// The pool knows nothing about tensors. It holds one Entry per *storage* (the
// unit of eviction), keyed by an integer id chosen by the caller, with its
// bytes, compute cost, last access time, lock count, residency, whether it may
// be evicted at all, and its dataflow neighbours (parents: the storages its
// recipe reads; children: the storages whose recipes read it). The runtime
// (dtr/runtime.py) calls it on every op, so every method but choose_victim is
// O(1) (removal is O(degree)).
//
// Note [Same victims as the Python pool]
// dtr.policies.PythonPool is the reference. With sampling off, both pools must
// evict the same storages in the same order for every policy, so:
//  * scores are computed with the same floating-point operations in the same
//    order (neighbours are visited parents first, then children, in insertion
//    order; removal from neighbour lists keeps the order, like list.remove);
//  * ties go to the smallest id;
//  * the candidate array uses the same swap-with-last removal as the Python
//    pool, and both use the same SplitMix64 generator, so even sampling and
//    the "random" policy agree between the two.
//
// Note [dtr_eq's union-find]
// Evicting t creates a class node carrying t's cost and unions it with the
// classes of t's evicted neighbours (the new node stays the root and adds their
// costs). Rematerializing or removing t subtracts t's (current) cost from its
// class's root and leaves the class without splitting it, as in the paper.
// Nodes are reference counted (by entries and by child nodes) and recycled, so
// a long run does not grow the node arena without bound.
// Only dtr_eq's score reads the classes, and a policy written in Python may
// (dtr.policies.equivalence_class_cost). A pool with any other policy keeps
// none: the class bookkeeping was about a thirtieth of what the C++ runtime
// added per op to a chain of adds, where every op banishes a value. So its
// class_cost and class_root say "no class" (dtr.policies.PythonPool, the
// reference, keeps them for every policy; no score or victim differs).
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/SmallVector.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <unordered_map>
#include <vector>

#include "bookkeeping_memory.h"

namespace dtr {

enum class Policy : int {
  DtrEq,
  Dtr,
  DtrLocal,
  Msps,
  Lru,
  Largest,
  Random,
  MspsSqrt,
  DtrRegions,
  Lookahead,
  // A policy written in Python (see Note [Policies written in Python]); not a name.
  Python
};

// The names of the policies implemented natively, as registered in dtr.policies.
const std::vector<std::string>& native_policy_names();
Policy policy_from_name(const std::string& name);

struct SearchOptions {
  // With more candidates than this, score about sqrt(n) of them (-1: never).
  int64_t sample_above = -1;
  // When sampling, skip sampled candidates smaller than this fraction of the
  // mean candidate size (unless that skips them all).
  double min_evictable_fraction = 0.0;
  uint64_t seed = 0;
  // See Note [Thrash guard] in pool.cpp.
  bool thrash_guard = true;
};

// Note [Thrash guard] in pool.cpp: the guard trips once the cost recomputed
// passes this many times the cost computed, after at least this many
// rematerializations (dtr.policies.THRASH_GUARD_RATIO and _MIN_REMATS).
constexpr double kThrashGuardRatio = 3.0;
constexpr int64_t kThrashGuardMinRemats = 64;
// Once tripped, the pool samples above this many candidates (dtr.policies.THRASH_GUARD_SAMPLE_ABOVE).
constexpr int64_t kThrashGuardSampleAbove = 64;

// SplitMix64; dtr.policies._SplitMix64 is the same generator in Python.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed = 0) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

 private:
  uint64_t state_;
};

class Pool;
struct Entry;

// Note [Policies written in Python]
// A policy given as a Python callable (dtr.budget(policy=f), or a name
// registered with dtr.policies.register) scores the candidates of one search
// in one call: the pool gathers the unlocked candidates it would score (after
// sampling, as for a native policy), the scorer fills one score per
// candidate, and the pool keeps the lowest (ties: smallest id), as
// PythonPool._scan does. So the callable runs only when a victim is chosen,
// never per op. csrc/python_policy.cpp implements the scorer: it takes the GIL
// for the call only, and an exception (the callable's, or a dtr error for a
// score that is not a number) leaves the pool as it was.
class ExternalScorer {
 public:
  virtual ~ExternalScorer() = default;
  // scores[i] for the storage sids[i]; scores arrives sized like sids. The
  // callable runs Python, which may release wrappers (the garbage collector)
  // and so change the pool: the pool reads its entries again by id afterwards.
  virtual void score(Pool& pool, const std::vector<int64_t>& sids, double now,
                     std::vector<double>& scores) = 0;
};

constexpr uint32_t kNoNode = std::numeric_limits<uint32_t>::max();
constexpr int64_t kNotCandidate = -1;

// The fields the scan reads for every candidate come first, in one cache line.
struct alignas(64) Entry {
  int64_t sid = 0;
  int64_t nbytes = 0;
  double cost = 0.0;
  double last_access = 0.0;
  int64_t locks = 0;
  // Evicted parents and children: scoring skips the neighbour walk when zero
  // (see Note [Neighbour counts] in pool.cpp).
  int32_t evicted_parents = 0;
  int32_t evicted_children = 0;
  uint32_t uf = kNoNode;  // class node while evicted (dtr_eq bookkeeping)
  bool resident = true;
  bool evictable = true;
  int64_t cand_pos = kNotCandidate;  // index in Pool::cands_, or kNotCandidate
  uint64_t mark = 0;                 // visit stamp for graph walks
  // When the storage is next needed, on the plan's clock (+inf: never; NaN:
  // unknown). Only the lookahead policy reads it; see Note [Lookahead] in
  // dtr/policies.py.
  double next_use = std::numeric_limits<double>::quiet_NaN();
  // Inline storage: most storages have few neighbours, and the scan then
  // reads them without another cache miss.
  c10::SmallVector<Entry*, 3> parents;
  c10::SmallVector<Entry*, 3> children;
  // Whose entry this is (Note [Entry handles]): the caller's, who passes the
  // object holding it as `owner` (the C++ runtime's storage record) and gets
  // it back from a victim, or, with no owner, the pool's own. The pool never
  // reads what `owner` points to.
  void* owner = nullptr;
  bool owned() const { return owner == nullptr; }
  // Every entry of the pool, in insertion order (Note [The id index is built
  // when first asked]).
  Entry* list_prev = nullptr;
  Entry* list_next = nullptr;
};

class Pool {
 public:
  // `scorer`: for Policy::Python only, which it scores.
  Pool(Policy policy, SearchOptions search, std::shared_ptr<ExternalScorer> scorer = nullptr);
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  // -- lifecycle ---------------------------------------------------------
  // Note [Entry handles]
  // Every entry stays where it is until remove, so callers keep pointers to
  // entries and call the Entry& overloads: the sid overloads cost a hash
  // lookup each, and an op made about eight of them. The sid overloads of add
  // make an entry the pool owns (dtr.cpp_pool, the pool's tests). The C++
  // runtime instead holds each storage's entry inside its storage record and
  // adds it with add_held: no block of the pool's own per storage, and the
  // record is found from a victim through Entry::owner (a second table, id to
  // record, cost the runtime a hash insert, erase and lookup per op).
  Entry* add(int64_t sid, int64_t nbytes, double cost, double now, bool evictable,
             const std::vector<int64_t>& parents);
  Entry* add(int64_t sid, int64_t nbytes, double cost, double now, bool evictable,
             c10::ArrayRef<Entry*> parents);
  // `e` must be a fresh Entry that outlives its membership (until remove(e)).
  void add_held(Entry& e, void* owner, int64_t sid, int64_t nbytes, double cost, double now,
                bool evictable, c10::ArrayRef<Entry*> parents);
  void remove(int64_t sid);
  void remove(Entry& e);

  // -- per-op updates ----------------------------------------------------
  void touch(int64_t sid, double now);
  void touch(Entry& e, double now) { e.last_access = now; }
  void add_cost(int64_t sid, double cost);
  void add_cost(Entry& e, double cost);
  void lock(int64_t sid);
  void lock(Entry& e) { ++e.locks; }
  void unlock(int64_t sid);
  void unlock(Entry& e) {
    TORCH_CHECK(e.locks > 0, "dtr: internal error: unlock of unlocked storage ", e.sid);
    --e.locks;
  }
  int64_t locks(int64_t sid) const;
  double cost(int64_t sid) const;
  double last_access(int64_t sid) const;
  void pin(int64_t sid);
  void pin(Entry& e);
  void evicted(int64_t sid);
  void evicted(Entry& e);
  void rematerialized(int64_t sid, double now);
  void rematerialized(Entry& e, double now);
  // See Note [Lookahead] in dtr/policies.py (NaN: unknown, the online score applies).
  void set_next_use(int64_t sid, double when);
  double next_use(int64_t sid) const;
  // Where the step is on the plan's clock (the clock of the next uses).
  void set_plan_clock(double t) { plan_clock_ = t; }
  double plan_clock() const { return plan_clock_; }

  // -- the search --------------------------------------------------------
  // The unlocked candidate with the lowest score (ties: smallest id), or
  // nullptr when every candidate is locked or there is none.
  const Entry* choose_victim(double now);
  std::vector<int64_t> unlocked_candidates() const;

  // -- introspection -----------------------------------------------------
  size_t size() const { return count_; }
  size_t num_candidates() const { return cands_.size(); }
  int64_t candidate_bytes() const { return candidate_bytes_; }
  Policy policy() const { return policy_; }
  // 0, or 1 once the thrash guard has tripped (Note [Thrash guard] in pool.cpp).
  int64_t thrash_guard_trips() const { return thrash_guard_trips_; }
  // Summed cost of the storages rematerialized so far (Note [Thrash guard]).
  double recomputed_cost() const { return recomputed_cost_; }
  const SearchOptions& search() const { return search_; }
  const Entry* find(int64_t sid) const;
  std::vector<int64_t> ids() const;
  const std::vector<Entry*>& candidates() const { return cands_; }
  // The summed cost of the class of an evicted storage (NaN if it has none).
  double class_cost(int64_t sid);
  // The root node of an evicted storage's class (kNoNode if it has none).
  uint32_t class_root(int64_t sid);
  size_t live_nodes() const { return nodes_.size() - free_nodes_.size(); }
  // Whether evicted storages are grouped in classes (Note [dtr_eq's union-find]).
  bool tracks_classes() const { return tracks_classes_; }
  // Whether the id table has been built (Note [The id index is built when first asked]).
  bool indexed() const { return indexed_; }
  // Checks every invariant (TORCH_INTERNAL_ASSERT); for tests.
  void check_invariants();
  double score(Entry& e, double now);

 private:
  struct Node {
    uint32_t parent;
    uint32_t refs;  // entries and child nodes pointing here (a root's self-link is not counted)
    double cost;
  };

  Entry& get(int64_t sid, const char* what);
  Entry* lookup(int64_t sid);
  // Note [The id index is built when first asked] (pool.cpp).
  void ensure_index() const;
  void insert(Entry& e, int64_t sid, int64_t nbytes, double cost, double now, bool evictable);
  Entry& insert_owned(int64_t sid, int64_t nbytes, double cost, double now, bool evictable);
  void link_parent(Entry& e, Entry* pe);
  void drop_candidate(Entry& e);
  void maybe_candidate(Entry& e);
  void leave_class(Entry& e);
  void count_as_evicted_neighbour(Entry& e, int32_t delta);

  uint32_t new_node(double cost);
  void incref(uint32_t n) { ++nodes_[n].refs; }
  void decref(uint32_t n);
  uint32_t find_root(uint32_t n);

  double equivalence_class_cost(Entry& e);
  double evicted_neighbourhood_cost(Entry& e);
  double evicted_ancestor_cost(Entry& e);
  // dtr.policies_extra.evicted_region_cost: forward follows children, else parents.
  double evicted_region_cost(Entry& e, bool forward);
  // dtr.policies.needed_next and lookahead_distance (Note [Lookahead]).
  double needed_next(Entry& e);
  double lookahead_distance(Entry& e, double now);

  const Entry* scan(const std::vector<Entry*>& entries, double now);
  // See Note [Bounded scan] in pool.cpp.
  bool can_bound() const;
  bool needs_walk(const Entry& e) const;
  void count_recomputed(double cost);
  double base_score(const Entry& e, double now) const;
  const Entry* scan_bounded(const std::vector<Entry*>& entries, double now);
  const Entry* scan_external(const std::vector<Entry*>& entries, double now);

  Policy policy_;
  bool tracks_classes_;
  SearchOptions search_;
  SplitMix64 rng_;
  // Every entry by id, owned or held (Note [Entry handles]), once asked for
  // (Note [The id index is built when first asked]); entries never move, so
  // the table holds pointers. Note [Bookkeeping memory].
  mutable bookkeeping::FlatMap<int64_t, Entry*> index_;
  mutable bool indexed_ = false;
  Entry* first_ = nullptr;  // the entry list (Entry::list_next)
  Entry* last_ = nullptr;
  size_t count_ = 0;
  size_t owned_ = 0;  // entries the pool made (and frees)
  // Resident, evictable, nbytes > 0 (locked ones are skipped). Its memory passes to
  // the next pool (Note [The candidate list outlives its pool] in pool.cpp).
  std::vector<Entry*> cands_;
  int64_t candidate_bytes_ = 0;
  std::vector<Node> nodes_;
  std::vector<uint32_t> free_nodes_;
  uint64_t epoch_ = 0;
  // A cost that was negative or NaN was seen: scores may fall below their
  // bounds, so the bounded scan is off (Note [Bounded scan]).
  bool odd_cost_ = false;
  double plan_clock_ = 0.0;
  // Note [Thrash guard]: costs of the storages added and rematerialized so far,
  // and how many of each.
  double computed_cost_ = 0.0;
  double recomputed_cost_ = 0.0;
  int64_t adds_ = 0;
  int64_t remats_ = 0;
  int64_t thrash_guard_trips_ = 0;
  std::vector<std::pair<double, Entry*>> deferred_;
  std::shared_ptr<ExternalScorer> scorer_;  // Policy::Python only
  // Scratch buffers reused by the search and the graph walks.
  std::vector<Entry*> sample_, big_, stack_;
  std::vector<uint32_t> roots_;
};

// Holds a lock on a storage for the lifetime of the guard.
class PoolLock {
 public:
  PoolLock(Pool& pool, int64_t sid) : pool_(pool), sid_(sid) { pool_.lock(sid_); }
  // The storage may have left the pool meanwhile: then there is nothing to release.
  ~PoolLock() {
    if (pool_.locks(sid_) > 0) pool_.unlock(sid_);
  }
  PoolLock(const PoolLock&) = delete;
  PoolLock& operator=(const PoolLock&) = delete;

 private:
  Pool& pool_;
  int64_t sid_;
};

}  // namespace dtr
