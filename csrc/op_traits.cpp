#include "op_traits.h"

#include <ATen/core/enum_tag.h>

#include <algorithm>
#include <mutex>
#include <unordered_map>

#include "thread_state.h"

namespace dtr {
namespace {

struct RunningStats {
  const char* name;
  int mean, var, training;
};

// See Note [Hidden running-stat updates] in dtr/ops.py (the same table).
constexpr RunningStats kRunningStats[] = {
    {"aten::native_batch_norm", 3, 4, 5},
    {"aten::_native_batch_norm_legit", 3, 4, 5},
    {"aten::_batch_norm_with_update", 3, 4, -1},
    {"aten::cudnn_batch_norm", 3, 4, 5},
    {"aten::miopen_batch_norm", 3, 4, 5},
    {"aten::batch_norm_update_stats", 1, 2, -1},
};

// Note [Collectives in the C++ runtime]
// The same rules as Note [Collectives] in dtr/ops.py. The c10d ops that write
// into their arguments (what dist.all_reduce, broadcast, all_gather and the
// DDP reducer and FSDP2 call) have no alias annotations in their schemas
// (`Tensor[] tensors`, not `Tensor(a!)[]`), so the written argument is named
// here: the runtime handles them as in-place writes, which makes the written
// memory a new pinned value (never evicted, so never replayed) while the value
// it held before keeps its recipe. The functional collectives
// (_c10d_functional) return new tensors, recorded as pinned values.
// _c10d_functional::_wrap_tensor_autograd returns an AsyncCollectiveTensor (a
// Python subclass, waited on at first use), which a dtr value cannot hold: the
// runtime runs wait_tensor in its place, which returns the same value, waited.
struct CollectiveWrite {
  const char* base;
  const char* written;
};
constexpr CollectiveWrite kC10dWrites[] = {
    {"allreduce_", "tensors"}, {"allreduce_coalesced_", "tensors"},
    {"broadcast_", "tensors"}, {"reduce_", "tensors"},
    {"recv_", "tensors"}, {"recv_any_source_", "tensors"},
    {"allgather_", "output_tensors"}, {"allgather_coalesced_", "output_lists"},
    {"_allgather_base_", "output_tensor"}, {"allgather_into_tensor_coalesced_", "outputs"},
    {"reduce_scatter_", "output_tensors"}, {"_reduce_scatter_base_", "output_tensor"},
    {"reduce_scatter_tensor_coalesced_", "outputs"}, {"gather_", "output_tensors"},
    {"scatter_", "output_tensors"}, {"alltoall_", "output_tensors"},
    {"alltoall_base_", "output"},
};

// Whether an argument of this type can hold a tensor: anything but numbers,
// strings, devices and the like, and optionals and lists of those.
bool type_may_hold_tensor(const c10::TypePtr& type) {
  switch (type->kind()) {
    case c10::TypeKind::IntType:
    case c10::TypeKind::FloatType:
    case c10::TypeKind::ComplexType:
    case c10::TypeKind::BoolType:
    case c10::TypeKind::NumberType:
    case c10::TypeKind::StringType:
    case c10::TypeKind::SymIntType:
    case c10::TypeKind::SymFloatType:
    case c10::TypeKind::SymBoolType:
    case c10::TypeKind::DeviceObjType:
    case c10::TypeKind::LayoutType:
    case c10::TypeKind::ScalarTypeType:
    case c10::TypeKind::MemoryFormatType:
    case c10::TypeKind::GeneratorType:
    case c10::TypeKind::NoneType:
      return false;
    case c10::TypeKind::OptionalType:
    case c10::TypeKind::ListType:
      return std::any_of(type->containedTypes().begin(), type->containedTypes().end(),
                         [](const c10::TypePtr& t) { return type_may_hold_tensor(t); });
    default:
      return true;
  }
}

OpTraits compute(const c10::OperatorHandle& op) {
  const c10::FunctionSchema& schema = op.schema();
  OpTraits t;
  const std::string& full = schema.name();  // "aten::add"
  std::string ns = full.substr(0, full.find("::"));
  std::string base = full.substr(full.find("::") + 2);
  t.name = ns + "." + base + "." + (schema.overload_name().empty() ? "default" : schema.overload_name());
  for (const auto& r : schema.returns()) {
    if (r.type()->kind() == c10::TypeKind::TensorType ||
        r.type()->str().find("Tensor") != std::string::npos) {
      t.returns_tensor = true;
    }
    if (r.alias_info() != nullptr && !r.alias_info()->isWrite()) t.is_view = true;
  }
  const auto& args = schema.arguments();
  for (size_t i = 0; i < args.size(); ++i) {
    const auto* ai = args[i].alias_info();
    if (ai != nullptr && ai->isWrite()) t.written.push_back(static_cast<int>(i));
    if (args[i].name() == "generator") t.generator = static_cast<int>(i);
    if (args[i].name() == "device") t.device_args.push_back(static_cast<int>(i));
    if (i < 64 && !type_may_hold_tensor(args[i].type())) t.tensor_args &= ~(uint64_t{1} << i);
  }
  t.seeded = op.hasTag(at::Tag::nondeterministic_seeded);
  t.workspace = workspace_estimate_for(base);
  t.unsupported = op.hasTag(at::Tag::inplace_view) || base == "resize_" ||
                  base == "resize_as_" || base == "set_" || base == "_resize_output_";
  t.alias_ok = full == "aten::detach" || full == "aten::alias";
  t.collective = ns == "c10d" || ns == "_c10d_functional" || ns == "c10d_functional" ||
                 ns == "_c10d_functional_autograd" || ns == "_dtensor";
  if (ns == "c10d") {
    for (const auto& cw : kC10dWrites) {
      if (base != cw.base) continue;
      for (size_t i = 0; i < args.size(); ++i) {
        if (args[i].name() == cw.written) t.written.push_back(static_cast<int>(i));
      }
    }
  }
  if (full == "_c10d_functional::_wrap_tensor_autograd") {
    t.run_as = c10::Dispatcher::singleton().findOp({"_c10d_functional::wait_tensor", ""});
  }
  for (const auto& rs : kRunningStats) {
    if (full == rs.name && schema.overload_name().empty()) {
      t.running_mean = rs.mean;
      t.running_var = rs.var;
      t.training = rs.training;
      // Handled as scratch inputs, not as mutations.
      std::vector<int> kept;
      for (int w : t.written) {
        if (w != rs.mean && w != rs.var) kept.push_back(w);
      }
      t.written = std::move(kept);
    }
  }
  return t;
}

}  // namespace

static const OpTraits& op_traits_locked(const c10::OperatorHandle& op);

const OpTraits& op_traits(const c10::OperatorHandle& op) {
  // Every op asks: the thread's copy of the lookup (thread_state.h) answers
  // without the lock.
  ThreadState& s = thread_state();
  if (s.exited) return op_traits_locked(op);
  auto hit = s.seen_op_traits.find(&op.schema());
  if (hit != s.seen_op_traits.end()) return *hit->second;
  const OpTraits& traits = op_traits_locked(op);
  s.seen_op_traits.emplace(&op.schema(), &traits);
  return traits;
}

static const OpTraits& op_traits_locked(const c10::OperatorHandle& op) {
  static std::mutex mu;
  static std::unordered_map<const void*, std::unique_ptr<OpTraits>> cache;
  const void* key = &op.schema();
  std::lock_guard<std::mutex> g(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;
  auto& slot = cache[key];
  slot = std::make_unique<OpTraits>(compute(op));
  return *slot;
}

}  // namespace dtr
