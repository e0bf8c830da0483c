#include "runtime.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/GradMode.h>

#include <unordered_set>

#include "capture.h"
#include "errors.h"
#include "alloc_meter.h"
#include "grad_hook.h"
#include "hidden_writes.h"
#include "op_clock.h"
#include "op_memory.h"
#include "op_traits.h"
#include "scratch.h"
#include "weak_lists.h"
#include "tensor_walk.h"
#include "recipe_stack.h"
#include "sparse.h"
#include "thread_state.h"
#include "wrapper.h"

namespace dtr {
namespace {

// See Note [Tiny values] in dtr/runtime.py.
constexpr int64_t kMinEvictableBytes = 32;


// Note [The argument hash]
// An op's planned memory is found by this hash alone, so a collision would
// plan the wrong bytes. Each step (rotate, xor, multiply by an odd constant)
// is a bijection of the state for a fixed word and of the word for a fixed
// state, so two argument lists of the same length that differ in one word
// never collide; the length is in the hash (the schema, each tensor's rank).
// It is three instructions a word; the previous mix, with a per-word
// finalizer, was about eleven, on some fifteen words an op.
inline uint64_t mix(uint64_t h, uint64_t v) {
  return (((h << 5) | (h >> 59)) ^ v) * 0x9E3779B97F4A7C15ULL;
}

uint64_t hash_tensor(uint64_t h, const at::Tensor& t) {
  if (!t.defined()) return mix(h, 0x55);
  // One word for what is not a size or a stride (each field in its own bits),
  // the number of dimensions among it, so that sizes and strides need no
  // separator: a mix per size and stride, and one more.
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const auto layout = static_cast<uint64_t>(impl->layout());
  const bool strided = layout == static_cast<uint64_t>(c10::kStrided);
  h = mix(h, static_cast<uint64_t>(impl->dtype().toScalarType()) |
                 (static_cast<uint64_t>(impl->device_type()) << 8) | (layout << 16) |
                 (static_cast<uint64_t>(impl->dim()) << 24));
  for (int64_t s : impl->sizes()) h = mix(h, static_cast<uint64_t>(s));
  if (!strided) return h;  // a sparse tensor has no strides
  for (int64_t s : impl->strides()) h = mix(h, static_cast<uint64_t>(s));
  return h;
}

// False when an argument cannot be hashed (then nothing is cached).
bool hash_ivalue(uint64_t& h, const c10::IValue& v) {
  if (v.isTensor()) {
    h = hash_tensor(h, v.toTensor());
  } else if (v.isNone()) {
    h = mix(h, 1);
  } else if (v.isInt()) {
    h = mix(mix(h, 2), static_cast<uint64_t>(v.toInt()));
  } else if (v.isDouble()) {
    double d = v.toDouble();
    uint64_t bits;
    std::memcpy(&bits, &d, sizeof bits);
    h = mix(mix(h, 3), bits);
  } else if (v.isBool()) {
    h = mix(mix(h, 4), v.toBool());
  } else if (v.isIntList()) {
    h = mix(h, 5);
    for (int64_t x : v.toIntList()) h = mix(h, static_cast<uint64_t>(x));
  } else if (v.isTensorList()) {
    h = mix(h, 6);
    for (const at::Tensor& t : v.toTensorList()) h = hash_tensor(h, t);
  } else if (v.isOptionalTensorList()) {
    h = mix(h, 7);
    for (std::optional<at::Tensor> t : v.toOptionalTensorList()) {
      h = t ? hash_tensor(h, *t) : mix(h, 8);
    }
  } else if (v.isScalar()) {
    // Complex/SymInt scalars fall through as not hashable.
    return false;
  } else if (v.isString()) {
    h = mix(mix(h, 9), std::hash<std::string>()(v.toStringRef()));
  } else if (v.isDevice()) {
    h = mix(mix(h, 10), static_cast<uint64_t>(v.toDevice().type()));
  } else if (v.isGenerator()) {
    h = mix(h, 11);
  } else if (v.isDoubleList()) {
    h = mix(h, 12);
    for (double d : v.toDoubleList()) {
      uint64_t bits;
      std::memcpy(&bits, &d, sizeof bits);
      h = mix(h, bits);
    }
  } else if (v.isBoolList()) {
    h = mix(h, 13);
    for (bool b : v.toBoolList()) h = mix(h, b);
  } else {
    return false;
  }
  return true;
}

at::Tensor to_meta(const at::Tensor& t) {
  if (!t.defined()) return t;
  // A sparse tensor in a list (top-level ones leave the op unplanned): a dense stand-in.
  if (is_sparse_value(t)) return at::empty(t.sizes(), t.options().device(c10::kMeta).layout(c10::kStrided));
  return at::empty_strided(t.sizes(), t.strides(), t.options().device(c10::kMeta));
}

c10::IValue meta_ivalue(const c10::IValue& v) {
  if (v.isTensor()) return to_meta(v.toTensor());
  if (v.isTensorList()) {
    c10::List<at::Tensor> out;
    for (const at::Tensor& t : v.toTensorList()) out.push_back(to_meta(t));
    return out;
  }
  if (v.isOptionalTensorList()) {
    c10::List<std::optional<at::Tensor>> out;
    for (std::optional<at::Tensor> t : v.toOptionalTensorList()) {
      out.push_back(t ? std::optional<at::Tensor>(to_meta(*t)) : std::nullopt);
    }
    return out;
  }
  if (v.isGenerator()) return c10::IValue();
  return v;
}

std::vector<at::Tensor> flat_tensors(const torch::jit::Stack& stack, size_t first) {
  std::vector<at::Tensor> out;
  for (size_t i = first; i < stack.size(); ++i) {
    for_each_tensor(stack[i], [&](const at::Tensor& t) { out.push_back(t); });
  }
  return out;
}

c10::weak_intrusive_ptr<Cell> no_cell() {
  return c10::weak_intrusive_ptr<Cell>(c10::intrusive_ptr<Cell>());
}

// unsafe_storage() is storage_ itself: empty in the TensorImpls that have no
// storage to read (sparse, opaque, functorch's batched), with no data in
// meta and fake ones, which count_plain skips. has_storage() and storage()
// would tell the same with two out-of-line calls, asked for every input and
// output of every op. (The one TensorImpl whose has_storage() differs from
// its storage_ is dtr's own wrapper, which never gets here: its value does.)
const c10::StorageImpl* storage_of(const at::Tensor& t) {
  return t.defined() ? t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl() : nullptr;
}

}  // namespace

Runtime::Runtime(std::optional<int64_t> limit, Policy policy, SearchOptions search, bool evict_all,
                 std::shared_ptr<ExternalScorer> scorer)
    : pool_(policy, search, std::move(scorer)),
      limit_(limit),
      limited_(limit.has_value()),
      evict_all_(evict_all) {}

Runtime::~Runtime() = default;

std::optional<int64_t> Runtime::limit() {
  Lock g(mu_);
  return limit_;
}

void Runtime::set_limit(std::optional<int64_t> limit) {
  Lock g(mu_);
  limit_ = limit;
  limited_.store(limit.has_value(), std::memory_order_relaxed);
}

Stats Runtime::stats() {
  Lock g(mu_);
  stats_.tracked_bytes = tracked();
  stats_.thrash_guard_trips = pool_.thrash_guard_trips();
  stats_.recomputed_cost = pool_.recomputed_cost();
  note_step_stats();
  return stats_;
}

int64_t Runtime::thrash_guard_trips() {
  Lock g(mu_);
  return pool_.thrash_guard_trips();
}

int64_t Runtime::tracked() const {
  if (meter_offset_) return meter::current_bytes() + *meter_offset_;
  if (device_meter_) return device_meter_->allocated_bytes();
  return pool_bytes_ + plain_bytes_;
}

void Runtime::use_cpu_meter(int64_t outside_bytes) {
  Lock g(mu_);
  meter_offset_ = outside_bytes;
}

void Runtime::use_device_allocator(c10::Device device) {
  DeviceMeter meter(device);
  Lock g(mu_);
  device_meter_.emplace(meter);
}

int64_t Runtime::bytes_in_use() {
  Lock g(mu_);
  drain_pending();
  return tracked();
}

int64_t Runtime::evict_to(int64_t limit) {
  Lock g(mu_);
  drain_pending();
  while (tracked() > limit) {
    const Entry* victim = pool_.choose_victim(clock_);
    if (victim == nullptr) break;
    evict(record_of(*victim), /*counted=*/true);
  }
  return tracked();
}

bool Runtime::has_live_values() {
  Lock g(mu_);
  return pool_.size() > 0;
}

void Runtime::note_peak(int64_t reserved) {
  int64_t t = tracked();
  stats_.tracked_bytes = t;
  if (t + reserved > stats_.peak_bytes) stats_.peak_bytes = t + reserved;
}

c10::intrusive_ptr<StorageRecord> Runtime::new_storage(int64_t nbytes, double cost, bool pinned,
                                                       c10::ArrayRef<Entry*> parents) {
  int64_t sid = next_sid_++;
  auto rec = c10::make_intrusive<StorageRecord>(
      c10::intrusive_ptr<Runtime>::reclaim_copy(this), sid, nbytes, pinned);
  bool evictable = !pinned && (nbytes >= kMinEvictableBytes || evict_all_);
  pool_.add_held(rec->entry, rec.get(), sid, nbytes, cost, clock_, evictable, parents);
  if (step_) step_->storage_created(pool_, sid);
  pool_bytes_ += nbytes;
  return rec;
}

void Runtime::storage_died(StorageRecord* rec) {
  Lock g(mu_);
  if (rec->entry.owner != nullptr) pool_.remove(rec->entry);  // null: its add failed
  if (rec->resident && !rec->escaped) pool_bytes_ -= rec->nbytes;
}

void Runtime::count_plain(const at::Tensor& t) {
  // With an allocator's count the runtime keeps none of its own.
  if (meter_offset_ || device_meter_) return;
  if (is_sparse_value(t)) {  // Note [Sparse tensors in the C++ runtime]
    for (const at::Tensor& part : sparse_parts(t)) count_plain(part);
    return;
  }
  const c10::StorageImpl* st = storage_of(t);
  if (st == nullptr || st->data() == nullptr) return;
  if (plain_.count(st)) return;
  int64_t nb = storage_bytes(t);
  plain_.emplace(st, std::make_pair(c10::weak_intrusive_ptr<c10::StorageImpl>(t.storage().getWeakStorageImpl()), nb));
  plain_bytes_ += nb;
  if (plain_.size() >= plain_sweep_at_) {
    for (auto it = plain_.begin(); it != plain_.end();) {
      if (it->second.first.expired()) {
        plain_bytes_ -= it->second.second;
        it = plain_.erase(it);
      } else {
        ++it;
      }
    }
    plain_sweep_at_ = std::max<size_t>(1024, 2 * plain_.size());
  }
}

// ---------------------------------------------------------------------------
// Wrappers report to their storage record
// ---------------------------------------------------------------------------

void Runtime::wrapper_released(c10::intrusive_ptr<Cell> cell) {
  Lock g(mu_, std::try_to_lock);
  if (!g.owns_lock()) {
    std::lock_guard<std::mutex> pg(pending_mu_);
    pending_.push_back(std::move(cell));
    has_pending_.store(true, std::memory_order_release);
    return;
  }
  release_locked(std::move(cell));
}

bool Runtime::only_wrapper_sees(const Cell& cell, c10::function_ref<void()> then) {
  // Asked from autograd (and any caller of has_storage), which may hold the GIL
  // that an op holding the lock waits for (Note [Deferred releases]): never wait.
  // Not knowing is "no", which only costs the sum a new tensor.
  Lock g(mu_, std::try_to_lock);
  if (!g.owns_lock()) return false;
  const StorageRecord& rec = *cell.storage;
  // A release still pending (Note [Deferred releases]) only overcounts: no harm.
  if (closed_ || rec.nwrappers != 1 || rec.escaped) return false;
  then();
  return true;
}

void Runtime::release_locked(c10::intrusive_ptr<Cell> cell) {
  StorageRecord& rec = *cell->storage;
  rec.nwrappers -= 1;
  if (rec.nwrappers == 0) {
    rec.wrappers.clear();
    maybe_banish(rec);
  } else if (rec.wrappers.size() > 2 * static_cast<size_t>(rec.nwrappers) + 8) {
    erase_expired(rec.wrappers);  // Note [Pruning weak lists]
  }
  // `cell` (and what only it kept alive) is released here, under the lock.
}

void Runtime::drain_pending() {
  if (!has_pending_.load(std::memory_order_acquire)) return;
  std::vector<c10::intrusive_ptr<Cell>> pending;
  {
    std::lock_guard<std::mutex> pg(pending_mu_);
    has_pending_.store(false, std::memory_order_relaxed);
    pending.swap(pending_);
  }
  for (auto& c : pending) release_locked(std::move(c));
}

void Runtime::maybe_banish(StorageRecord& rec) {
  // See Note [Eager eviction] in dtr/runtime.py.
  rec.banish_pending = false;
  if (rec.nwrappers == 0 && rec.resident && !rec.pinned) {
    if (rec.entry.locks > 0) {
      rec.banish_pending = true;
    } else {
      evict(rec, /*counted=*/false);
      stats_.eager_evictions += 1;
    }
  }
}

void Runtime::close() {
  Lock g(mu_);
  drain_pending();
  closed_ = true;
  std::vector<c10::weak_intrusive_ptr<StorageRecord>> kept;
  kept.swap(kept_);
  for (auto& w : kept) {
    auto rec = w.lock();
    if (rec && rec->nwrappers == 0) maybe_banish(*rec);
  }
}

// ---------------------------------------------------------------------------
// Eviction and recomputation
// ---------------------------------------------------------------------------

void Runtime::evict(StorageRecord& rec, bool counted) {
  for (auto& w : rec.cells) {
    if (auto c = w.lock()) c->value.reset();
  }
  rec.cells.clear();
  rec.prune_cells_at = StorageRecord::kFirstCellPrune;  // Note [Dead view cells]
  rec.resident = false;
  pool_.evicted(rec.entry);
  pool_bytes_ -= rec.nbytes;
  if (counted) stats_.evictions += 1;
}

void Runtime::set_value(Cell& cell, at::Tensor value) {
  cell.value = std::move(value);
  StorageRecord& rec = *cell.storage;
  rec.add_cell(c10::intrusive_ptr<Cell>::reclaim_copy(&cell));
  if (!rec.resident) {
    rec.resident = true;
    pool_.rematerialized(rec.entry, clock_);
    pool_bytes_ += rec.nbytes;
    note_peak();
  }
}

void Runtime::make_room(int64_t need, const std::string& opname, int64_t working) {
  if (!limit_) return;
  const int64_t limit = *limit_;
  if (tracked() + need <= limit) return;
  const OpClock::Ticks t0 = OpClock::now();
  struct AddTime {
    Stats& s;
    OpClock::Ticks t0;
    ~AddTime() { s.search_seconds += OpClock::seconds_since(t0); }
  } add_time{stats_, t0};
  while (tracked() + need > limit) {
    const Entry* victim = pool_.choose_victim(clock_);
    if (victim == nullptr) {
      // Note [Over the budget without dtr] in dtr/runtime.py: after the block the
      // budget is no promise; the op runs once everything evictable is evicted.
      if (closed_ || need == 0) return;
      const int64_t pinned = tracked();
      const int64_t smallest = pinned + need;
      DTRError e(DTRError::kBudgetExceeded,
                 "dtr: budget of " + format_bytes(limit) + " cannot be met at op " + opname +
                     ": it needs " + format_bytes(need) + " for its outputs on top of " +
                     format_bytes(pinned) +
                     " in use that cannot be evicted (" +
                     (meter_offset_ ? std::string("all CPU tensor memory: parameters, gradients, "
                                                  "optimizer state, inputs, locked inputs and "
                                                  "unrecomputable values")
                                    : "plain tensors such as parameters, inputs and gradients: " +
                                          format_bytes(plain_bytes_) +
                                          "; locked inputs and unrecomputable values: " +
                                          format_bytes(pool_bytes_)) +
                     "). The op's own working set is " + format_bytes(working) +
                     ". The smallest budget that would have worked here is at least " +
                     format_bytes(smallest) + ": retry the step with dtr.budget(" +
                     std::to_string(smallest) + ") or more.");
      e.op = opname;
      e.needed_bytes = need;
      e.pinned_bytes = pinned;
      e.budget_bytes = limit;
      e.smallest_feasible_bytes = smallest;
      throw e;
    }
    evict(record_of(*victim), /*counted=*/true);
  }
}

void Runtime::unlock_all(LockedStorages& locked) {
  // Each is held here, so its entry is still in the pool, even where an
  // in-place op has rebound the storage's last wrapper meanwhile. The storages
  // only `locked` kept go (storage_died) when it is cleared.
  for (const auto& rec : locked) {
    pool_.unlock(rec->entry);
    if (rec->banish_pending) maybe_banish(*rec);
  }
  locked.clear();
}

// Note [Iterative materialization]
// Recomputing an evicted value may need its evicted inputs first, and theirs:
// chains thousands deep (an unrolled RNN). The walk keeps its own stack of
// frames instead of recursing, each frame holding the locks on the inputs it
// has made resident so far (so making room for the next input cannot evict
// them), exactly as dtr/runtime.py's recursive materialize does.
struct Runtime::Frame {
  c10::intrusive_ptr<Cell> cell;
  size_t next = 0;
  LockedStorages locked;
};

void Runtime::recompute_value(const c10::intrusive_ptr<Cell>& target) {
  const bool outermost = depth_ == 0;
  const OpClock::Ticks t0 = outermost ? OpClock::now() : 0;
  ++depth_;
  std::vector<Frame> frames;
  frames.push_back(Frame{target});
  try {
    while (!frames.empty()) {
      const size_t top = frames.size() - 1;
      if (frames[top].cell->value.defined()) {
        unlock_all(frames[top].locked);
        frames.pop_back();
        continue;
      }
      Recipe* recipe = frames[top].cell->recipe.get();
      if (recipe == nullptr) {
        throw DTRError(DTRError::kRecompute,
                       "dtr: internal error: an unrecomputable value was evicted; please report this");
      }
      bool descended = false;
      while (frames[top].next < recipe->inputs.size()) {
        const auto& in = recipe->inputs[frames[top].next];
        if (in.cell) {
          if (!in.cell->value.defined()) {
            frames.push_back(Frame{in.cell});
            descended = true;
            break;
          }
          pool_.lock(in.cell->storage->entry);
          frames[top].locked.push_back(in.cell->storage);
        }
        frames[top].next += 1;
      }
      if (descended) continue;
      recompute(*recipe, frames[top].locked);
      if (!frames[top].cell->value.defined()) {
        throw DTRError(DTRError::kRecompute, "dtr: recomputing " + op_traits(recipe->op).name +
                                                 " did not produce the value it was recorded for");
      }
      unlock_all(frames[top].locked);
      frames.pop_back();
    }
  } catch (...) {
    for (auto& f : frames) unlock_all(f.locked);
    --depth_;
    if (outermost) stats_.remat_seconds += OpClock::seconds_since(t0);
    throw;
  }
  --depth_;
  if (outermost) stats_.remat_seconds += OpClock::seconds_since(t0);
}

at::Tensor plain_value(const RecipeInput& in, const OpTraits& traits) {
  const at::Tensor& t = in.plain;
  if (!t.defined()) return t;
  if (in.scratch) {
    BelowDTRGuard below;  // the copy is scratch, not a value of the block
    return t.clone();
  }
  if (t._version() != in.version) {
    std::ostringstream msg;
    msg << "dtr: cannot recompute " << traits.name
        << ": one of its inputs, a tensor made outside the dtr block (shape " << t.sizes() << ", "
        << t.scalar_type() << "), was modified in place after the value was computed (version "
        << in.version << " -> " << t._version()
        << "), so recomputing would give a different result. Read the values you need "
           "(loss.item(), ...) before changing its inputs in place (for example before "
           "optimizer.step()), or use a larger budget so the value is not evicted.";
    throw DTRError(DTRError::kStaleInput, msg.str());
  }
  if (t.numel() && t.layout() == c10::kStrided && t.has_storage() &&
      t.storage().nbytes() < at::detail::computeStorageNbytes(t.sizes(), t.strides(), t.itemsize(),
                                                              t.storage_offset())) {
    // Note [Freed plain inputs] in dtr/runtime.py: FSDP2 frees gathered
    // parameters in place (storage resized to 0 bytes), which moves no version.
    std::ostringstream msg;
    msg << "dtr: cannot recompute " << traits.name
        << ": one of its inputs, a tensor made outside the dtr block (shape " << t.sizes() << ", "
        << t.scalar_type() << "), has had its memory freed in place since the value was computed "
        << "(its storage now holds " << t.storage().nbytes()
        << " bytes). torch.distributed.fsdp.fully_shard (FSDP2) does this to gathered parameters "
           "when it reshards after forward or backward, and dtr cannot gather them again. Keep "
           "them gathered for the block with `with dtr.distributed.fsdp_keep_gathered(model):` "
           "(see docs/distributed.md), or use a budget large enough that nothing computed from "
           "them is evicted.";
    throw DTRError(DTRError::kUnsupportedOp, msg.str());
  }
  return t;
}

// The argument stack of a recipe with these input values.
void fill_stack(const Recipe& r, const std::vector<at::Tensor>& vals, torch::jit::Stack& stack) {
  std::vector<c10::IValue> args(r.args.begin(), r.args.end());
  std::vector<c10::List<at::Tensor>> lists(args.size());
  std::vector<c10::List<std::optional<at::Tensor>>> olists(args.size());
  for (size_t i = 0; i < r.slots.size(); ++i) {
    const Slot& s = r.slots[i];
    switch (s.kind) {
      case Slot::kTensor:
        args[s.arg] = vals[i];
        break;
      case Slot::kTensorList:
        if (lists[s.arg].size() == 0 && r.list_sizes()[s.arg] > 0) {
          lists[s.arg].resize(r.list_sizes()[s.arg]);
        }
        lists[s.arg].set(s.elem, vals[i]);
        args[s.arg] = lists[s.arg];
        break;
      case Slot::kOptionalTensorList:
        if (olists[s.arg].size() == 0 && r.list_sizes()[s.arg] > 0) {
          olists[s.arg].resize(r.list_sizes()[s.arg]);
        }
        olists[s.arg].set(s.elem, vals[i]);
        args[s.arg] = olists[s.arg];
        break;
    }
  }
  for (auto& a : args) stack.push_back(std::move(a));
}

void Runtime::recompute(Recipe& r, LockedStorages& locked) {
  const OpTraits& traits = op_traits(r.op);
  std::vector<at::Tensor> vals;
  vals.reserve(r.inputs.size());
  int64_t locked_bytes = 0;
  for (const auto& in : r.inputs) {
    if (in.cell) {
      vals.push_back(in.cell->value);
      locked_bytes += in.cell->storage->nbytes;
    } else {
      vals.push_back(plain_value(in, traits));
    }
  }
  // Its kernel's scratch too, and the RNG state the replay saves meanwhile
  // (Note [Measured op scratch] in dtr/scratch.py). Note [Stealing on recompute]:
  // an in-place recipe may write into its old base's memory itself, which then
  // needs no room.
  const std::vector<StorageRecord*> stolen =
      r.mutation().empty() ? std::vector<StorageRecord*>() : stealable_bases(r, locked);
  int64_t need = r.out_bytes + r.scratch_bytes +
                 (r.rng() ? rng_state_bytes(r.rng()->generator.device()) : 0);
  for (const StorageRecord* rec : stolen) need -= rec->nbytes;
  if (need > 0) {
    make_room(need, traits.name + " (recomputing an evicted value)", need + locked_bytes);
    note_peak(need);  // the reservation is the peak, as for an op's first run
  }
  for (StorageRecord* rec : stolen) evict(*rec, /*counted=*/false);
  std::vector<at::Tensor> outs;
  const OpClock::Ticks t0 = OpClock::now();
  if (r.mutation().empty()) {
    torch::jit::Stack stack;
    run_evicting_on_oom(
        [&](bool) {
          stack.clear();
          fill_stack(r, vals, stack);
          c10::AutoGradMode grad(r.grad_enabled);
          BelowDTRGuard below;
          RNGReplayGuard rng(r.rng());
          r.op.callBoxed(&stack);
        },
        traits.name + " (recomputing an evicted value)", std::max<int64_t>(need, 1));
    outs = flat_tensors(stack, 0);
  } else {
    // Not retried on out-of-memory: a write that failed half way cannot be run again.
    c10::AutoGradMode grad(r.grad_enabled);
    BelowDTRGuard below;
    outs = run_mutation_recipe(r, vals);
  }
  auto& by_op = stats_.remat_by_op[traits.name];
  by_op.first += 1;
  by_op.second += OpClock::seconds_since(t0);
  // A recompute is an access like any other (see dtr/runtime.py's _recompute).
  clock_ += r.cost;
  for (const auto& rec : locked) pool_.touch(rec->entry, clock_);
  for (size_t k = 0; k < r.outputs.size() && k < outs.size(); ++k) {
    auto cell = r.outputs[k].lock();
    if (!cell || cell->value.defined() || !outs[k].defined()) continue;
    StorageRecord& rec = *cell->storage;
    if (cell->view_src >= 0 && !rec.resident) continue;
    set_value(*cell, outs[k]);
    pool_.touch(rec.entry, clock_);
    if (rec.nwrappers == 0 && cell->view_src < 0) {
      kept_.emplace_back(c10::intrusive_ptr<StorageRecord>::reclaim_copy(&rec));
    }
  }
  stats_.rematerializations += 1;
}

// ---------------------------------------------------------------------------
// Escapes
// ---------------------------------------------------------------------------

at::Tensor Runtime::escape(const c10::intrusive_ptr<Cell>& cell) {
  Lock g(mu_);
  drain_pending();
  materialize(cell);
  StorageRecord& rec = *cell->storage;
  if (!rec.escaped) {
    if (!rec.pinned) {
      rec.pinned = true;
      pool_.pin(rec.entry);
    }
    rec.escaped = true;
    pool_bytes_ -= rec.nbytes;
    count_plain(cell->value);
  }
  return cell->value;
}

void Runtime::count_plain_tensor(const at::Tensor& t) {
  Lock g(mu_);
  count_plain(t);
}

// Note [Inference tensors as recipe inputs]
// A recipe notices a write into a plain input by its version counter
// (StaleInputError) or by the write's own dispatch (PlainReaders). An
// inference tensor has no counter, and a write in inference mode is the
// user's: such an input is copied when recorded (as it is, layout and all)
// and the recipe keeps the copy, which nothing else can write, as a scratch
// input. Inputs made in inference mode are rare in a block that records
// (autograd cannot save them), and usually small (wrapped numbers).
void Runtime::record_plain_input(RecipeInput& in, at::Tensor t) {
  if (t.defined() && t.is_inference()) {
    if (t.layout() == c10::kStrided && t.has_storage()) {
      in.plain = exact_copy(t);
    } else {
      BelowDTRGuard below;
      in.plain = t.clone();
    }
    count_plain(in.plain);
    in.scratch = true;
    return;
  }
  in.plain = std::move(t);
  if (in.plain.defined()) in.version = in.plain._version();
}

void Runtime::evict_everything() {
  Lock g(mu_);
  // Evicting drops candidates from the pool's array: a copy is walked. No
  // storage dies meanwhile (evict frees values, whose memory holds no record).
  std::vector<Entry*> unlocked;
  for (Entry* e : pool_.candidates()) {
    if (e->locks == 0) unlocked.push_back(e);
  }
  for (Entry* e : unlocked) {
    if (record_of(*e).resident) evict(record_of(*e), /*counted=*/true);
  }
}

// ---------------------------------------------------------------------------
// The per-op path
// ---------------------------------------------------------------------------

at::Tensor Runtime::input_value(const at::Tensor& t, c10::intrusive_ptr<Cell>* cell_out,
                                LockedStorages& locked) {
  DTRTensorImpl* w = t.defined() ? dtr_impl(t) : nullptr;
  if (w == nullptr) {
    if (t.defined()) {
      count_plain(t);
      if (t.requires_grad() && t.is_leaf()) ensure_plain_grad_hook(t);
    }
    return t;
  }
  const c10::intrusive_ptr<Cell>& cell = w->cell();
  if (cell->storage->runtime.get() != this) {
    // A tensor of another (finished) session: its value, as a plain input.
    at::Tensor v = cell->storage->runtime->escape(cell);
    count_plain(v);
    return v;
  }
  materialize(cell);
  pool_.lock(cell->storage->entry);
  locked.push_back(cell->storage);
  *cell_out = cell;
  return cell->value;
}

int64_t Runtime::planned_output_bytes(const c10::OperatorHandle& op, const OpTraits& traits,
                                      const torch::jit::Stack& stack, size_t first,
                                      OpMemory** memory) {
  uint64_t h = reinterpret_cast<uintptr_t>(&op.schema());
  bool hashable = true;
  for (size_t i = first; i < stack.size() && hashable; ++i) hashable = hash_ivalue(h, stack[i]);
  const uint64_t key = h | 1;
  *memory = nullptr;
  if (hashable) {
    // Note [One lock per op] in op_memory.h: the only time the table's lock is taken.
    *memory = find_op_memory(key);
    if (*memory) return (*memory)->out_bytes.load(std::memory_order_relaxed);
  }
  // As dtr/runtime.py's _output_bytes: an op that returns no tensor (equal, item),
  // a view and an in-place op make no new storage (an in-place op's copies of
  // unevictable targets are made room for where they are taken). Their meta
  // kernels would count the input storage a view shares, or fail (equal has none).
  const int64_t total = traits.makes_new_storage() ? meta_output_bytes(op, traits, stack, first) : 0;
  if (hashable) *memory = add_op_memory(key, total);
  return total;
}

int64_t Runtime::meta_output_bytes(const c10::OperatorHandle& op, const OpTraits& traits,
                                   const torch::jit::Stack& stack, size_t first) {
  // First sight: run the op on meta tensors.
  for (size_t i = first; i < stack.size(); ++i) {
    if (stack[i].isTensor() && is_sparse_value(stack[i].toTensor())) {  // as in dtr/runtime.py
      stats_.unplanned_ops += 1;
      return 0;
    }
  }
  torch::jit::Stack meta;
  for (size_t i = first; i < stack.size(); ++i) meta.push_back(meta_ivalue(stack[i]));
  for (int d : traits.device_args) {
    if (!meta[d].isNone()) meta[d] = c10::Device(c10::kMeta);
  }
  try {
    BelowDTRGuard below;
    op.callBoxed(&meta);
  } catch (const std::exception&) {
    stats_.unplanned_ops += 1;
    return 0;
  }
  int64_t total = 0;
  const bool cuda = std::any_of(stack.begin() + first, stack.end(), [](const c10::IValue& v) {
    return v.isTensor() && v.toTensor().defined() && v.toTensor().is_cuda();
  });
  for (const at::Tensor& o : flat_tensors(meta, 0)) {
    if (!o.defined()) continue;
    if (is_sparse_value(o)) {  // unplanned, as in dtr/runtime.py
      stats_.unplanned_ops += 1;
      return 0;
    }
    int64_t n = static_cast<int64_t>(o.storage().nbytes());
    if (cuda && n) n = (n + 511) & ~int64_t(511);
    total += n;
  }
  return total;
}

double Runtime::run_timed(const c10::OperatorHandle& op, torch::jit::Stack* stack,
                          const KernelRun* run) {
  const OpClock::Ticks t0 = OpClock::now();
  {
    BelowDTRGuard below;
    if (run != nullptr) {
      (*run)(stack);
    } else {
      op.callBoxed(stack);
    }
  }
  const double cost = OpClock::seconds_since(t0);  // Note [The op clock]
  stats_.op_seconds += cost;
  return cost;
}

// Note [Out of memory in C++]
// As dtr/runtime.py's Note [Out of memory]: the allocator can run out below
// the budget ("auto", other processes, fragmentation). An out-of-place op or a
// recompute has then changed nothing, so values holding at least what it
// needs are evicted (doubling each round) and it runs again, its generator set
// back, until it fits or nothing is left to evict, which raises
// BudgetExceededError with the allocator's error as its cause. The error comes
// as c10::OutOfMemoryError from a C++ allocator (CUDA's, the CPU's) or, from a
// kernel written in Python, as a python_error or pybind11 error holding
// torch.OutOfMemoryError: is_out_of_memory (errors.h) tells them apart.
bool Runtime::evict_bytes(int64_t bytes) {
  int64_t freed = 0;
  bool any = false;
  while (freed < bytes) {
    const Entry* victim = pool_.choose_victim(clock_);
    if (victim == nullptr) break;
    StorageRecord& rec = record_of(*victim);
    freed += rec.nbytes;
    evict(rec, /*counted=*/true);
    any = true;
  }
  return any;
}

void Runtime::run_evicting_on_oom(c10::function_ref<void(bool)> attempt, const std::string& opname,
                                  int64_t need) {
  std::exception_ptr error;
  try {
    attempt(false);
    return;
  } catch (...) {
    error = std::current_exception();
    if (!is_out_of_memory(error)) throw;
  }
  for (int64_t target = std::max<int64_t>(need, 1);; target *= 2) {
    if (!evict_bytes(target)) {
      const int64_t used = tracked();
      DTRError e(DTRError::kBudgetExceeded,
                 "dtr: the allocator ran out of memory at op " + opname +
                     " with every value dtr could evict evicted (" + format_bytes(used) +
                     " of tensor memory in use, the op needs about " + format_bytes(need) +
                     "): " + message_of(error) +
                     ". Give a smaller budget, a smaller batch, or free tensors before the block.");
      e.op = opname;
      e.needed_bytes = need;
      e.pinned_bytes = used;
      e.budget_bytes = limit_ ? *limit_ : used;
      e.smallest_feasible_bytes = used + need;
      e.cause = error;
      throw e;
    }
    stats_.oom_retries += 1;
    try {
      attempt(true);
      return;
    } catch (...) {
      error = std::current_exception();
      if (!is_out_of_memory(error)) throw;
    }
  }
}

void Runtime::dispatch(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  dispatch(op, op_traits(op), stack);
}

// Note [Per-op vectors reused]
// Every op needs its inputs' cells, values and the storages it locked: three
// heap blocks an op, made and freed each time. A thread keeps spare sets (one
// per nesting level of dispatch: a Python policy or a recompute may run an
// op inside another) in its state (thread_state.h) and an op borrows one, its
// vectors empty but with the capacity they grew to. Returning it releases what
// the op held in the order the locals it replaces were destroyed: values, then
// the locks (through the runtime), then the cells, which outlive the locks on
// their storages.
struct Runtime::BorrowedOpVectors {
  Runtime* rt;
  std::unique_ptr<OpVectors> v;
  ThreadState& thread;
  explicit BorrowedOpVectors(Runtime* rt) : rt(rt), thread(thread_state()) {
    auto& spare = thread.spare_op_vectors;
    if (thread.exited || spare.empty()) {
      v = std::make_unique<OpVectors>();
    } else {
      v = std::move(spare.back());
      spare.pop_back();
    }
  }
  ~BorrowedOpVectors() {
    v->vals.clear();
    rt->unlock_all(v->locked);
    v->cells.clear();
    if (!thread.exited) thread.spare_op_vectors.push_back(std::move(v));
  }
};

void Runtime::dispatch(const c10::OperatorHandle& op, const OpTraits& traits,
                       torch::jit::Stack* stack, c10::ArrayRef<HeldArgument> held,
                       const KernelRun* run) {
  TORCH_INTERNAL_ASSERT((held.empty() && run == nullptr) ||
                            (traits.written.empty() && !traits.unsupported),
                        "dtr: ", traits.name, " came unboxed but is not functional");
  Lock g(mu_);
  drain_pending();
  const size_t nargs = op.schema().arguments().size();
  const size_t first = stack->size() - nargs;
  stats_.ops += 1;

  // 1. Inputs: dtr values materialized and locked, plain tensors counted.
  // The input cells outlive the locks taken on their storages (borrowed first,
  // released last: Note [Per-op vectors reused]): an in-place op rebinds the
  // wrappers, which may leave these the last references to the old storage.
  // Inputs in Tensor[][] arguments, with their argument's index.
  std::vector<std::pair<int32_t, c10::intrusive_ptr<Cell>>> nested_cells;
  BorrowedOpVectors borrowed(this);
  std::vector<c10::intrusive_ptr<Cell>>& cells = borrowed.v->cells;
  LockedStorages& locked = borrowed.v->locked;
  // The wrappers themselves, for what an in-place op returns. Optional: an
  // empty std::vector<c10::IValue> still costs every op a call to libtorch's
  // out-of-line destructor.
  std::optional<std::vector<c10::IValue>> original;
  if (!traits.written.empty() || traits.unsupported) {
    original.emplace(stack->begin() + first, stack->end());
  }
  // A functional op's recipe is made now and its slots and list sizes are
  // filled in place (copying them in after the kernel cost two heap blocks per op).
  c10::intrusive_ptr<Recipe> recipe;
  Slots own_slots;
  if (traits.written.empty()) recipe = c10::make_intrusive<Recipe>(op);
  Slots& slots = recipe ? recipe->slots : own_slots;
  // Per argument, sized only when a tensor-list argument comes: fill_stack and
  // mutation.cpp read it only for slots in lists. A recipe takes it below.
  ListSizes list_sizes;
  std::vector<at::Tensor>& vals = borrowed.v->vals;
  // Borrowed vectors have kept their capacity: checked here, since
  // std::vector<at::Tensor>::reserve is libtorch's own copy, called out of line.
  if (vals.capacity() < nargs || cells.capacity() < nargs) {
    cells.reserve(nargs);
    vals.reserve(nargs);
  }
  slots.reserve(nargs);
  bool any_dtr = false;
  for (size_t i = 0; i < nargs; ++i) {
    if (!traits.may_hold_tensor(i)) continue;
    c10::IValue& iv = (*stack)[first + i];
    auto take = [&](const at::Tensor& t, Slot slot) -> at::Tensor {
      c10::intrusive_ptr<Cell> cell;
      at::Tensor v = input_value(t, &cell, locked);
      any_dtr = any_dtr || cell;
      cells.push_back(std::move(cell));
      vals.push_back(v);
      slots.push_back(slot);
      return v;
    };
    const HeldArgument* held_arg = held.empty() || !held[i].held() ? nullptr : &held[i];
    const at::Tensor* held_tensor = held_arg != nullptr ? held_arg->tensor : nullptr;
    if (held_tensor != nullptr || (held_arg == nullptr && iv.isTensor())) {
      const at::Tensor& t = held_tensor != nullptr ? *held_tensor : iv.toTensor();
      if (!t.defined()) {
        if (held_tensor != nullptr) iv = at::Tensor();
        continue;
      }
      iv = take(t, Slot{static_cast<int32_t>(i), -1, Slot::kTensor});
    } else if (held_arg != nullptr || iv.isTensorList()) {
      auto take_list = [&](size_t n, auto&& element) {
        c10::List<at::Tensor> out;
        out.reserve(n);
        for (size_t k = 0; k < n; ++k) {
          out.push_back(take(element(k), Slot{static_cast<int32_t>(i), static_cast<int32_t>(k),
                                              Slot::kTensorList}));
        }
        if (list_sizes.empty()) list_sizes.assign(nargs, 0);
        list_sizes[i] = static_cast<int32_t>(n);
        iv = out;
      };
      if (held_arg != nullptr) {
        const at::TensorList list = *held_arg->list;
        take_list(list.size(), [&](size_t k) -> const at::Tensor& { return list[k]; });
      } else {
        c10::List<at::Tensor> in = iv.toTensorList();
        take_list(in.size(), [&](size_t k) { return in.get(k); });
      }
    } else if (iv.isOptionalTensorList()) {
      c10::List<std::optional<at::Tensor>> in = iv.toOptionalTensorList();
      c10::List<std::optional<at::Tensor>> out;
      for (size_t k = 0; k < in.size(); ++k) {
        std::optional<at::Tensor> t = in.get(k);
        if (t && t->defined()) {
          out.push_back(take(*t, Slot{static_cast<int32_t>(i), static_cast<int32_t>(k),
                                      Slot::kOptionalTensorList}));
        } else {
          out.push_back(std::nullopt);
        }
      }
      if (list_sizes.empty()) list_sizes.assign(nargs, 0);
      list_sizes[i] = static_cast<int32_t>(in.size());
      iv = out;
    } else if (iv.isList() && !traits.written.empty()) {
      // Tensor[][] (c10d's allgather_, reduce_scatter_): inputs of in-place
      // collectives, which record no recipe (Note [Collectives in the C++ runtime]).
      c10::impl::GenericList out(iv.toList().elementType());
      for (const c10::IValue& e : iv.toListRef()) {
        if (!e.isTensorList()) {
          out.push_back(e);
          continue;
        }
        c10::List<at::Tensor> inner;
        for (const at::Tensor& t : e.toTensorList()) {
          c10::intrusive_ptr<Cell> cell;
          inner.push_back(input_value(t, &cell, locked));
          any_dtr = any_dtr || cell;
          if (cell) nested_cells.emplace_back(static_cast<int32_t>(i), std::move(cell));
        }
        out.push_back(inner);
      }
      iv = out;
    }
  }

  if (recipe && !list_sizes.empty()) recipe->extra().list_sizes = std::move(list_sizes);

  // Note [Recording steps for lookahead] (step_plan.h): lookahead blocks only.
  StepOpScope step_op(step_.get(), pool_, op, static_cast<int64_t>(vals.size() + nested_cells.size()),
                      cells, stats_.op_seconds);

  if (traits.unsupported && any_dtr) {
    dispatch_metadata_op(op, traits, stack, first, *original, cells, slots);
    if (evict_all_) {
      unlock_all(locked);
      evict_everything();
    }
    return;
  }
  if (!traits.written.empty()) {
    dispatch_mutation(op, traits, stack, first,
                      MutationCall{*original, cells, vals, slots, list_sizes, nested_cells});
    if (evict_all_) {
      unlock_all(locked);
      evict_everything();
    }
    return;
  }

  // Note [Writes into what recipes read in C++] (hidden_writes.h): running stats.
  // Only ops with running stats have them; calling for every op cost ~60 instructions.
  std::vector<std::pair<c10::intrusive_ptr<Cell>, at::Tensor>> stat_copies;
  if (traits.running_mean >= 0) {
    stat_copies = take_hidden_writes(traits, stack, first, cells, vals, slots);
  }

  // 2. Make room before running, so the budget holds: for the outputs, the
  // kernel's scratch (Note [Measured op scratch] in dtr/scratch.py) and the
  // RNG state a seeded op's recipe keeps.
  // As dtr/runtime.py's _output_bytes: a view, an alias and an op without
  // tensor results allocate nothing and keep no sizes entry (so no measured
  // scratch and no stable cost either), which also spares them the argument hash.
  OpMemory* memory = nullptr;
  const int64_t planned =
      traits.makes_new_storage() ? planned_output_bytes(op, traits, *stack, first, &memory) : 0;
  const c10::Device device = vals.empty() ? c10::Device(c10::kCPU) : vals[0].device();
  const PlannedScratch scratch =
      planned_scratch(memory, traits.workspace, planned, vals, device.is_cpu());
  const int64_t rng_bytes = traits.seeded ? rng_state_bytes(device) : 0;
  const int64_t need = planned + scratch.bytes + rng_bytes;
  if (need > 0) {
    int64_t locked_bytes = 0;
    for (const auto& c : cells) {
      if (c) locked_bytes += c->storage->nbytes;
    }
    make_room(need, traits.name, need + locked_bytes);
    // Note [Peaks at ops that allocate nothing]
    // As dtr/runtime.py: the peak is noted where the runtime made room and where
    // it recorded new values, not at an op that allocates nothing. Such an op
    // after the block (torch.equal on a loss, .item()) would otherwise note the
    // whole process's memory, which the budget does not bound once the block
    // has ended (Note [Over the budget without dtr] in dtr/runtime.py), as the
    // session's peak.
    note_peak(need);
  }

  // The recipe's argument template, taken before the kernel consumes the stack:
  // None where the inputs go (slots name them in argument order). Copying the
  // tensors in and clearing them after cost two atomic reference-count updates
  // per tensor argument.
  recipe->args.reserve(nargs);
  for (size_t i = 0, s = 0; i < nargs; ++i) {
    while (s < slots.size() && static_cast<size_t>(slots[s].arg) < i) ++s;
    if (s < slots.size() && static_cast<size_t>(slots[s].arg) == i) {
      recipe->args.emplace_back();
    } else {
      recipe->args.push_back((*stack)[first + i]);
    }
  }
  c10::AutogradState& autograd = c10::AutogradState::get_tls_state();  // grad mode, and for make_wrapper
  recipe->grad_enabled = autograd.get_grad_mode();
  if (traits.seeded) {
    const c10::IValue* gen = traits.generator >= 0 ? &(*stack)[first + traits.generator] : nullptr;
    const RNGState& rng = recipe->extra().rng.emplace(capture_rng(gen, device));
    if (rng_bytes) count_plain(rng.state);
  }

  // 3. Run; the first run of an (op, input metadata) measures its scratch.
  double cost = 0.0;
  int64_t seen = -1;
  run_evicting_on_oom(
      [&](bool retry) {
        if (retry) {
          stack->resize(first);
          fill_stack(*recipe, vals, *stack);
          if (recipe->rng()) reset_rng(*recipe->rng());
        }
        ScratchWindow window(scratch.measure);
        cost = run_timed(op, stack, run);
        seen = window.close();
      },
      traits.name, need);
  if (seen >= 0) memory->keep_scratch(seen);
  recipe->scratch_bytes = seen >= 0 ? seen : scratch.bytes;
  if (memory) cost = memory->stable_cost(cost);  // Note [Stable costs] in dtr/runtime.py
  recipe->cost = cost;
  clock_ += cost;
  for (const auto& c : cells) {
    if (c) pool_.touch(c->storage->entry, clock_);
  }
  if (!traits.returns_tensor) return;

  // 4. Record: a recipe input per tensor argument; running stats as scratch copies.
  bool training = true;
  if (traits.training >= 0) {
    const c10::IValue& tr = recipe->args[traits.training];
    training = tr.isBool() ? tr.toBool() : true;
  }
  // Ops have few inputs and outputs: linear scans, no per-op hash tables.
  c10::SmallVector<std::pair<const c10::StorageImpl*, size_t>, 4> input_storages;  // -> input index
  for (size_t i = 0; i < vals.size(); ++i) {
    if (const auto* st = storage_of(vals[i])) input_storages.emplace_back(st, i);
  }
  // The recipe holds the inputs from here on, and their last uses below read
  // them there: moved, an atomic increment and decrement are saved per input.
  // A step being recorded reads `cells` when dispatch returns (StepOpScope),
  // so then they are copied.
  recipe->inputs.resize(vals.size());
  for (size_t i = 0; i < vals.size(); ++i) {
    RecipeInput& in = recipe->inputs[i];
    if (cells[i]) {
      in.cell = step_ ? cells[i] : std::move(cells[i]);
    } else {
      record_plain_input(in, std::move(vals[i]));
      const int32_t arg = slots[i].arg;
      in.scratch = in.scratch ||
                   (training && (arg == traits.running_mean || arg == traits.running_var));
      readers_.add(recipe, i);
    }
  }
  std::vector<Entry*>& parents = parents_scratch_;
  parents.clear();
  for (const RecipeInput& in : recipe->inputs) {
    if (in.cell) parents.push_back(&in.cell->storage->entry);
  }
  c10::SmallVector<std::pair<const c10::StorageImpl*, StorageRecord*>, 2> fresh;
  int64_t new_bytes = 0;
  size_t k = 0;
  // Takes the kernel's output by value: moved into its cell, it costs no
  // reference-count update.
  auto record = [&](at::Tensor o) -> at::Tensor {
    const size_t index = k++;
    if (!o.defined()) {
      recipe->outputs.push_back(no_cell());
      return o;
    }
    if (is_sparse_value(o)) {  // Note [Sparse tensors in the C++ runtime]
      count_plain(o);
      recipe->outputs.push_back(no_cell());
      return o;
    }
    const auto& inputs = recipe->inputs;
    if (traits.alias_ok && !inputs.empty() && inputs[0].cell) {
      recipe->outputs.push_back(no_cell());
      return make_wrapper(inputs[0].cell, o, autograd);
    }
    const c10::StorageImpl* st = storage_of(o);
    auto src = std::find_if(input_storages.begin(), input_storages.end(),
                            [&](const auto& p) { return st != nullptr && p.first == st; });
    if (src != input_storages.end()) {
      const size_t j = src->second;
      const c10::intrusive_ptr<Cell>& base = inputs[j].cell;
      if (!base) {  // a view of a plain tensor stays plain
        recipe->outputs.push_back(no_cell());
        return o;
      }
      auto cell = c10::make_intrusive<Cell>(recipe, static_cast<int32_t>(index),
                                            static_cast<int32_t>(j), base->storage);
      cell->value = std::move(o);
      base->storage->add_cell(cell);
      pool_.add_cost(base->storage->entry, cost);
      recipe->outputs.emplace_back(cell);
      const at::Tensor& value = cell->value;  // the wrapper keeps the cell alive
      return make_wrapper(std::move(cell), value, autograd);
    }
    c10::intrusive_ptr<StorageRecord> rec;
    auto same = std::find_if(fresh.begin(), fresh.end(), [&](const auto& p) { return p.first == st; });
    if (same != fresh.end()) {
      rec = c10::intrusive_ptr<StorageRecord>::reclaim_copy(same->second);
    } else {
      const int64_t nb = storage_bytes(o);
      new_bytes += nb;
      rec = new_storage(nb, cost, traits.collective, parents);
      fresh.emplace_back(st, rec.get());  // its first cell holds it
    }
    auto cell = c10::make_intrusive<Cell>(traits.collective ? c10::intrusive_ptr<Recipe>() : recipe,
                                          static_cast<int32_t>(index), -1, std::move(rec));
    cell->value = std::move(o);
    cell->storage->add_cell(cell);
    recipe->outputs.emplace_back(cell);
    const at::Tensor& value = cell->value;  // the wrapper keeps the cell alive
    return make_wrapper(std::move(cell), value, autograd);
  };
  for (size_t i = first; i < stack->size(); ++i) {
    c10::IValue& r = (*stack)[i];
    if (r.isTensor()) {
      r = record(std::move(r).toTensor());
    } else if (r.isTensorList()) {
      c10::List<at::Tensor> in = r.toTensorList();
      c10::List<at::Tensor> out;
      out.reserve(in.size());
      for (const at::Tensor& t : in) out.push_back(record(t));
      r = out;
    }
  }
  recipe->out_bytes = new_bytes;
  if (memory && new_bytes != planned) memory->out_bytes.store(new_bytes, std::memory_order_relaxed);
  note_peak();
  if (!stat_copies.empty()) write_back(stat_copies);
  if (evict_all_) {
    unlock_all(locked);
    evict_everything();
  }
}

}  // namespace dtr
