// dtr._C: the C++ pool as the Python class dtr._C.CppPool (dtr/cpp_pool.py).
//
// Note [Thin bindings]
// The runtime calls the pool several times per op, so each binding converts
// its arguments and calls one Pool method, nothing else. Errors raised with
// TORCH_CHECK reach Python as dtr.DTRError (a RuntimeError) carrying the
// message without the C++ backtrace.
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include <cmath>

#include "alloc_meter.h"
#include "errors.h"
#include "op_memory.h"
#include "pool.h"
#include "python_policy.h"
#include "runtime_bindings.h"

namespace py = pybind11;

// Declared in runtime_bindings.h: the C++ runtime takes the same SearchOptions.
dtr::SearchOptions dtr::search_from_python(const py::handle& search) {
  dtr::SearchOptions out;
  if (search.is_none()) return out;
  py::object above = search.attr("sample_above");
  if (!above.is_none()) {
    int64_t v = above.cast<int64_t>();
    TORCH_CHECK(v >= 0, "dtr: SearchOptions.sample_above must be None or >= 0, got ", v);
    out.sample_above = v;
  }
  out.min_evictable_fraction = search.attr("min_evictable_fraction").cast<double>();
  py::object seed = search.attr("seed");
  // Any Python int, taken modulo 2**64 as dtr.policies._SplitMix64 does.
  unsigned long long s = PyLong_AsUnsignedLongLongMask(seed.ptr());
  if (PyErr_Occurred()) throw py::error_already_set();
  out.seed = static_cast<uint64_t>(s);
  out.thrash_guard = search.attr("thrash_guard").cast<bool>();
  return out;
}


namespace {

std::vector<int64_t> sids_from_python(const py::handle& parents) {
  std::vector<int64_t> out;
  if (parents.is_none()) return out;
  for (py::handle p : parents) out.push_back(p.cast<int64_t>());
  return out;
}

// A native policy's name, or a policy written in Python (Note [Policies written in Python]).
struct PolicyArg {
  dtr::Policy policy;
  std::shared_ptr<dtr::ExternalScorer> scorer;
  py::object name;
};

PolicyArg policy_arg(const py::object& given, const py::object& search) {
  // None: dtr.policies.DEFAULT_POLICY, as PythonPool takes it.
  const py::object policy =
      given.is_none() ? py::module_::import("dtr.policies").attr("DEFAULT_POLICY") : given;
  if (py::isinstance<py::str>(policy)) {
    return {dtr::policy_from_name(policy.cast<std::string>()), nullptr, policy};
  }
  py::object call = py::module_::import("dtr.python_policy").attr("PolicyCall")(policy, search);
  std::string name = py::str(call.attr("name"));
  return {dtr::Policy::Python, dtr::make_python_policy(call, name), policy};
}

// The Python object keeps the policy and SearchOptions it was made with, for introspection.
struct PyPool : dtr::Pool {
  PyPool(PolicyArg policy, py::object search)
      : dtr::Pool(policy.policy, dtr::search_from_python(search), std::move(policy.scorer)),
        policy_obj(std::move(policy.name)),
        search_obj(std::move(search)) {}
  PyPool(const py::object& policy, py::object search) : PyPool(policy_arg(policy, search), search) {}
  py::object policy_obj;
  py::object search_obj;
};

py::dict entry_dict(const dtr::Entry& e) {
  py::dict d;
  d["sid"] = e.sid;
  d["nbytes"] = e.nbytes;
  d["cost"] = e.cost;
  d["last_access"] = e.last_access;
  d["locks"] = e.locks;
  d["resident"] = e.resident;
  d["evictable"] = e.evictable;
  py::list parents, children;
  for (auto* p : e.parents) parents.append(p->sid);
  for (auto* c : e.children) children.append(c->sid);
  d["parents"] = parents;
  d["children"] = children;
  return d;
}

// Note [Fast calls]
// A pybind11 method call costs about 100 ns of argument dispatch, more than
// the work of touch() or lock(). The per-op methods are therefore also
// installed as METH_FASTCALL method descriptors that convert their positional
// arguments directly; calls with keywords or a different argument count go to
// the pybind11 definition (kept as _pb_<name>), which gives the usual errors.

PyObject* dtr_error_type() {
  static PyObject* err = nullptr;  // a strong reference kept for the process
  if (err == nullptr) {
    py::object e = py::module_::import("dtr.errors").attr("DTRError");
    err = e.release().ptr();
  }
  return err;
}

PyPool* self_pool(PyObject* self) {
  auto* inst = reinterpret_cast<py::detail::instance*>(self);
  PyPool* p = inst->get_value_and_holder().value_ptr<PyPool>();
  if (p == nullptr) PyErr_SetString(PyExc_TypeError, "dtr: CppPool.__init__ was not called");
  return p;
}

PyObject* fallback(const char* name, PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                   PyObject* kwnames) {
  PyObject* m = PyObject_GetAttrString(self, name);
  if (m == nullptr) return nullptr;
  PyObject* r = PyObject_Vectorcall(m, args, static_cast<size_t>(nargs), kwnames);
  Py_DECREF(m);
  return r;
}

bool as_sid(PyObject* o, int64_t* out) {
  long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) return false;
  *out = static_cast<int64_t>(v);
  return true;
}

