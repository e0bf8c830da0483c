// The eviction pool. See Note [What the pool is] in pool.h.
#include "pool.h"

#include <c10/util/Exception.h>
#include <patchlevel.h>  // PY_VERSION_HEX: which float summation sum() uses

#include <algorithm>
#include <cmath>
#include <mutex>

namespace dtr {

namespace {

// Staleness of an entry touched at this very instant (dtr.policies._MIN_STALENESS).
constexpr double kMinStaleness = 1e-12;

inline double staleness(const Entry& e, double now) {
  double s = now - e.last_access;
  // Python's max(s, 1e-12) keeps s unless 1e-12 > s.
  return (kMinStaleness > s) ? kMinStaleness : s;
}

// The distance of an entry's own next use (a lower bound's: see Note [Bounded
// scan]), or its staleness when the next use is unknown.
inline double own_lookahead_distance(const Entry& e, double now, double plan_clock) {
  if (std::isnan(e.next_use)) return staleness(e, now);
  double d = e.next_use - plan_clock;
  return (kMinStaleness > d) ? kMinStaleness : d;
}

// Python's built-in sum() over floats, starting from the int 0: the same
// additions in the same order, so that the scores are bit-identical.
class PySum {
 public:
  void add(double x) {
#if PY_VERSION_HEX >= 0x030C0000
    // CPython 3.12+: Neumaier's compensated summation.
    if (!started_) {
      total_ = 0.0 + x;
      started_ = true;
      return;
    }
    double t = total_ + x;
    if (std::fabs(total_) >= std::fabs(x)) {
      c_ += (total_ - t) + x;
    } else {
      c_ += (x - t) + total_;
    }
    total_ = t;
#else
    total_ += x;
#endif
  }
  double value() const {
#if PY_VERSION_HEX >= 0x030C0000
    if (c_ != 0.0 && std::isfinite(c_)) return total_ + c_;
#endif
    return total_;
  }

 private:
  double total_ = 0.0;
  double c_ = 0.0;
  bool started_ = false;
};

template <typename Vec>
void erase_first(Vec& v, const Entry* x) {
  auto it = std::find(v.begin(), v.end(), x);
  TORCH_INTERNAL_ASSERT(it != v.end(), "dtr: pool neighbour lists out of sync");
  v.erase(it);  // keeps the order, like list.remove
}

}  // namespace

const std::vector<std::string>& native_policy_names() {
  // In the order of enum class Policy.
  static const std::vector<std::string> names = {"dtr_eq",    "dtr",         "dtr_local",
                                                 "msps",      "lru",         "largest",
                                                 "random",    "msps_sqrt",   "dtr_regions",
                                                 "lookahead"};
  return names;
}

Policy policy_from_name(const std::string& name) {
  const auto& names = native_policy_names();
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i] == name) return static_cast<Policy>(i);
  }
  std::string valid;
  for (const auto& n : names) valid += (valid.empty() ? "" : ", ") + n;
  TORCH_CHECK(false, "dtr: the C++ pool does not implement policy '", name, "'; native policies are ",
              valid, " (use the Python pool for other policies: make_pool(..., impl='python'))");
}

namespace {

// Note [The candidate list outlives its pool]
// A runtime, and its pool, lives for one dtr block: one training step. Its
// candidate list grows to the step's evictable values, thousands, by
// doubling, and each growth past 1 KiB is a glibc allocation large enough to
// consolidate the heap's free chunks first (malloc_consolidate): about 120,000
// instructions for the list's first 8 KiB on a TreeLSTM step, 18 per op. A
// dying pool leaves its list's memory for the next pool instead, which then
// starts with the capacity the last step reached.
struct SpareCandidates {
  std::mutex mu;
  std::vector<Entry*> list;
};

SpareCandidates& spare_candidates() {
  static auto* spare = new SpareCandidates();  // never destroyed: pools die until exit
  return *spare;
}

void take_spare_candidates(std::vector<Entry*>& out) {
  SpareCandidates& spare = spare_candidates();
  std::lock_guard<std::mutex> g(spare.mu);
  out.swap(spare.list);
}

void give_back_candidates(std::vector<Entry*>& list) {
  list.clear();
  SpareCandidates& spare = spare_candidates();
  std::lock_guard<std::mutex> g(spare.mu);
  if (list.capacity() > spare.list.capacity()) list.swap(spare.list);
}

}  // namespace

