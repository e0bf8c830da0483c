#include "step_plan.h"

#include <algorithm>
#include <cmath>

#include "pool.h"
#include "runtime.h"

namespace dtr {

double StepPlan::next_use_after(int64_t id, int64_t k) const {
  if (id < 0 || static_cast<size_t>(id) >= uses.size()) return std::numeric_limits<double>::infinity();
  const auto& lst = uses[id];
  auto it = std::upper_bound(lst.begin(), lst.end(), k);
  if (it == lst.end()) return std::numeric_limits<double>::infinity();
  return start_of(static_cast<size_t>(*it));
}

size_t StepPlan::num_storages() const {
  return static_cast<size_t>(std::count_if(uses.begin(), uses.end(), [](const auto& l) { return !l.empty(); }));
}

StepRecorder::StepRecorder(c10::intrusive_ptr<StepPlan> plan, int64_t first_sid, double op_clock,
                           double recompute_until)
    : plan_(std::move(plan)),
      rec_(c10::make_intrusive<StepPlan>()),
      first_sid_(first_sid),
      clock0_(op_clock),
      recompute_until_(recompute_until) {}

int64_t StepRecorder::id_of(int64_t sid) {
  if (sid >= first_sid_) return 2 * (sid - first_sid_);
  auto it = prior_.try_emplace(sid, static_cast<int64_t>(prior_.size())).first;
  return 2 * it->second + 1;
}

int64_t StepRecorder::begin_op(Pool& pool, const c10::OperatorHandle& op, int64_t tensors,
                               double op_clock) {
  const int64_t k = next_op_++;
  const StepPlan::OpKey key{&op.schema(), tensors};
  rec_->ops.push_back(key);
  rec_->start.push_back(op_clock - clock0_);
  if (following() && (static_cast<size_t>(k) >= plan_->ops.size() || !(plan_->ops[k] == key) ||
                      pool.recomputed_cost() > recompute_until_)) {
    // The step left the recorded one, or following it already cost more than
    // not (Note [A plan that loses is dropped]): score without it from here.
    diverged_at_ = k;
    for (int64_t sid : pool.ids()) pool.set_next_use(sid, std::numeric_limits<double>::quiet_NaN());
  }
  return k;
}

void StepRecorder::note_read(int64_t sid, int64_t k) {
  const int64_t id = id_of(sid);
  auto& uses = rec_->uses;
  if (static_cast<size_t>(id) >= uses.size()) uses.resize(std::max<size_t>(id + 1, 2 * uses.size()));
  auto& lst = uses[id];
  if (lst.empty() || lst.back() != k) lst.push_back(static_cast<int32_t>(k));
}

void StepRecorder::set_plan_clock(Pool& pool, int64_t k) {
  pool.set_plan_clock(plan_->start_of(static_cast<size_t>(k) + 1));
}

void StepRecorder::set_next_use(Pool& pool, int64_t sid, int64_t k) {
  if (pool.find(sid) == nullptr) return;  // died during the op (an in-place op rebound it)
  pool.set_next_use(sid, plan_->next_use_after(id_of(sid), k));
}

void StepRecorder::storage_created(Pool& pool, int64_t sid) {
  if (following()) set_next_use(pool, sid, next_op_ - 1);
}

c10::intrusive_ptr<StepPlan> StepRecorder::finish(const std::vector<int64_t>& live_sids, double op_clock) {
  rec_->end = op_clock - clock0_;
  const int64_t end = static_cast<int64_t>(rec_->ops.size());
  for (int64_t sid : live_sids) note_read(sid, end);
  auto out = std::move(rec_);
  rec_ = c10::make_intrusive<StepPlan>();
  return out;
}

// ---------------------------------------------------------------------------
// The runtime's side (Runtime's members that only lookahead blocks use)
// ---------------------------------------------------------------------------

void Runtime::begin_step(c10::intrusive_ptr<StepPlan> plan, double recompute_limit) {
  Lock g(mu_);
  TORCH_CHECK(pool_.policy() == Policy::Lookahead,
              "dtr: only a runtime with policy=\"lookahead\" records steps");
  TORCH_CHECK(!step_, "dtr: this runtime's step is already being recorded");
  TORCH_CHECK(!(recompute_limit < 0), "dtr: a step's recompute limit must be >= 0, got ", recompute_limit);
  step_ = std::make_unique<StepRecorder>(std::move(plan), next_sid_, stats_.op_seconds,
                                         pool_.recomputed_cost() + recompute_limit);
  stats_.plan_ops = 0;
  stats_.plan_diverged_at = -1;
  pool_.set_plan_clock(0.0);
}

c10::intrusive_ptr<StepPlan> Runtime::end_step() {
  Lock g(mu_);
  drain_pending();
  if (!step_) return {};
  note_step_stats();
  std::vector<int64_t> live;
  for (int64_t sid : pool_.ids()) {
    if (record_of(*pool_.find(sid)).nwrappers > 0) live.push_back(sid);
  }
  auto plan = step_->finish(live, stats_.op_seconds);
  step_.reset();
  // After the block nothing follows a plan: the online score (msps_sqrt's).
  for (int64_t sid : pool_.ids()) pool_.set_next_use(sid, std::numeric_limits<double>::quiet_NaN());
  return plan;
}

void Runtime::note_step_stats() {
  if (!step_) return;
  stats_.plan_ops = step_->followed_ops();
  stats_.plan_diverged_at = step_->diverged_at();
}

int64_t Runtime::known_next_uses() {
  Lock g(mu_);
  int64_t n = 0;
  for (int64_t sid : pool_.ids()) n += !std::isnan(pool_.next_use(sid));
  return n;
}

}  // namespace dtr
