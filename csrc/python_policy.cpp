#include "python_policy.h"

#include <c10/core/SafePyObject.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/PyInterpreter.h>

#include <cmath>

#include "errors.h"

namespace dtr {
namespace py = pybind11;
namespace {

// The pool as the Python half of a policy call reads it; valid during the call.
struct PoolHandle {
  Pool* pool = nullptr;

  Pool& get() const {
    TORCH_CHECK(pool != nullptr,
                "dtr: the pool passed to an eviction policy can be read only during the call "
                "that received it");
    return *pool;
  }
};

class PythonPolicy final : public ExternalScorer {
 public:
  PythonPolicy(py::object call, std::string name)
      : call_(call.release().ptr(), getPyInterpreter()), name_(std::move(name)) {}

  void score(Pool& pool, const std::vector<int64_t>& sids, double now,
             std::vector<double>& scores) override {
    py::gil_scoped_acquire gil;  // Note [The GIL under the runtime's lock]
    auto handle = std::make_shared<PoolHandle>();
    handle->pool = &pool;
    struct Invalidate {
      PoolHandle& h;
      ~Invalidate() { h.pool = nullptr; }
    } invalidate{*handle};
    try {
      py::list ids(sids.size());
      for (size_t i = 0; i < sids.size(); ++i) ids[i] = py::int_(sids[i]);
      py::handle call(call_.ptr(getPyInterpreter()));
      py::object out = call(py::cast(handle), ids, now);
      py::sequence seq = py::reinterpret_borrow<py::sequence>(out);
      TORCH_INTERNAL_ASSERT(static_cast<size_t>(py::len(seq)) == sids.size());
      for (size_t i = 0; i < sids.size(); ++i) {
        py::object s = seq[i];
        double v = PyFloat_AsDouble(s.ptr());
        if (v == -1.0 && PyErr_Occurred()) {
          PyErr_Clear();
          throw DTRError(DTRError::kGeneric,
                         "dtr: the eviction policy " + name_ + " returned " +
                             std::string(py::repr(s)) + " for storage " + std::to_string(sids[i]) +
                             "; a policy returns a number, the storage's score (the lowest is "
                             "evicted)");
        }
        scores[i] = v;
      }
    } catch (py::error_already_set& e) {
      // The callable's own exception, carried through the dispatcher and the
      // autograd engine as torch carries Python errors.
      e.restore();
      python_error err;
      err.persist();
      throw err;
    }
  }

 private:
  c10::SafePyObject call_;  // released with the GIL from any thread
  std::string name_;
};

py::object entry_tuple(Pool& pool, int64_t sid) {
  const Entry* e = pool.find(sid);
  if (e == nullptr) return py::none();
  py::list parents, children;
  for (const Entry* p : e->parents) parents.append(p->sid);
  for (const Entry* c : e->children) children.append(c->sid);
  py::object root = py::none(), class_cost = py::none();
  uint32_t r = pool.class_root(sid);
  if (r != kNoNode) {
    root = py::int_(r);
    class_cost = py::float_(pool.class_cost(sid));
  }
  return py::make_tuple(e->sid, e->nbytes, e->cost, e->last_access, e->locks, e->resident,
                        e->evictable, parents, children, e->next_use, root, class_cost);
}

}  // namespace

std::shared_ptr<ExternalScorer> make_python_policy(py::object call, std::string name) {
  return std::make_shared<PythonPolicy>(std::move(call), std::move(name));
}

void bind_python_policy(py::module_& m) {
  py::class_<PoolHandle, std::shared_ptr<PoolHandle>>(
      m, "PoolHandle", "The C++ pool as a Python policy reads it (dtr/python_policy.py).")
      .def("entry", [](const PoolHandle& h, int64_t sid) { return entry_tuple(h.get(), sid); },
           "(sid, nbytes, cost, last_access, locks, resident, evictable, parents, children, "
           "next_use, class_root, class_cost), or None for an unknown id.")
      .def("ids", [](const PoolHandle& h) { return h.get().ids(); })
      .def("candidates",
           [](const PoolHandle& h) {
             std::vector<int64_t> out;
             for (const Entry* e : h.get().candidates()) out.push_back(e->sid);
             return out;
           })
      .def("size", [](const PoolHandle& h) { return h.get().size(); })
      .def("candidate_bytes", [](const PoolHandle& h) { return h.get().candidate_bytes(); })
      .def("plan_clock", [](const PoolHandle& h) { return h.get().plan_clock(); });
}

}  // namespace dtr