Pool::Pool(Policy policy, SearchOptions search, std::shared_ptr<ExternalScorer> scorer)
    : policy_(policy),
      tracks_classes_(policy == Policy::DtrEq || policy == Policy::Python),
      search_(search),
      rng_(search.seed),
      scorer_(std::move(scorer)) {
  TORCH_INTERNAL_ASSERT((policy == Policy::Python) == (scorer_ != nullptr),
                        "dtr: a Python policy needs its scorer, and only it has one");
  TORCH_CHECK(search.min_evictable_fraction >= 0.0,
              "dtr: SearchOptions.min_evictable_fraction must be >= 0, got ",
              search.min_evictable_fraction);
  take_spare_candidates(cands_);
}

namespace {

// An entry the pool owns, from bookkeeping memory (its alignment kept).
Entry* new_owned_entry() {
  return new (bookkeeping::Allocator<Entry>().allocate(1)) Entry();
}

void delete_owned_entry(Entry* e) {
  e->~Entry();
  bookkeeping::Allocator<Entry>().deallocate(e, 1);
}

}  // namespace

Pool::~Pool() {
  give_back_candidates(cands_);
  if (owned_ == 0) return;  // a runtime's pool: every entry was held, and is gone
  for (Entry* e = first_; e != nullptr;) {
    Entry* next = e->list_next;
    if (e->owned()) delete_owned_entry(e);
    e = next;
  }
}

// ---------------------------------------------------------------------------
// Lookup
// ---------------------------------------------------------------------------

// Note [The id index is built when first asked]
// The C++ runtime reaches its entries through its storage records (Note
// [Entry handles]) and never by id, unless a policy written in Python, a
// lookahead step or a test asks. Keeping the id table for every storage cost
// it a hash insert and erase per op (about 200 instructions, and a cache miss
// per op in a pool of a large model's size). So the pool keeps every entry on
// a list (two pointers an entry, O(1) to link and unlink), and builds the id
// table from it the first time an id is looked up, or an entry added by id;
// from then on it keeps the table as before.
void Pool::ensure_index() const {
  if (indexed_) return;
  index_.reserve(count_);
  for (Entry* e = first_; e != nullptr; e = e->list_next) {
    TORCH_CHECK(index_.emplace(e->sid, e).second, "dtr: internal error: storage id ", e->sid,
                " added twice");
  }
  indexed_ = true;
}

Entry* Pool::lookup(int64_t sid) {
  ensure_index();
  auto it = index_.find(sid);
  return it == index_.end() ? nullptr : it->second;
}

const Entry* Pool::find(int64_t sid) const {
  ensure_index();
  auto it = index_.find(sid);
  return it == index_.end() ? nullptr : it->second;
}

std::vector<int64_t> Pool::ids() const {
  std::vector<int64_t> out;
  out.reserve(count_);
  for (const Entry* e = first_; e != nullptr; e = e->list_next) out.push_back(e->sid);
  std::sort(out.begin(), out.end());
  return out;
}

Entry& Pool::get(int64_t sid, const char* what) {
  ensure_index();
  auto it = index_.find(sid);
  TORCH_CHECK(it != index_.end(), "dtr: internal error: ", what, " of unknown storage id ", sid,
              " (it was never added to the pool or was already removed)");
  return *it->second;
}

// ---------------------------------------------------------------------------
// Candidates: an array with swap-with-last removal (PythonPool does the same).
// ---------------------------------------------------------------------------

void Pool::drop_candidate(Entry& e) {
  if (e.cand_pos == kNotCandidate) return;
  int64_t pos = e.cand_pos;
  Entry* last = cands_.back();
  cands_.pop_back();
  if (last != &e) {
    cands_[pos] = last;
    last->cand_pos = pos;
  }
  e.cand_pos = kNotCandidate;
  candidate_bytes_ -= e.nbytes;
}

void Pool::maybe_candidate(Entry& e) {
  if (e.evictable && e.resident && e.nbytes > 0 && e.cand_pos == kNotCandidate) {
    e.cand_pos = static_cast<int64_t>(cands_.size());
    cands_.push_back(&e);
    candidate_bytes_ += e.nbytes;
  }
}

// ---------------------------------------------------------------------------
// Union-find nodes. See Note [dtr_eq's union-find] in pool.h.
// ---------------------------------------------------------------------------

uint32_t Pool::new_node(double cost) {
  uint32_t n;
  if (!free_nodes_.empty()) {
    n = free_nodes_.back();
    free_nodes_.pop_back();
  } else {
    TORCH_CHECK(nodes_.size() < kNoNode, "dtr: too many evicted storages for the union-find");
    n = static_cast<uint32_t>(nodes_.size());
    nodes_.push_back(Node{});
  }
  nodes_[n] = Node{n, 1, cost};  // one reference: the entry that creates it
  return n;
}

