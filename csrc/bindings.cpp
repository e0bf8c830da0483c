// dtr._C: the C++ pool as the Python class dtr._C.CppPool (dtr/cpp_pool.py).
//
// Note [Thin bindings]
// The runtime calls the pool several times per op, so each binding converts
// its arguments and calls one Pool method, nothing else. Errors raised with
// TORCH_CHECK reach Python as dtr.DTRError (a RuntimeError) carrying the
// message without the C++ backtrace.
#include <torch/extension.h>

#include <cmath>

#include "pool.h"

namespace py = pybind11;

namespace {

dtr::SearchOptions search_from_python(const py::handle& search) {
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
  return out;
}

std::vector<int64_t> sids_from_python(const py::handle& parents) {
  std::vector<int64_t> out;
  if (parents.is_none()) return out;
  for (py::handle p : parents) out.push_back(p.cast<int64_t>());
  return out;
}

// The Python object keeps the SearchOptions it was made with, for introspection.
struct PyPool : dtr::Pool {
  PyPool(const std::string& policy, py::object search)
      : dtr::Pool(dtr::policy_from_name(policy), search_from_python(search)),
        policy_name(policy),
        search_obj(std::move(search)) {}
  std::string policy_name;
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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dtr's C++ core: the eviction pool (see dtr/cpp_pool.py)";

  // See Note [Thin bindings]: c10::Error -> dtr.DTRError, without the backtrace.
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::Error& e) {
      py::object err = py::module_::import("dtr.errors").attr("DTRError");
      PyErr_SetString(err.ptr(), e.what_without_backtrace());
    }
  });

  m.def("native_policies", &dtr::native_policy_names,
        "Names of the policies the C++ pool implements.");

  py::class_<PyPool>(m, "CppPool",
                     "The C++ eviction pool; the same interface and decisions as "
                     "dtr.policies.PythonPool.")
      .def(py::init<const std::string&, py::object>(), py::arg("policy") = "dtr_eq",
           py::arg("search") = py::none())
      .def(
          "add",
          [](PyPool& p, int64_t sid, int64_t nbytes, double cost, double now, bool evictable,
             py::handle parents) {
            p.add(sid, nbytes, cost, now, evictable, sids_from_python(parents));
          },
          py::arg("sid"), py::arg("nbytes"), py::arg("cost"), py::arg("now"), py::arg("evictable"),
          py::arg("parents") = py::tuple())
      .def("remove", &dtr::Pool::remove, py::arg("sid"))
      .def("touch", &dtr::Pool::touch, py::arg("sid"), py::arg("now"))
      .def("add_cost", &dtr::Pool::add_cost, py::arg("sid"), py::arg("cost"))
      .def("cost", &dtr::Pool::cost, py::arg("sid"))
      .def("last_access", &dtr::Pool::last_access, py::arg("sid"))
      .def("lock", &dtr::Pool::lock, py::arg("sid"))
      .def("unlock", &dtr::Pool::unlock, py::arg("sid"))
      .def("locks", &dtr::Pool::locks, py::arg("sid"))
      .def("pin", &dtr::Pool::pin, py::arg("sid"))
      .def("evicted", &dtr::Pool::evicted, py::arg("sid"))
      .def("rematerialized", &dtr::Pool::rematerialized, py::arg("sid"), py::arg("now"))
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
      .def_readonly("policy", &PyPool::policy_name)
      .def_readonly("search", &PyPool::search_obj)
      .def_property_readonly("candidate_bytes", &dtr::Pool::candidate_bytes)
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
}
