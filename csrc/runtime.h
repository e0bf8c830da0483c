// The C++ runtime: materialize inputs -> make room -> run -> record.
//
// The same object and the same decisions as dtr/runtime.py's Runtime (the
// readable reference); see docs/design.md. One Runtime per dtr.budget
// session. Every method that touches records takes the runtime's lock
// (recursive: eviction and recomputation nest inside an op).
//
// Room is made before an op runs, and before each recompute, for its outputs,
// its kernel's scratch (measured on an (op, input metadata)'s first run, on CPU
// with the counting allocator; estimated before that: csrc/scratch.h) and the
// RNG state a seeded op's recipe keeps.
//
// In-place ops (their recipes, rebinding and stealing on recompute) live in
// csrc/mutation.cpp; see Note [In-place ops in the C++ runtime] there. In-place
// metadata ops (transpose_, resize_, set_, ...) live in csrc/metadata_ops.cpp.
//
// Kernel scratch is measured on CPU only; on CUDA the estimates stand in
// (Note [Room for an in-place op] in mutation.cpp for in-place ops).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/FunctionRef.h>
#include <c10/util/intrusive_ptr.h>

#include <atomic>
#include <limits>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

#include "device_meter.h"
#include "hidden_writes.h"
#include "pool.h"
#include "records.h"
#include "recursive_lock.h"
#include "stats.h"
#include "step_plan.h"
#include "thread_state.h"

namespace dtr {

struct OpMemory;
struct OpTraits;

// A tensor or tensor-list argument an unboxed kernel leaves with its caller
// (Note [Unboxed kernels] in unboxed_kernels.cpp), or none (on the stack).
struct HeldArgument {
  const at::Tensor* tensor = nullptr;
  std::optional<at::TensorList> list;
  bool held() const { return tensor != nullptr || list.has_value(); }
};

// Runs an op's kernel on the arguments at the end of the stack, replacing
// them with its results, as op.callBoxed does (Note [Unboxed kernel runs] in
// unboxed_kernels.cpp).
using KernelRun = c10::function_ref<void(torch::jit::Stack*)>;

class Runtime : public c10::intrusive_ptr_target {
 public:
  // `scorer`: the policy's, for Policy::Python (Note [Policies written in Python] in pool.h).
  Runtime(std::optional<int64_t> limit, Policy policy, SearchOptions search, bool evict_all,
          std::shared_ptr<ExternalScorer> scorer = nullptr);
  ~Runtime() override;

  // The per-op path for an op with a dtr tensor among its inputs, or a
  // plain-only op whose outputs are to become dtr values.
  void dispatch(const c10::OperatorHandle& op, torch::jit::Stack* stack);
  // The same, with the op's traits (op_traits(op)) already looked up. With
  // `held` (one entry per argument), the tensor and tensor-list arguments held
  // there are the caller's and their stack slots are empty (Note [Unboxed
  // kernels] in unboxed_kernels.cpp); only functional ops come so. With
  // `run`, the kernel runs through it instead of op.callBoxed.
  void dispatch(const c10::OperatorHandle& op, const OpTraits& traits, torch::jit::Stack* stack,
                c10::ArrayRef<HeldArgument> held = {}, const KernelRun* run = nullptr);

  // Note [Room for plain ops] (plain_ops.cpp): whether a plain-only op that
  // runs plain must have room made for what it allocates (a limit is set and
  // it allocates), and running it so.
  bool allocates_plain(const OpTraits& traits);
  void run_plain(const c10::OperatorHandle& op, const OpTraits& traits, torch::jit::Stack* stack);
  // The counting CPU allocator's hook on a thread with this runtime's block
  // open (`runtime`): room for an allocation no op of dtr's reserved
  // (Note [Room for allocations outside ops], plain_ops.cpp).
  static void before_allocation(void* runtime, int64_t nbytes);

  // The value of `cell` as a plain tensor; its storage is never evicted again.
  at::Tensor escape(const c10::intrusive_ptr<Cell>& cell);
  // A wrapper of `cell` died or was rebound (see Note [Deferred releases]).
  void wrapper_released(c10::intrusive_ptr<Cell> cell);
  // StorageRecord::release_resources.
  void storage_died(StorageRecord* rec);