void Pool::decref(uint32_t n) {
  while (true) {
    Node& node = nodes_[n];
    TORCH_INTERNAL_ASSERT(node.refs > 0, "dtr: union-find reference count underflow");
    if (--node.refs > 0) return;
    uint32_t parent = node.parent;
    free_nodes_.push_back(n);
    if (parent == n) return;
    n = parent;  // it no longer points at its parent
  }
}

uint32_t Pool::find_root(uint32_t n) {
  // Path halving, as _UFNode.find: node.parent = node.parent.parent.
  while (nodes_[n].parent != n) {
    uint32_t p = nodes_[n].parent;
    uint32_t gp = nodes_[p].parent;
    if (gp != p) {
      nodes_[n].parent = gp;
      incref(gp);
      decref(p);  // p is still referenced by whatever else points at it, or freed
    }
    n = gp;
  }
  return n;
}

void Pool::leave_class(Entry& e) {
  if (e.uf == kNoNode) return;
  nodes_[find_root(e.uf)].cost -= e.cost;
  decref(e.uf);
  e.uf = kNoNode;
}

// Note [Neighbour counts]
// Most candidates have no evicted neighbour, and then dtr_eq's and dtr's extra
// term and msps's ancestor cost are zero. Each entry counts its evicted
// parents and children (updated when a neighbour is evicted, rematerialized or
// removed), so the exact scan reads one entry per such candidate instead of
// chasing every neighbour: that is most of its time at 10,000 candidates.
void Pool::count_as_evicted_neighbour(Entry& e, int32_t delta) {
  for (Entry* p : e.parents) p->evicted_children += delta;
  for (Entry* c : e.children) c->evicted_parents += delta;
}

// ---------------------------------------------------------------------------
// Lifecycle
// ---------------------------------------------------------------------------

void Pool::insert(Entry& e, int64_t sid, int64_t nbytes, double cost, double now, bool evictable) {
  TORCH_CHECK(nbytes >= 0, "dtr: storage ", sid, " added with negative size ", nbytes);
  if (indexed_) {
    TORCH_CHECK(index_.emplace(sid, &e).second, "dtr: internal error: storage id ", sid,
                " added twice");
  }
  e.list_prev = last_;
  e.list_next = nullptr;
  (last_ != nullptr ? last_->list_next : first_) = &e;
  last_ = &e;
  ++count_;
  e.sid = sid;
  e.nbytes = nbytes;
  e.cost = cost;
  if (!(cost >= 0.0)) odd_cost_ = true;
  e.last_access = now;
  e.evictable = evictable;
  computed_cost_ += cost;
  ++adds_;
}

void Pool::link_parent(Entry& e, Entry* pe) {
  if (pe == nullptr || pe == &e) return;
  if (std::find(e.parents.begin(), e.parents.end(), pe) != e.parents.end()) return;
  e.parents.push_back(pe);
  pe->children.push_back(&e);
  if (!pe->resident) ++e.evicted_parents;
}

Entry& Pool::insert_owned(int64_t sid, int64_t nbytes, double cost, double now, bool evictable) {
  ensure_index();  // the id API: ids are the caller's, so they are checked for repeats
  Entry* e = new_owned_entry();
  try {
    insert(*e, sid, nbytes, cost, now, evictable);
  } catch (...) {
    delete_owned_entry(e);
    throw;
  }
  ++owned_;
  return *e;
}

Entry* Pool::add(int64_t sid, int64_t nbytes, double cost, double now, bool evictable,
                 const std::vector<int64_t>& parents) {
  Entry& e = insert_owned(sid, nbytes, cost, now, evictable);
  for (int64_t p : parents) {
    if (p != sid) link_parent(e, lookup(p));
  }
  maybe_candidate(e);
  return &e;
}

Entry* Pool::add(int64_t sid, int64_t nbytes, double cost, double now, bool evictable,
                 c10::ArrayRef<Entry*> parents) {
  Entry& e = insert_owned(sid, nbytes, cost, now, evictable);
  for (Entry* p : parents) link_parent(e, p);
  maybe_candidate(e);
  return &e;
}

void Pool::add_held(Entry& e, void* owner, int64_t sid, int64_t nbytes, double cost, double now,
                    bool evictable, c10::ArrayRef<Entry*> parents) {
  TORCH_INTERNAL_ASSERT(owner != nullptr, "dtr: a held entry needs its owner");
  TORCH_INTERNAL_ASSERT(e.owner == nullptr, "dtr: an entry added to the pool twice");
  insert(e, sid, nbytes, cost, now, evictable);
  e.owner = owner;
  for (Entry* p : parents) link_parent(e, p);
  maybe_candidate(e);
}

