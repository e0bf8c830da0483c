// dtr._C's C++ runtime: the class dtr._C.Runtime and the module functions
// dtr/cpp_runtime.py calls. Called once per block or per escape, never per op.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/extension.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "bookkeeping_memory.h"
#include "capture.h"
#include "errors.h"
#include "escapes.h"
#include "fallback.h"
#include "op_clock.h"
#include "python_policy.h"
#include "recursive_lock.h"
#include "runtime.h"
#include "runtime_bindings.h"
#include "sparse.h"
#include "wrapper.h"

namespace py = pybind11;

namespace dtr {
namespace {

// Runs f without the GIL (the runtime's lock may be held by a thread waiting
// for it), turning a DTRError into its dtr.errors exception.
template <typename F>
auto no_gil(F&& f) {
  try {
    py::gil_scoped_release release;
    return f();
  } catch (const DTRError& e) {
    set_python_error(e);
    throw py::error_already_set();
  } catch (python_error& e) {  // a Python policy's exception
    e.restore();
    throw py::error_already_set();
  }
}

py::dict stats_dict(const Stats& s) {
  py::dict d;
  d["ops"] = s.ops;
  d["evictions"] = s.evictions;
  d["eager_evictions"] = s.eager_evictions;
  d["rematerializations"] = s.rematerializations;
  d["remat_seconds"] = s.remat_seconds;
  d["search_seconds"] = s.search_seconds;
  d["op_seconds"] = s.op_seconds;
  d["peak_bytes"] = s.peak_bytes;
  d["tracked_bytes"] = s.tracked_bytes;
  d["unplanned_ops"] = s.unplanned_ops;
  d["oom_retries"] = s.oom_retries;
  d["thrash_guard_trips"] = s.thrash_guard_trips;
  d["recomputed_cost"] = s.recomputed_cost;
  d["plan_ops"] = s.plan_ops;
  d["plan_diverged_at"] = s.plan_diverged_at;
  py::dict by_op;
  for (const auto& [name, v] : s.remat_by_op) {
    py::list entry;
    entry.append(v.first);
    entry.append(v.second);
    by_op[py::str(name)] = entry;
  }
  d["remat_by_op"] = by_op;
  return d;
}

struct PyBlockToken {
  BlockToken token;
  c10::intrusive_ptr<Runtime> runtime;  // kept alive while its block is open
};

}  // namespace

void bind_runtime(py::module_& m) {
  bind_python_policy(m);
  py::class_<PyBlockToken>(m, "BlockToken");
  // Note [Recording steps for lookahead] (step_plan.h); dtr/step_plan.py keeps them.
  py::class_<StepPlan, c10::intrusive_ptr<StepPlan>>(m, "StepPlan",
                                                     "One recorded step of a lookahead block.")
      .def_property_readonly("num_ops", [](const StepPlan& p) { return p.ops.size(); })
      .def_property_readonly("num_storages", &StepPlan::num_storages)
      .def("__repr__", [](const StepPlan& p) {
        return "dtr._C.StepPlan(" + std::to_string(p.ops.size()) + " ops, " +
               std::to_string(p.num_storages()) + " storages)";
      });
  py::class_<Runtime, c10::intrusive_ptr<Runtime>>(m, "Runtime",
                                                   "The C++ runtime of one dtr session (dtr/cpp_runtime.py).")
      // policy: a native policy's name, or a dtr.python_policy.PolicyCall.
      .def(py::init([](std::optional<int64_t> limit, py::object policy, py::object search,
                       bool evict_all) {
             if (py::isinstance<py::str>(policy)) {
               return c10::make_intrusive<Runtime>(limit, policy_from_name(policy.cast<std::string>()),
                                                   search_from_python(search), evict_all);
             }
             std::string name = py::str(policy.attr("name"));
             return c10::make_intrusive<Runtime>(limit, Policy::Python, search_from_python(search),
                                                 evict_all, make_python_policy(policy, name));
           }),
           py::arg("limit"), py::arg("policy"), py::arg("search"), py::arg("evict_all"))
      .def_property("limit", &Runtime::limit, [](Runtime& rt, std::optional<int64_t> v) {
        no_gil([&] { rt.set_limit(v); });
      })
      .def_property("evict_all", &Runtime::evict_all, &Runtime::set_evict_all)
      .def_property_readonly("closed", &Runtime::closed)
      .def("stats", [](Runtime& rt) { return stats_dict(no_gil([&] { return rt.stats(); })); })
      .def_property_readonly("thrash_guard_trips", [](Runtime& rt) {
        return no_gil([&] { return rt.thrash_guard_trips(); });
      })
      .def("close", [](Runtime& rt) { no_gil([&] { rt.close(); }); })
      .def("evict_everything", [](Runtime& rt) { no_gil([&] { rt.evict_everything(); }); })
      .def("has_live_values", [](Runtime& rt) { return no_gil([&] { return rt.has_live_values(); }); })
      .def("count_plain", [](Runtime& rt, const at::Tensor& t) { no_gil([&] { rt.count_plain_tensor(t); }); })
      .def("use_cpu_meter", [](Runtime& rt, int64_t outside) { no_gil([&] { rt.use_cpu_meter(outside); }); })
      .def("use_device_allocator", [](Runtime& rt, const std::string& device) {
        c10::Device d(device);
        no_gil([&] { rt.use_device_allocator(d); });
      })
      .def("bytes_in_use", [](Runtime& rt) { return no_gil([&] { return rt.bytes_in_use(); }); })
      .def_property_readonly("plain_bytes", [](Runtime& rt) { return no_gil([&] { return rt.plain_bytes(); }); })
      .def("evict_to", [](Runtime& rt, int64_t limit) { return no_gil([&] { return rt.evict_to(limit); }); })
      .def("pool_size", [](Runtime& rt) { return rt.pool().size(); })
      // For tests: whether the pool has built its id table, and its invariants
      // (which build it). Note [The id index is built when first asked].
      .def("_pool_indexed", [](Runtime& rt) { return no_gil([&] { return rt.with_pool([](Pool& p) { return p.indexed(); }); }); })
      .def("_check_pool", [](Runtime& rt) { no_gil([&] { rt.with_pool([](Pool& p) { p.check_invariants(); return true; }); }); })
      .def("begin_step", [](Runtime& rt, std::optional<c10::intrusive_ptr<StepPlan>> plan,
                            double recompute_limit) {
        no_gil([&] { rt.begin_step(plan ? *plan : c10::intrusive_ptr<StepPlan>(), recompute_limit); });
      }, py::arg("plan"), py::arg("recompute_limit") = std::numeric_limits<double>::infinity())
      .def("end_step", [](Runtime& rt) -> std::optional<c10::intrusive_ptr<StepPlan>> {
        auto p = no_gil([&] { return rt.end_step(); });
        if (!p) return std::nullopt;
        return p;
      })
      .def("known_next_uses", [](Runtime& rt) { return no_gil([&] { return rt.known_next_uses(); }); });

  m.def("enter_block", [](c10::intrusive_ptr<Runtime> rt) {
    register_kernels_for_new_ops();
    PyBlockToken t;
    t.token = enter_block(rt.get());
    t.runtime = std::move(rt);
    return t;
  });
  m.def("exit_block", [](const PyBlockToken& t) { exit_block(t.token); });
  m.def("suspend_block", [] {
    PyBlockToken t;
    t.token = suspend_block();
    return t;
  }, "Takes this thread out of its open block until exit_block(token).");
  m.def("is_dtr", [](const at::Tensor& t) { return is_dtr(t); },
        "Whether t is a tensor of the C++ runtime.");
  m.def("unwrap", [](const at::Tensor& t) -> at::Tensor {
    DTRTensorImpl* w = t.defined() ? dtr_impl(t) : nullptr;
    if (w == nullptr) return t;
    c10::intrusive_ptr<Cell> cell = w->cell();
    return no_gil([&] { return cell->storage->runtime->escape(cell); });
  });
  m.def("escape", &escaped_leaf,
        "A new plain leaf sharing the escaped value's memory (pinned; see Runtime::escape), "
        "requiring grad when t does; t itself when it is not a tensor of the C++ runtime.");
  // See Note [Escapes of C++ wrappers].
  m.def("install_escape_methods", &install_escape_methods, py::arg("tensor_class"),
        py::arg("methods"));
  m.def("runtime_of", [](const at::Tensor& t) -> py::object {
    DTRTensorImpl* w = t.defined() ? dtr_impl(t) : nullptr;
    if (w == nullptr) return py::none();
    return py::cast(w->cell()->storage->runtime);
  });
  m.def("register_new_ops", &register_new_ops);
  // For tests: the layout flags a TensorImpl answers with (a wrapper's must be its value's).
  m.def("_layout_flags", [](const at::Tensor& t) {
    const c10::TensorImpl* i = t.unsafeGetTensorImpl();
    return py::make_tuple(i->is_contiguous(at::MemoryFormat::Contiguous),
                          i->is_contiguous(at::MemoryFormat::ChannelsLast),
                          i->is_contiguous(at::MemoryFormat::ChannelsLast3d),
                          i->is_strides_like(at::MemoryFormat::ChannelsLast),
                          i->is_strides_like(at::MemoryFormat::ChannelsLast3d),
                          i->is_non_overlapping_and_dense(), i->numel());
  });
  // Note [The op clock]: for tests, the op clock's and steady_clock's seconds over one sleep.
  m.def("_op_clock_check", [](double sleep_seconds) {
    const OpClock::Ticks t0 = OpClock::now();
    const auto s0 = std::chrono::steady_clock::now();
    {
      py::gil_scoped_release nogil;
      std::this_thread::sleep_for(std::chrono::duration<double>(sleep_seconds));
    }
    const OpClock::Ticks t1 = OpClock::now();
    const auto s1 = std::chrono::steady_clock::now();
    return py::make_tuple(OpClock::uses_tsc(), OpClock::seconds(t0, t1),
                          std::chrono::duration<double>(s1 - s0).count());
  });
  // Note [The runtime's lock]: for tests, `threads` threads each take a lock
  // `rounds` times (each time twice over, as a recompute inside an op does, and
  // half the time by try_lock) and bump a plain counter under it; a lost update
  // shows the lock let two in at once.
  m.def("_recursive_lock_check", [](int threads, int rounds) {
    RecursiveLock lock;
    int64_t counter = 0;
    std::atomic<int64_t> refused{0};
    {
      py::gil_scoped_release nogil;
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&] {
          for (int r = 0; r < rounds; ++r) {
            std::unique_lock<RecursiveLock> outer(lock, std::defer_lock);
            if (r % 2 == 0) {
              outer.lock();
            } else if (!outer.try_lock()) {
              refused.fetch_add(1, std::memory_order_relaxed);
              outer.lock();
            }
            std::unique_lock<RecursiveLock> inner(lock);  // taken again by its holder
            const int64_t seen = counter;
            if (r % 64 == 0) std::this_thread::yield();  // let others find it held
            counter = seen + 1;
          }
        });
      }
      for (auto& th : pool) th.join();
    }
    return py::make_tuple(counter, refused.load());
  });
  m.def("live_objects", [] {
    py::dict d;  // Note [Live object counts]
    d["cells"] = live_count(Counted::kCell);
    d["recipes"] = live_count(Counted::kRecipe);
    d["storages"] = live_count(Counted::kStorageRecord);
    return d;
  }, "Cells, recipes and storage records alive in every C++ runtime of the process.");
  m.def("bookkeeping_slabs", &bookkeeping::mapped_slabs,
        "Slabs of bookkeeping memory in use now (Note [Bookkeeping memory]).");
  m.def("bookkeeping_kept_slabs", &bookkeeping::kept_empty_slabs,
        "Empty slabs of bookkeeping memory kept mapped for reuse (Note [Kept empty slabs]).");
}

}  // namespace dtr