  // Counts a plain tensor against the budget from now on (dtr.budget's count=).
  void count_plain_tensor(const at::Tensor& t);
  // An op whose arguments are all plain is about to write some of them in
  // place while this runtime's block is open (run below dtr by the fallback):
  // recipes reading what it writes keep what they saw (hidden_writes.cpp).
  void before_plain_writes(const OpTraits& traits, const torch::jit::Stack& stack, size_t first);
  // Note [The C++ runtime's count of the device]
  // With the counting CPU allocator installed (csrc/alloc_meter.h), the budget is
  // checked against all CPU tensor memory, as dtr/runtime.py does: the meter's
  // count plus `outside_bytes`, the tensors that were alive before the meter was
  // installed (known to Python, taken as constant for the block: conservative if
  // they die). On CUDA the allocator's own count (use_device_allocator). Without
  // either the runtime's own count is used: its resident values plus the plain
  // tensors its ops read.
  void use_cpu_meter(int64_t outside_bytes);
  // On CUDA (any device with a c10::DeviceAllocator) the budget is checked
  // against that allocator's count instead (Note [The device's count in C++]).
  void use_device_allocator(c10::Device device);
  int64_t bytes_in_use();
  // Plain tensors the runtime counts itself (no allocator's count: see above).
  int64_t plain_bytes() {
    Lock g(mu_);
    return plain_bytes_;
  }
  // Evicts until at most `limit` bytes are in use or nothing is left to evict
  // (Note [Entry check] in dtr/runtime.py); returns the bytes then in use.
  int64_t evict_to(int64_t limit);
  void evict_everything();
  // The block ended: from now on keep nothing no wrapper refers to.
  void close();
  bool closed() const { return closed_; }
  // Whether the one wrapper of `cell`'s storage is all that can see it: no
  // other wrapper, nothing escaped, the block still open (Note [Gradients
  // accumulate in place] in wrapper.cpp). When it is, `then` runs before the
  // lock is released.
  bool only_wrapper_sees(const Cell& cell, c10::function_ref<void()> then);
  bool has_live_values();

  std::optional<int64_t> limit();
  void set_limit(std::optional<int64_t> limit);
  bool evict_all() const { return evict_all_; }
  void set_evict_all(bool v) { evict_all_ = v; }
  Stats stats();
  // The pool's thrash-guard trips alone (what a block's exit reads to decide whether to warn).
  int64_t thrash_guard_trips();
  const Pool& pool() const { return pool_; }
  // Calls f(pool) under the runtime's lock (for tests).
  template <class F>
  auto with_pool(F f) {
    Lock g(mu_);
    return f(pool_);
  }

  // Note [Recording steps for lookahead] (csrc/step_plan.cpp): the block of a
  // lookahead runtime opened, following `plan` (the previous step's, or null),
  // and closed, giving the step it recorded. The plan is dropped once the
  // step has recomputed `recompute_limit` (seconds of stable cost) or more.
  void begin_step(c10::intrusive_ptr<StepPlan> plan,
                  double recompute_limit = std::numeric_limits<double>::infinity());
  c10::intrusive_ptr<StepPlan> end_step();
  // Pool storages whose next use is known now (for tests).
  int64_t known_next_uses();

 private:
  using Lock = std::unique_lock<RecursiveLock>;
  struct Frame;
  struct BorrowedOpVectors;  // Note [Per-op vectors reused] in runtime.cpp
  // Unlocks the storages an op locked, however it ends.
  struct UnlockOnExit {
    Runtime* rt;
    LockedStorages& locked;
    ~UnlockOnExit() { rt->unlock_all(locked); }
  };

  // 1. inputs
  at::Tensor input_value(const at::Tensor& t, c10::intrusive_ptr<Cell>* cell_out,
                         LockedStorages& locked);
  void count_plain(const at::Tensor& t);
  // A plain input into its recipe (Note [Inference tensors as recipe inputs]).
  void record_plain_input(RecipeInput& in, at::Tensor t);
  // Makes `cell` resident, recomputing what it needs. Inline: nearly every
  // input already is, and the call cost every op's inputs about 30 instructions.
  void materialize(const c10::intrusive_ptr<Cell>& cell) {
    if (!cell->value.defined()) recompute_value(cell);
  }
  // Only for an evicted cell (materialize checks).
  void recompute_value(const c10::intrusive_ptr<Cell>& cell);
  // 2. room
  // From the op-memory table (op_memory.h), which `*memory` is set to (null when an
  // argument cannot be hashed); on first sight by running the op on meta tensors.
  int64_t planned_output_bytes(const c10::OperatorHandle& op, const OpTraits& traits,
                               const torch::jit::Stack& stack, size_t first, OpMemory** memory);
  int64_t meta_output_bytes(const c10::OperatorHandle& op, const OpTraits& traits,
                            const torch::jit::Stack& stack, size_t first);
  void make_room(int64_t need, const std::string& opname, int64_t working);
  // 3. run
  double run_timed(const c10::OperatorHandle& op, torch::jit::Stack* stack,
                   const KernelRun* run = nullptr);
  // Runs attempt(false); if the allocator runs out of memory, evicts and runs
  // attempt(true) until it fits (Note [Out of memory in C++]).
  void run_evicting_on_oom(c10::function_ref<void(bool retry)> attempt, const std::string& opname,
                           int64_t need);
  bool evict_bytes(int64_t bytes);
  void recompute(Recipe& recipe, LockedStorages& locked);
  // 4. record
  c10::intrusive_ptr<StorageRecord> new_storage(int64_t nbytes, double cost, bool pinned,
                                                c10::ArrayRef<Entry*> parents);
  void set_value(Cell& cell, at::Tensor value);
  // What dispatch knows about an in-place op's inputs once they are materialized.
  struct MutationCall {
    const std::vector<c10::IValue>& original_args;  // the wrappers, as called
    const std::vector<c10::intrusive_ptr<Cell>>& cells;  // per input; null for plain ones
    const std::vector<at::Tensor>& vals;
    const Slots& slots;
    const ListSizes& list_sizes;
    // Tensors in Tensor[][] arguments (c10d's allgather_ outputs), by argument:
    // written ones are targets too, never with a recipe.
    const std::vector<std::pair<int32_t, c10::intrusive_ptr<Cell>>>& nested;
  };
  // csrc/mutation.cpp
  void dispatch_mutation(const c10::OperatorHandle& op, const OpTraits& traits,
                         torch::jit::Stack* stack, size_t first, const MutationCall& call);
  std::vector<StorageRecord*> stealable_bases(const Recipe& recipe,
                                              const LockedStorages& locked);
  std::vector<at::Tensor> run_mutation_recipe(const Recipe& recipe, std::vector<at::Tensor> vals);
  // csrc/metadata_ops.cpp (Note [In-place metadata ops in the C++ runtime]): an op
  // tagged inplace_view, resize_ or set_ with a dtr tensor among its inputs.
  void dispatch_metadata_op(const c10::OperatorHandle& op, const OpTraits& traits,
                            torch::jit::Stack* stack, size_t first,
                            const std::vector<c10::IValue>& original,
                            const std::vector<c10::intrusive_ptr<Cell>>& cells,
                            const Slots& slots);

