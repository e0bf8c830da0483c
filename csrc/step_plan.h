// The lookahead policy's memory of the previous step: a recorded access
// sequence (StepPlan) and the recorder that writes one while following another
// (StepRecorder). dtr/step_plan.py is the same in Python and keeps the plans
// between blocks.
//
// Note [Recording steps for lookahead]
// Training repeats one step, so the previous step says when each storage is
// needed next (Note [Lookahead] in dtr/policies.py; the simulator's
// dtr/sim/plan.py is the same idea on a trace). With policy="lookahead" the
// runtime gets a StepRecorder when its block opens (Runtime::begin_step),
// given the plan its thread recorded last on that device, if any:
//  * it records each op: its key (the operator, and how many tensors it
//    read, list elements included, so a stack of 7 or 9 hidden states
//    differs), its start on the plan's clock (the summed run time of the ops
//    before it, no recomputation: that clock does not depend on the budget)
//    and which pool storages it read. Storages are numbered in the order the
//    step creates them; storages that existed before the step (a session
//    entered again) in the order the step first reads them. Plain tensors
//    (parameters, data, gradients) are not in the pool and not recorded:
//    nothing is ever evicted for them, so their next use tells the pool
//    nothing;
//  * while the step follows its plan (op k has the plan's k-th key), after
//    op k it sets the pool's plan clock to the plan's end of op k and the
//    next use of each storage op k read or created to the plan's time of
//    that storage's first read after op k (+inf: none; storages still
//    referenced when the recorded block closed count as read at its end);
//  * at the first op whose key differs (or past the plan's last op) the step
//    has diverged: every next use in the pool is cleared (NaN: unknown), so
//    the score is msps_sqrt's exactly for the rest of the step, and nothing
//    is set again until the block closes. The same happens at the first op
//    after the step's recomputations pass `recompute_limit` (the adaptive
//    policy's cost of the last step without a plan: Note [A plan that
//    loses is dropped] in dtr/step_plan.py).
// Runtime::end_step closes the recording (the new plan, diverged or not) and
// clears every next use: ops after the block run as msps_sqrt.
//
// A plan only steers which values are evicted: every value is still
// recomputed by its own recipe, so a wrong plan costs time, never a result.
// Costs when the policy is not lookahead: a null check per op and per new
// storage. With it: a few vector appends per op and a binary search per
// storage the op read.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/SmallVector.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <exception>
#include <limits>
#include <memory>
#include <unordered_map>
#include <vector>

namespace dtr {

class Pool;

// One recorded step; never changed once its recorder finished it.
struct StepPlan : c10::intrusive_ptr_target {
  struct OpKey {
    const void* op = nullptr;  // the operator's schema: stable for the process
    int64_t tensors = 0;       // tensors the op read
    bool operator==(const OpKey& o) const { return op == o.op && tensors == o.tensors; }
  };
  std::vector<OpKey> ops;
  std::vector<double> start;  // op k's start on the plan's clock
  double end = 0.0;           // the clock when the block closed
  // uses[id]: the ops that read storage `id`, ascending; ops.size() for "at the
  // end". Ids: 2n for the n-th storage the step created, 2n + 1 for the n-th
  // storage from before the step that it read.
  std::vector<std::vector<int32_t>> uses;

  double start_of(size_t k) const { return k < start.size() ? start[k] : end; }
  // The plan's time of the first read of `id` after op k (+inf: none).
  double next_use_after(int64_t id, int64_t k) const;
  size_t num_storages() const;
};

class StepRecorder {
 public:
  // `plan`: the previous step's, or null. `first_sid`: the first storage id
  // the step creates (the runtime's next id when its block opened).
  // `op_clock`: Stats::op_seconds then (the plan's clock is its increase).
  // `recompute_until`: the pool's recomputed cost at which the plan is
  // dropped (+inf: never).
  StepRecorder(c10::intrusive_ptr<StepPlan> plan, int64_t first_sid, double op_clock,
               double recompute_until = std::numeric_limits<double>::infinity());

  // Op k is about to run (its inputs resident): returns k. Compares it with
  // the plan; at the first difference clears every next use in `pool`.
  int64_t begin_op(Pool& pool, const c10::OperatorHandle& op, int64_t tensors, double op_clock);
  // The runtime created storage `sid` (during the op begun last).
  void storage_created(Pool& pool, int64_t sid);
  // Op k ran, reading `read_sids` (repeats allowed).
  template <typename Sids>
  void end_op(Pool& pool, int64_t k, const Sids& read_sids) {
    for (int64_t sid : read_sids) note_read(sid, k);
    if (!following()) return;
    set_plan_clock(pool, k);
    for (int64_t sid : read_sids) set_next_use(pool, sid, k);
  }
  // The block closed with `live_sids` still referenced: the recorded step,
  // the plan for the next one.
  c10::intrusive_ptr<StepPlan> finish(const std::vector<int64_t>& live_sids, double op_clock);

  bool has_plan() const { return plan_.defined(); }
  // Ops that followed the plan (all of them so far unless it diverged).
  int64_t followed_ops() const { return diverged_at_ >= 0 ? diverged_at_ : (has_plan() ? next_op_ : 0); }
  int64_t diverged_at() const { return diverged_at_; }

 private:
  int64_t id_of(int64_t sid);
  void note_read(int64_t sid, int64_t k);
  void set_plan_clock(Pool& pool, int64_t k);
  void set_next_use(Pool& pool, int64_t sid, int64_t k);
  bool following() const { return plan_.defined() && diverged_at_ < 0; }

  c10::intrusive_ptr<StepPlan> plan_;  // followed
  c10::intrusive_ptr<StepPlan> rec_;   // being recorded
  int64_t first_sid_;
  double clock0_;
  double recompute_until_;
  int64_t next_op_ = 0;
  int64_t diverged_at_ = -1;
  // Storages from before the step, in the order it first read them.
  std::unordered_map<int64_t, int64_t> prior_;
};

// The hook in Runtime::dispatch: begins op k once its inputs are resident and
// ends it when dispatch returns normally (whichever way), with the storages of
// its dtr inputs as what it read. Does nothing without a recorder.
template <typename Cells>
class StepOpScope {
 public:
  StepOpScope(StepRecorder* rec, Pool& pool, const c10::OperatorHandle& op, int64_t tensors,
              const Cells& cells, double op_clock)
      : rec_(rec), pool_(pool), cells_(cells), exceptions_(rec ? std::uncaught_exceptions() : 0) {
    if (rec_) k_ = rec_->begin_op(pool_, op, tensors, op_clock);
  }
  ~StepOpScope() {
    if (rec_ == nullptr || std::uncaught_exceptions() != exceptions_) return;
    c10::SmallVector<int64_t, 4> sids;
    for (const auto& c : cells_) {
      if (c) sids.push_back(c->storage->sid);
    }
    rec_->end_op(pool_, k_, sids);
  }
  StepOpScope(const StepOpScope&) = delete;
  StepOpScope& operator=(const StepOpScope&) = delete;

 private:
  StepRecorder* rec_;
  Pool& pool_;
  const Cells& cells_;
  int exceptions_;
  int64_t k_ = -1;
};

}  // namespace dtr