bool as_double(PyObject* o, double* out) {
  double v = PyFloat_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) return false;
  *out = v;
  return true;
}

// Runs body() converting C++ errors as the pybind11 translator does.
template <typename F>
PyObject* guarded(F&& body) {
  try {
    return body();
  } catch (const c10::Error& e) {
    PyErr_SetString(dtr_error_type(), e.what_without_backtrace());
  } catch (const py::error_already_set& e) {
    py::error_already_set(e).restore();
  } catch (python_error& e) {  // a Python policy's exception
    e.restore();
  } catch (const dtr::DTRError& e) {
    dtr::set_python_error(e);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

#define DTR_FAST_PROLOGUE(NAME, NARGS)                                           \
  if (nargs != (NARGS) || (kwnames != nullptr && PyTuple_GET_SIZE(kwnames) > 0)) \
    return fallback("_pb_" NAME, self, args, nargs, kwnames);                    \
  PyPool* pool = self_pool(self);                                                \
  if (pool == nullptr) return nullptr;

#define DTR_FAST_SID_METHOD(NAME, CALL)                                                   \
  PyObject* fast_##NAME(PyObject* self, PyObject* const* args, Py_ssize_t nargs,          \
                        PyObject* kwnames) {                                              \
    DTR_FAST_PROLOGUE(#NAME, 1)                                                           \
    int64_t sid;                                                                          \
    if (!as_sid(args[0], &sid)) return nullptr;                                           \
    return guarded([&]() -> PyObject* { CALL; });                                         \
  }

DTR_FAST_SID_METHOD(lock, pool->lock(sid); Py_RETURN_NONE)
DTR_FAST_SID_METHOD(unlock, pool->unlock(sid); Py_RETURN_NONE)
DTR_FAST_SID_METHOD(remove, pool->remove(sid); Py_RETURN_NONE)
DTR_FAST_SID_METHOD(pin, pool->pin(sid); Py_RETURN_NONE)
DTR_FAST_SID_METHOD(evicted, pool->evicted(sid); Py_RETURN_NONE)
DTR_FAST_SID_METHOD(locks, return PyLong_FromLongLong(pool->locks(sid)))
DTR_FAST_SID_METHOD(cost, return PyFloat_FromDouble(pool->cost(sid)))

// (sid, double) methods: touch(sid, now), add_cost(sid, cost), rematerialized(sid, now).
#define DTR_FAST_SID_DOUBLE_METHOD(NAME, CALL)                                            \
  PyObject* fast_##NAME(PyObject* self, PyObject* const* args, Py_ssize_t nargs,          \
                        PyObject* kwnames) {                                              \
    DTR_FAST_PROLOGUE(#NAME, 2)                                                           \
    int64_t sid;                                                                          \
    double x;                                                                             \
    if (!as_sid(args[0], &sid) || !as_double(args[1], &x)) return nullptr;                \
    return guarded([&]() -> PyObject* { CALL; Py_RETURN_NONE; });                         \
  }

DTR_FAST_SID_DOUBLE_METHOD(touch, pool->touch(sid, x))
DTR_FAST_SID_DOUBLE_METHOD(add_cost, pool->add_cost(sid, x))
DTR_FAST_SID_DOUBLE_METHOD(rematerialized, pool->rematerialized(sid, x))
DTR_FAST_SID_DOUBLE_METHOD(set_next_use, pool->set_next_use(sid, x))

PyObject* fast_choose_victim(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                             PyObject* kwnames) {
  DTR_FAST_PROLOGUE("choose_victim", 1)
  double now;
  if (!as_double(args[0], &now)) return nullptr;
  return guarded([&]() -> PyObject* {
    const dtr::Entry* e = pool->choose_victim(now);
    if (e == nullptr) Py_RETURN_NONE;
    return PyLong_FromLongLong(e->sid);
  });
}

PyObject* fast_add(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  // add(sid, nbytes, cost, now, evictable, parents): the runtime passes all six.
  DTR_FAST_PROLOGUE("add", 6)
  int64_t sid, nbytes;
  double cost, now;
  if (!as_sid(args[0], &sid) || !as_sid(args[1], &nbytes) || !as_double(args[2], &cost) ||
      !as_double(args[3], &now))
    return nullptr;
  int evictable = PyObject_IsTrue(args[4]);
  if (evictable < 0) return nullptr;
  std::vector<int64_t> parents;
  PyObject* seq = PySequence_Fast(args[5], "dtr: add(): parents must be an iterable of ids");
  if (seq == nullptr) return nullptr;
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  parents.reserve(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    int64_t p;
    if (!as_sid(items[i], &p)) {
      Py_DECREF(seq);
      return nullptr;
    }
    parents.push_back(p);
  }
  Py_DECREF(seq);
  return guarded([&]() -> PyObject* {
    pool->add(sid, nbytes, cost, now, evictable != 0, parents);
    Py_RETURN_NONE;
  });
}

#define DTR_FAST(NAME) \
  {#NAME, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(fast_##NAME)), \
   METH_FASTCALL | METH_KEYWORDS, nullptr}

PyMethodDef fast_methods[] = {
    DTR_FAST(touch),  DTR_FAST(lock),     DTR_FAST(unlock),         DTR_FAST(remove),
    DTR_FAST(pin),    DTR_FAST(evicted),  DTR_FAST(locks),          DTR_FAST(cost),
    DTR_FAST(add),    DTR_FAST(add_cost), DTR_FAST(rematerialized), DTR_FAST(choose_victim),
    DTR_FAST(set_next_use),
    {nullptr, nullptr, 0, nullptr}};

void install_fast_methods(py::handle cls) {
  py::dict d = cls.attr("__dict__");
  for (PyMethodDef* def = fast_methods; def->ml_name != nullptr; ++def) {
    std::string name = def->ml_name;
    py::object pb = d[name.c_str()];
    cls.attr(("_pb_" + name).c_str()) = pb;
    PyObject* descr = PyDescr_NewMethod(reinterpret_cast<PyTypeObject*>(cls.ptr()), def);
    if (descr == nullptr) throw py::error_already_set();
    py::object fast = py::reinterpret_steal<py::object>(descr);
    cls.attr(def->ml_name) = fast;
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dtr's C++ core: the eviction pool (see dtr/cpp_pool.py)";

  // See Note [Thin bindings]: c10::Error -> dtr.DTRError, without the backtrace.
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::Error& e) {
      PyErr_SetString(dtr_error_type(), e.what_without_backtrace());
    }
  });

  m.def("native_policies", &dtr::native_policy_names,
        "Names of the policies the C++ pool implements.");

  // See Note [Counting CPU allocator] in alloc_meter.cpp.
  m.def("meter_install", &dtr::meter::install,
        "Install the counting CPU allocator (once per process); False if another allocator is in place.");
  m.def("meter_installed", &dtr::meter::installed, "Whether the counting CPU allocator is installed.");
  m.def("_meter_set_counting", &dtr::meter::set_counting, py::arg("on"),
        "Benchmarks only: switch the CPU allocator between the counting and the default one.");
  m.def("meter_current", &dtr::meter::current_bytes,
        "Bytes of live CPU storage allocated through the counting allocator.");
  m.def("meter_begin", &dtr::meter::begin, "Start a window: reset the peak; returns the current bytes.");
  m.def("meter_end", &dtr::meter::end, py::arg("start"),
        "End a window: (peak bytes above start, bytes still allocated above start).");
  m.def("measured_op_scratch", &dtr::measured_scratch_bytes,
        "Scratch bytes the C++ runtime has measured, one per (op, input metadata).");

  py::class_<PyPool>(m, "CppPool",
                     "The C++ eviction pool; the same interface and decisions as "
                     "dtr.policies.PythonPool.")
      .def(py::init<const py::object&, py::object>(), py::arg("policy") = py::none(),
           py::arg("search") = py::none())
      .def(
          "add",
          [](PyPool& p, int64_t sid, int64_t nbytes, double cost, double now, bool evictable,
             py::handle parents) {
            p.add(sid, nbytes, cost, now, evictable, sids_from_python(parents));
          },
          py::arg("sid"), py::arg("nbytes"), py::arg("cost"), py::arg("now"), py::arg("evictable"),
          py::arg("parents") = py::tuple())
      .def("remove", py::overload_cast<int64_t>(&dtr::Pool::remove), py::arg("sid"))
      .def("touch", py::overload_cast<int64_t, double>(&dtr::Pool::touch), py::arg("sid"),
           py::arg("now"))
      .def("add_cost", py::overload_cast<int64_t, double>(&dtr::Pool::add_cost), py::arg("sid"),
           py::arg("cost"))
      .def("cost", &dtr::Pool::cost, py::arg("sid"))
      .def("last_access", &dtr::Pool::last_access, py::arg("sid"))
      .def("lock", py::overload_cast<int64_t>(&dtr::Pool::lock), py::arg("sid"))
      .def("unlock", py::overload_cast<int64_t>(&dtr::Pool::unlock), py::arg("sid"))
      .def("locks", &dtr::Pool::locks, py::arg("sid"))
      .def("pin", py::overload_cast<int64_t>(&dtr::Pool::pin), py::arg("sid"))
      .def("evicted", py::overload_cast<int64_t>(&dtr::Pool::evicted), py::arg("sid"))
      .def("rematerialized", py::overload_cast<int64_t, double>(&dtr::Pool::rematerialized),
           py::arg("sid"), py::arg("now"))
      .def("set_next_use", &dtr::Pool::set_next_use, py::arg("sid"), py::arg("when"))
      .def("next_use", &dtr::Pool::next_use, py::arg("sid"))
      .def_property("plan_clock", &dtr::Pool::plan_clock, &dtr::Pool::set_plan_clock)
      .def(
          "choose_victim",
          [](PyPool& p, double now) -> py::object {
            const dtr::Entry* e = p.choose_victim(now);
            if (e == nullptr) return py::none();
            return py::int_(e->sid);
          },
          py::arg("now"))
      .def("unlocked_candidates", &dtr::Pool::unlocked_candidates)
      .def("__len__", &dtr::Pool::size)
      .def_readonly("policy", &PyPool::policy_obj)
      .def_readonly("search", &PyPool::search_obj)
      .def_property_readonly("candidate_bytes", &dtr::Pool::candidate_bytes)
      .def_property_readonly("thrash_guard_trips", &dtr::Pool::thrash_guard_trips)
      .def_property_readonly("recomputed_cost", &dtr::Pool::recomputed_cost)
      // Introspection for tests (PythonPool has the same private methods).
      .def("_candidates",
           [](const PyPool& p) {
             std::vector<int64_t> out;
             for (const auto* e : p.candidates()) out.push_back(e->sid);
             return out;
           })
      .def("_entry",
           [](const PyPool& p, int64_t sid) -> py::object {
             const dtr::Entry* e = p.find(sid);
             if (e == nullptr) return py::none();
             return entry_dict(*e);
           })
      .def("_class_cost",
           [](PyPool& p, int64_t sid) -> py::object {
             double c = p.class_cost(sid);
             if (std::isnan(c)) return py::none();
             return py::float_(c);
           })
      .def_property_readonly("_tracks_classes", &PyPool::tracks_classes)
      .def("_class_root",
           [](PyPool& p, int64_t sid) -> py::object {
             uint32_t r = p.class_root(sid);
             if (r == dtr::kNoNode) return py::none();
             return py::int_(r);
           })
      .def("_score",
           [](PyPool& p, int64_t sid, double now) -> py::object {
             const dtr::Entry* e = p.find(sid);
             if (e == nullptr) return py::none();
             return py::float_(p.score(*const_cast<dtr::Entry*>(e), now));
           })
      .def("_live_nodes", &dtr::Pool::live_nodes)
      .def("_check_invariants", &dtr::Pool::check_invariants);

  // See Note [Fast calls].
  install_fast_methods(m.attr("CppPool"));

  dtr::bind_runtime(m);
}