  // csrc/hidden_writes.cpp: an op that writes running statistics without saying
  // so. Plain ones: their readers keep copies; dtr ones: the kernel gets a copy
  // (its input becomes plain scratch), returned as (cell, copy) for write_back.
  std::vector<std::pair<c10::intrusive_ptr<Cell>, at::Tensor>> take_hidden_writes(
      const OpTraits& traits, torch::jit::Stack* stack, size_t first,
      std::vector<c10::intrusive_ptr<Cell>>& cells, std::vector<at::Tensor>& vals,
      const Slots& slots);
  void write_back(const std::vector<std::pair<c10::intrusive_ptr<Cell>, at::Tensor>>& copies);

  void evict(StorageRecord& rec, bool counted);
  void maybe_banish(StorageRecord& rec);
  void unlock_all(LockedStorages& locked);
  void drain_pending();
  void release_locked(c10::intrusive_ptr<Cell> cell);
  void note_peak(int64_t reserved = 0);
  void note_step_stats();
  int64_t tracked() const;
  // The storage record holding a pool entry (every entry of this pool is one's).
  static StorageRecord& record_of(const Entry& e) {
    TORCH_INTERNAL_ASSERT(e.owner != nullptr, "dtr: a pool entry without its storage record");
    return *static_cast<StorageRecord*>(e.owner);
  }

  RecursiveLock mu_;  // Note [The runtime's lock]
  Pool pool_;
  std::optional<int64_t> limit_;
  // Whether limit_ is set, read without the lock by allocates_plain: an
  // unlimited block's plain ops take no lock.
  std::atomic<bool> limited_;
  bool evict_all_;
  bool closed_ = false;
  double clock_ = 0.0;
  int64_t next_sid_ = 0;
  int64_t pool_bytes_ = 0;   // resident, not escaped storages
  int64_t plain_bytes_ = 0;  // plain tensors the block touched, while alive
  std::optional<int64_t> meter_offset_;  // set: the CPU meter counts (see use_cpu_meter)
  std::optional<DeviceMeter> device_meter_;  // set: the device's allocator counts
  Stats stats_;
  // Plain storages counted, by address; weak so that their death shows.
  bookkeeping::FlatMap<const c10::StorageImpl*, std::pair<c10::weak_intrusive_ptr<c10::StorageImpl>, int64_t>>
      plain_;
  size_t plain_sweep_at_ = 1024;
  // Recomputed storages no wrapper refers to (see Note [Eager eviction] in dtr/runtime.py).
  std::vector<c10::weak_intrusive_ptr<StorageRecord>> kept_;
  // Recipe inputs reading plain tensors (Note [Writes into what recipes read in C++]).
  PlainReaders readers_;
  // Note [Deferred releases]
  // A wrapper can die on any thread (Python's garbage collector, autograd's
  // graph teardown) while another thread holds the lock: it must not wait
  // (that thread may be waiting for the GIL the dying thread holds), so its
  // cell is queued and released by the next op.
  std::mutex pending_mu_;
  std::vector<c10::intrusive_ptr<Cell>> pending_;
  // Whether pending_ may be non-empty: every op drains, and almost always finds
  // nothing, which this tells without taking pending_mu_.
  std::atomic<bool> has_pending_{false};
  // The parents of an op's new storages, reused from op to op (one heap block
  // fewer per op); filled and read only while dispatch records its outputs.
  std::vector<Entry*> parents_scratch_;
  int depth_ = 0;
  // Set while a lookahead block is open (step_plan.h).
  std::unique_ptr<StepRecorder> step_;
};

}  // namespace dtr