void Pool::remove(int64_t sid) {
  Entry* e = lookup(sid);
  if (e != nullptr) remove(*e);
}

void Pool::remove(Entry& e) {
  drop_candidate(e);
  leave_class(e);  // it leaves its class, as a rematerialized member does
  if (!e.resident) count_as_evicted_neighbour(e, -1);
  for (Entry* p : e.parents) erase_first(p->children, &e);
  for (Entry* c : e.children) erase_first(c->parents, &e);
  if (indexed_) index_.erase(e.sid);
  (e.list_prev != nullptr ? e.list_prev->list_next : first_) = e.list_next;
  (e.list_next != nullptr ? e.list_next->list_prev : last_) = e.list_prev;
  e.list_prev = e.list_next = nullptr;
  --count_;
  if (e.owned()) {
    --owned_;
    delete_owned_entry(&e);
  }
}

// ---------------------------------------------------------------------------
// Per-op updates
// ---------------------------------------------------------------------------

void Pool::touch(int64_t sid, double now) {
  if (Entry* e = lookup(sid)) touch(*e, now);
}

void Pool::add_cost(int64_t sid, double cost) { add_cost(get(sid, "add_cost"), cost); }

void Pool::add_cost(Entry& e, double cost) {
  e.cost += cost;
  computed_cost_ += cost;
  if (!(e.cost >= 0.0) || !(cost >= 0.0)) odd_cost_ = true;
}

void Pool::lock(int64_t sid) { lock(get(sid, "lock")); }

void Pool::unlock(int64_t sid) { unlock(get(sid, "unlock")); }

int64_t Pool::locks(int64_t sid) const {
  const Entry* e = find(sid);
  return e == nullptr ? 0 : e->locks;
}

double Pool::cost(int64_t sid) const {
  const Entry* e = find(sid);
  return e == nullptr ? 0.0 : e->cost;
}

double Pool::last_access(int64_t sid) const {
  const Entry* e = find(sid);
  return e == nullptr ? 0.0 : e->last_access;
}

void Pool::pin(int64_t sid) {
  if (Entry* e = lookup(sid)) pin(*e);
}

void Pool::pin(Entry& e) {
  e.evictable = false;
  drop_candidate(e);
}

void Pool::evicted(int64_t sid) {
  if (Entry* e = lookup(sid)) evicted(*e);
}

void Pool::evicted(Entry& e) {
  if (!e.resident) return;
  e.resident = false;
  drop_candidate(e);
  count_as_evicted_neighbour(e, +1);
  TORCH_INTERNAL_ASSERT(e.uf == kNoNode, "dtr: a resident storage belongs to an evicted class");
  if (!tracks_classes_) return;
  // The new node stays the root and absorbs the classes of the evicted
  // neighbours (parents first, then children), as PythonPool.evicted.
  uint32_t node = new_node(e.cost);
  auto absorb = [&](Entry* n) {
    if (n->resident || n->uf == kNoNode) return;
    uint32_t rb = find_root(n->uf);
    if (rb == node) return;
    nodes_[rb].parent = node;
    incref(node);
    nodes_[node].cost += nodes_[rb].cost;
  };
  for (Entry* n : e.parents) absorb(n);
  for (Entry* n : e.children) absorb(n);
  e.uf = node;
}

void Pool::rematerialized(int64_t sid, double now) {
  rematerialized(get(sid, "rematerialized"), now);
}

void Pool::rematerialized(Entry& e, double now) {
  if (e.resident) return;
  e.resident = true;
  e.last_access = now;
  count_as_evicted_neighbour(e, -1);
  leave_class(e);
  maybe_candidate(e);
  count_recomputed(e.cost);
}

// Note [Thrash guard]
// As dtr.policies' Note [Thrash guard]: the pool sums the cost of what it was
// given to hold (add, add_cost) and of what was rematerialized; once the
// second passes kThrashGuardRatio times the first, or the rematerializations
// kThrashGuardRatio times the storages added, after at least
// kThrashGuardMinRemats rematerializations, it trips, once per pool (one
// block): from then on it samples (Note [Sampling]) above
// kThrashGuardSampleAbove candidates, and the session warns.

