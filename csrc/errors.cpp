#include "errors.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdio>

namespace dtr {

namespace py = pybind11;

void set_python_error(const DTRError& e) {
  {
    py::gil_scoped_acquire gil;
    static const char* names[] = {"BudgetExceededError", "StaleInputError", "UnsupportedOpError",
                                  "RecomputeError", "DTRError"};
    try {
      py::object cls = py::module_::import("dtr.errors").attr(names[e.kind]);
      py::object exc;
      if (e.kind == DTRError::kBudgetExceeded) {
        exc = cls(e.what(), py::arg("op") = e.op, py::arg("needed_bytes") = e.needed_bytes,
                  py::arg("pinned_bytes") = e.pinned_bytes, py::arg("budget_bytes") = e.budget_bytes,
                  py::arg("smallest_feasible_bytes") = e.smallest_feasible_bytes);
      } else {
        exc = cls(e.what());
      }
      PyErr_SetObject(cls.ptr(), exc.ptr());
    } catch (py::error_already_set& pe) {
      pe.restore();
    }
  }
}

void rethrow_as_python(const DTRError& e) {
  set_python_error(e);
  python_error err;
  err.persist();
  throw err;
}

std::string format_bytes(int64_t n) {
  char buf[96];
  const double v = static_cast<double>(n);
  if (n >= (int64_t(1) << 30) || n <= -(int64_t(1) << 30)) {
    std::snprintf(buf, sizeof buf, "%.2f GiB (%lld bytes)", v / (1 << 30), static_cast<long long>(n));
  } else if (n >= (1 << 20) || n <= -(1 << 20)) {
    std::snprintf(buf, sizeof buf, "%.2f MiB (%lld bytes)", v / (1 << 20), static_cast<long long>(n));
  } else if (n >= (1 << 10) || n <= -(1 << 10)) {
    std::snprintf(buf, sizeof buf, "%.2f KiB (%lld bytes)", v / (1 << 10), static_cast<long long>(n));
  } else {
    std::snprintf(buf, sizeof buf, "%lld bytes", static_cast<long long>(n));
  }
  return buf;
}

}  // namespace dtr
