#include "errors.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdio>

namespace dtr {

namespace py = pybind11;

namespace {

// The Python exception for a C++ one (with the GIL).
py::object python_cause(const std::exception_ptr& cause) {
  try {
    std::rethrow_exception(cause);
  } catch (python_error& pe) {
    pe.restore();
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != nullptr) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return py::reinterpret_steal<py::object>(value);
  } catch (py::error_already_set& pe) {
    return pe.value();
  } catch (const c10::OutOfMemoryError& oom) {
    return py::reinterpret_borrow<py::object>(torch_out_of_memory_error())(oom.what_without_backtrace());
  } catch (const std::exception& other) {
    return py::reinterpret_borrow<py::object>(PyExc_RuntimeError)(other.what());
  }
}

}  // namespace

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
      if (e.cause) PyException_SetCause(exc.ptr(), python_cause(e.cause).release().ptr());
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

bool is_out_of_memory(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const c10::OutOfMemoryError&) {
    return true;
  } catch (python_error& pe) {
    pybind11::gil_scoped_acquire gil;
    if (pe.type == nullptr) {
      if (!PyErr_ExceptionMatches(torch_out_of_memory_error())) return false;
      pe.persist();  // takes the error out of the thread state, into the exception
      return true;
    }
    return PyErr_GivenExceptionMatches(pe.type, torch_out_of_memory_error()) != 0;
  } catch (pybind11::error_already_set& pe) {
    pybind11::gil_scoped_acquire gil;
    return pe.matches(torch_out_of_memory_error());
  } catch (...) {
    return false;
  }
}

std::string message_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const c10::Error& ce) {
    return ce.what_without_backtrace();
  } catch (const std::exception& se) {
    return se.what();
  }
}

PyObject* torch_out_of_memory_error() {
  // Leaked on purpose: the class lives as long as torch.
  static PyObject* cls = py::object(py::module_::import("torch").attr("OutOfMemoryError")).release().ptr();
  return cls;
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