void Pool::count_recomputed(double cost) {
  recomputed_cost_ += cost;
  ++remats_;
  if (thrash_guard_trips_ == 0 && search_.thrash_guard && remats_ >= kThrashGuardMinRemats &&
      (recomputed_cost_ > kThrashGuardRatio * computed_cost_ ||
       static_cast<double>(remats_) > kThrashGuardRatio * static_cast<double>(adds_))) {
    thrash_guard_trips_ = 1;
    if (search_.sample_above < 0 || search_.sample_above > kThrashGuardSampleAbove) {
      search_.sample_above = kThrashGuardSampleAbove;
    }
  }
}

void Pool::set_next_use(int64_t sid, double when) { get(sid, "set_next_use").next_use = when; }

double Pool::next_use(int64_t sid) const {
  const Entry* e = find(sid);
  return e == nullptr ? std::numeric_limits<double>::quiet_NaN() : e->next_use;
}

// ---------------------------------------------------------------------------
// Scores. Each mirrors the function of the same name in dtr/policies.py.
// ---------------------------------------------------------------------------

double Pool::equivalence_class_cost(Entry& e) {
  roots_.clear();
  auto visit = [&](Entry* n) {
    if (n->resident || n->uf == kNoNode) return;
    uint32_t r = find_root(n->uf);
    if (std::find(roots_.begin(), roots_.end(), r) == roots_.end()) roots_.push_back(r);
  };
  for (Entry* n : e.parents) visit(n);
  for (Entry* n : e.children) visit(n);
  PySum total;
  for (uint32_t r : roots_) total.add(nodes_[r].cost);
  return total.value();
}

double Pool::evicted_neighbourhood_cost(Entry& e) {
  // Depth-first over evicted neighbours with an explicit stack, visiting in
  // exactly the order of the Python generator-based walk.
  uint64_t seen = ++epoch_;
  e.mark = seen;
  stack_.clear();
  auto push_evicted_neighbours = [&](Entry& x) {
    for (Entry* n : x.parents)
      if (!n->resident && n->mark != seen) stack_.push_back(n);
    for (Entry* n : x.children)
      if (!n->resident && n->mark != seen) stack_.push_back(n);
  };
  // The first expansion does not filter on seen in Python, but only e is seen then.
  push_evicted_neighbours(e);
  double total = 0.0;
  while (!stack_.empty()) {
    Entry* n = stack_.back();
    stack_.pop_back();
    if (n->mark == seen) continue;
    n->mark = seen;
    total += n->cost;
    push_evicted_neighbours(*n);
  }
  return total;
}

double Pool::evicted_ancestor_cost(Entry& e) {
  uint64_t seen = ++epoch_;
  e.mark = seen;
  stack_.assign(e.parents.begin(), e.parents.end());
  double total = 0.0;
  while (!stack_.empty()) {
    Entry* n = stack_.back();
    stack_.pop_back();
    if (n->mark == seen) continue;
    n->mark = seen;
    if (n->resident) continue;
    total += n->cost;
    stack_.insert(stack_.end(), n->parents.begin(), n->parents.end());
  }
  return total;
}

double Pool::evicted_region_cost(Entry& e, bool forward) {
  // As the Python walk: every popped storage is marked seen, resident ones
  // stop the walk there (and add nothing).
  uint64_t seen = ++epoch_;
  e.mark = seen;
  const auto& first = forward ? e.children : e.parents;
  stack_.assign(first.begin(), first.end());
  double total = 0.0;
  while (!stack_.empty()) {
    Entry* n = stack_.back();
    stack_.pop_back();
    if (n->mark == seen) continue;
    n->mark = seen;
    if (n->resident) continue;
    total += n->cost;
    const auto& next = forward ? n->children : n->parents;
    stack_.insert(stack_.end(), next.begin(), next.end());
  }
  return total;
}

double Pool::needed_next(Entry& e) {
  double nu = e.next_use;
  uint64_t seen = ++epoch_;
  e.mark = seen;
  stack_.assign(e.children.begin(), e.children.end());
  while (!stack_.empty()) {
    Entry* n = stack_.back();
    stack_.pop_back();
    if (n->mark == seen) continue;
    n->mark = seen;
    if (n->resident) continue;
    if (n->next_use < nu) nu = n->next_use;  // an unknown (NaN) next use never wins
    stack_.insert(stack_.end(), n->children.begin(), n->children.end());
  }
  return nu;
}

double Pool::lookahead_distance(Entry& e, double now) {
  if (std::isnan(e.next_use)) return staleness(e, now);
  // With no evicted child the walk finds nothing sooner.
  double d = (e.evicted_children == 0 ? e.next_use : needed_next(e)) - plan_clock_;
  d = (kMinStaleness > d) ? kMinStaleness : d;
  // dtr.policies._LOOKAHEAD_RECENCY; Python's min(d, r) keeps d unless r < d.
  const double recent = 4096.0 * staleness(e, now);
  return (recent < d) ? recent : d;
}

double Pool::score(Entry& e, double now) {
  // See Note [Neighbour counts]: with no evicted neighbour the walks add 0.
  // (e.cost + 0.0 keeps the operations those of the Python functions.)
  const bool lonely = e.evicted_parents == 0 && e.evicted_children == 0;
  switch (policy_) {
    case Policy::DtrEq:
      return (e.cost + (lonely ? 0.0 : equivalence_class_cost(e))) /
             (static_cast<double>(e.nbytes) * staleness(e, now));
    case Policy::Dtr:
      return (e.cost + (lonely ? 0.0 : evicted_neighbourhood_cost(e))) /
             (static_cast<double>(e.nbytes) * staleness(e, now));
    case Policy::DtrLocal:
      return e.cost / (static_cast<double>(e.nbytes) * staleness(e, now));
    case Policy::Msps:
      return (e.cost + (e.evicted_parents == 0 ? 0.0 : evicted_ancestor_cost(e))) /
             static_cast<double>(e.nbytes);
    case Policy::Lru:
      return 1.0 / staleness(e, now);
    case Policy::Largest:
      return 1.0 / static_cast<double>(e.nbytes);
    case Policy::Random:
      return rng_.uniform();
    case Policy::MspsSqrt:
      return (e.cost + (e.evicted_parents == 0 ? 0.0 : evicted_ancestor_cost(e))) /
             (static_cast<double>(e.nbytes) * std::sqrt(staleness(e, now)));
    case Policy::Lookahead: {
      double c = e.cost + (e.evicted_parents == 0 ? 0.0 : evicted_ancestor_cost(e));
      return c / (static_cast<double>(e.nbytes) * std::sqrt(lookahead_distance(e, now)));
    }
    case Policy::DtrRegions: {
      // A region with no evicted storage next to e sums to 0.0.
      double c = e.cost + (e.evicted_children == 0 ? 0.0 : evicted_region_cost(e, true));
      c = c + (e.evicted_parents == 0 ? 0.0 : evicted_region_cost(e, false));
      return c / (static_cast<double>(e.nbytes) * staleness(e, now));
    }
    case Policy::Python: {
      std::vector<double> sc(1);
      scorer_->score(*this, {e.sid}, now, sc);
      return sc[0];
    }
  }
  TORCH_INTERNAL_ASSERT(false, "dtr: unknown policy");
}

// ---------------------------------------------------------------------------
// The search
// ---------------------------------------------------------------------------

// Note [Bounded scan]
// For dtr, dtr_regions, msps, msps_sqrt and lookahead a score is (c0 + W) / d, where W is
// a sum of costs found by walking the evicted graph around the candidate and
// d does not depend on W. With every cost >= 0, W >= 0, and floating-point
// addition and division by the same positive d are monotone, so c0 / d (the
// score with W = 0.0, computed with the same operations) is a lower bound of
// the exact score, bit for bit. The scan scores the candidates that need no
// walk first, then walks the others in increasing order of their bound and
// stops at the first bound above the best exact score. The victim is the same
// as the full scan's (the lowest score, ties to the smallest id: a bound equal
// to the best is still walked), only the walks that cannot win are skipped.
// Under the paper's semantics, where every recipe is kept, those walks cover
// long evicted regions and were nearly all of a replay's time (LSTM at 0.2
// with dtr_regions: 38 s, most of it walks). dtr_eq's class sums can drift
// below the members' costs (a cost added while evicted), so it scans fully;
// so does every policy once a negative or NaN cost was seen.
bool Pool::can_bound() const {
  if (odd_cost_) return false;
  switch (policy_) {
    case Policy::Dtr:
    case Policy::Msps:
    case Policy::MspsSqrt:
    case Policy::DtrRegions:
    case Policy::Lookahead:
      return true;
    default:
      return false;
  }
}

bool Pool::needs_walk(const Entry& e) const {
  switch (policy_) {
    case Policy::Msps:
    case Policy::MspsSqrt:
      return e.evicted_parents != 0;
    case Policy::Lookahead:
      return e.evicted_parents != 0 || (e.evicted_children != 0 && !std::isnan(e.next_use));
    default:
      return e.evicted_parents != 0 || e.evicted_children != 0;
  }
}

double Pool::base_score(const Entry& e, double now) const {
  // score() with every walk's sum 0.0, the same operations in the same order.
  const double d = static_cast<double>(e.nbytes);
  switch (policy_) {
    case Policy::Msps:
      return (e.cost + 0.0) / d;
    case Policy::MspsSqrt:
      return (e.cost + 0.0) / (d * std::sqrt(staleness(e, now)));
    case Policy::Lookahead:
      // Its own next use is no sooner than when it is needed.
      return (e.cost + 0.0) / (d * std::sqrt(own_lookahead_distance(e, now, plan_clock_)));
    case Policy::DtrRegions: {
      double c = e.cost + 0.0;
      c = c + 0.0;
      return c / (d * staleness(e, now));
    }
    default:
      return (e.cost + 0.0) / (d * staleness(e, now));
  }
}

const Entry* Pool::scan_bounded(const std::vector<Entry*>& entries, double now) {
  const Entry* best = nullptr;
  double best_score = std::numeric_limits<double>::infinity();
  auto offer = [&](Entry* e, double sc) {
    if (best == nullptr || sc < best_score || (sc == best_score && e->sid < best->sid)) {
      best = e;
      best_score = sc;
    }
  };
  deferred_.clear();
  for (Entry* e : entries) {
    if (e->locks) continue;
    if (needs_walk(*e)) {
      deferred_.emplace_back(base_score(*e, now), e);
    } else {
      offer(e, score(*e, now));
    }
  }
  std::sort(deferred_.begin(), deferred_.end(), [](const auto& a, const auto& b) {
    return a.first < b.first || (a.first == b.first && a.second->sid < b.second->sid);
  });
  for (const auto& [bound, e] : deferred_) {
    if (best != nullptr && bound > best_score) break;
    offer(e, score(*e, now));
  }
  return best;
}

// See Note [Policies written in Python] in pool.h.
// Locals, not scratch members: the callable may run ops that search again.
const Entry* Pool::scan_external(const std::vector<Entry*>& entries, double now) {
  std::vector<int64_t> sids;
  sids.reserve(entries.size());
  for (const Entry* e : entries)
    if (!e->locks) sids.push_back(e->sid);
  if (sids.empty()) return nullptr;
  std::vector<double> scores(sids.size(), 0.0);
  scorer_->score(*this, sids, now, scores);
  const Entry* best = nullptr;
  double best_score = std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < sids.size(); ++i) {
    // Still a candidate after the call (see ExternalScorer::score)?
    const Entry* e = lookup(sids[i]);
    if (e == nullptr || e->cand_pos == kNotCandidate || e->locks) continue;
    const double sc = scores[i];
    if (best == nullptr || sc < best_score || (sc == best_score && e->sid < best->sid)) {
      best = e;
      best_score = sc;
    }
  }
  return best;
}

const Entry* Pool::scan(const std::vector<Entry*>& entries, double now) {
  if (policy_ == Policy::Python) return scan_external(entries, now);
  if (can_bound()) return scan_bounded(entries, now);
  const Entry* best = nullptr;
  double best_score = std::numeric_limits<double>::infinity();
  const size_t n = entries.size();
  Entry* const* data = entries.data();
  for (size_t i = 0; i < n; ++i) {
    // The candidates are scattered in memory: fetch a few ahead.
    if (i + 8 < n) __builtin_prefetch(data[i + 8]);
    Entry* e = data[i];
    if (e->locks) continue;
    double sc = score(*e, now);
    if (best == nullptr || sc < best_score || (sc == best_score && e->sid < best->sid)) {
      best = e;
      best_score = sc;
    }
  }
  return best;
}

const Entry* Pool::choose_victim(double now) {
  const size_t n = cands_.size();
  if (n == 0) return nullptr;
  if (search_.sample_above < 0 || n <= static_cast<size_t>(search_.sample_above)) {
    return scan(cands_, now);
  }
  // Note [Sampling]
  // k = isqrt(n) uniform draws (with replacement) from the candidate array.
  // PythonPool draws the same indices from the same generator, so the two
  // still agree. (A fixed stride would alias with periodic layouts, such as
  // alternating big and small activations.)
  size_t k = static_cast<size_t>(std::sqrt(static_cast<double>(n)));
  while (k * k > n) --k;
  while ((k + 1) * (k + 1) <= n) ++k;
  k = std::max<size_t>(k, 1);
  sample_.clear();
  for (size_t i = 0; i < k; ++i) sample_.push_back(cands_[rng_.next() % n]);
  const std::vector<Entry*>* pick = &sample_;
  if (search_.min_evictable_fraction > 0) {
    const double floor =
        search_.min_evictable_fraction * static_cast<double>(candidate_bytes_) / static_cast<double>(n);
    big_.clear();
    for (Entry* e : sample_)
      if (static_cast<double>(e->nbytes) >= floor) big_.push_back(e);
    if (!big_.empty()) pick = &big_;
  }
  const Entry* best = scan(*pick, now);
  if (best == nullptr) best = scan(cands_, now);  // every sampled one was locked
  return best;
}

std::vector<int64_t> Pool::unlocked_candidates() const {
  std::vector<int64_t> out;
  out.reserve(cands_.size());
  for (const Entry* e : cands_)
    if (!e->locks) out.push_back(e->sid);
  return out;
}

// ---------------------------------------------------------------------------
// Introspection
// ---------------------------------------------------------------------------

uint32_t Pool::class_root(int64_t sid) {
  Entry* e = lookup(sid);
  if (e == nullptr || e->uf == kNoNode) return kNoNode;
  return find_root(e->uf);
}

double Pool::class_cost(int64_t sid) {
  uint32_t r = class_root(sid);
  return r == kNoNode ? std::nan("") : nodes_[r].cost;
}

void Pool::check_invariants() {
  int64_t bytes = 0;
  for (size_t i = 0; i < cands_.size(); ++i) {
    const Entry* e = cands_[i];
    TORCH_INTERNAL_ASSERT(e->cand_pos == static_cast<int64_t>(i), "candidate position of ", e->sid);
    bytes += e->nbytes;
  }
  TORCH_INTERNAL_ASSERT(bytes == candidate_bytes_, "candidate bytes ", candidate_bytes_, " != ", bytes);
  std::vector<uint32_t> refs(nodes_.size(), 0);
  size_t ncands = 0;
  ensure_index();
  TORCH_INTERNAL_ASSERT(index_.size() == count_, "index holds ", index_.size(), " of ", count_);
  size_t listed = 0;
  for (const Entry* e = first_; e != nullptr; e = e->list_next) {
    TORCH_INTERNAL_ASSERT(e->list_next == nullptr ? last_ == e : e->list_next->list_prev == e);
    TORCH_INTERNAL_ASSERT(lookup(e->sid) == e, "entry ", e->sid, " not indexed");
    ++listed;
  }
  TORCH_INTERNAL_ASSERT(listed == count_, "entry list holds ", listed, " of ", count_);
  for (auto& [sid, held] : index_) {
    Entry& e = *held;
    TORCH_INTERNAL_ASSERT(sid == e.sid);
    bool should = e.resident && e.evictable && e.nbytes > 0;
    TORCH_INTERNAL_ASSERT(should == (e.cand_pos != kNotCandidate), "candidate set wrong for ", sid);
    ncands += should;
    TORCH_INTERNAL_ASSERT((e.resident || !tracks_classes_) == (e.uf == kNoNode),
                          "class membership wrong for ", sid);
    TORCH_INTERNAL_ASSERT(e.locks >= 0);
    int32_t ep = 0, ec = 0;
    for (Entry* p : e.parents) ep += !p->resident;
    for (Entry* c : e.children) ec += !c->resident;
    TORCH_INTERNAL_ASSERT(ep == e.evicted_parents && ec == e.evicted_children,
                          "evicted neighbour counts wrong for ", sid);
    if (e.uf != kNoNode) ++refs[e.uf];
    for (Entry* p : e.parents) {
      TORCH_INTERNAL_ASSERT(std::count(p->children.begin(), p->children.end(), &e) == 1);
      TORCH_INTERNAL_ASSERT(lookup(p->sid) == p);
    }
    for (Entry* c : e.children) {
      TORCH_INTERNAL_ASSERT(std::count(c->parents.begin(), c->parents.end(), &e) == 1);
      TORCH_INTERNAL_ASSERT(lookup(c->sid) == c);
    }
  }
  TORCH_INTERNAL_ASSERT(ncands == cands_.size());
  std::vector<bool> is_free(nodes_.size(), false);
  for (uint32_t f : free_nodes_) is_free[f] = true;
  for (uint32_t i = 0; i < nodes_.size(); ++i) {
    if (is_free[i]) continue;
    if (nodes_[i].parent != i) {
      TORCH_INTERNAL_ASSERT(!is_free[nodes_[i].parent], "a live node points at a free one");
      ++refs[nodes_[i].parent];
    }
  }
  for (uint32_t i = 0; i < nodes_.size(); ++i) {
    if (is_free[i]) continue;
    TORCH_INTERNAL_ASSERT(refs[i] == nodes_[i].refs, "node ", i, " has ", nodes_[i].refs,
                          " references, expected ", refs[i]);
    TORCH_INTERNAL_ASSERT(refs[i] > 0, "a live node nobody refers to");
  }
}

}  // namespace dtr
