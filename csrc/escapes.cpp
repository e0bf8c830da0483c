#include "escapes.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <utility>
#include <vector>

#include "capture.h"
#include "errors.h"
#include "runtime.h"
#include "wrapper.h"

namespace dtr {
namespace py = pybind11;
namespace {

struct EscapeMethod {
  PyObject* original = nullptr;  // torch's method (a strong reference kept for the process)
  PyObject* escape = nullptr;    // dtr's function for a wrapper, or null: original(escaped value)
};

constexpr size_t kMaxEscapeMethods = 8;
std::array<EscapeMethod, kMaxEscapeMethods> escape_table;
std::array<PyMethodDef, kMaxEscapeMethods> escape_defs;
std::array<std::string, kMaxEscapeMethods> escape_names;
std::array<PyObject*, kMaxEscapeMethods> escape_docs;  // strong references: ml_doc points into them
size_t num_escape_methods = 0;

// Calls target(self, *args, **kwargs) for a METH_FASTCALL | METH_KEYWORDS call.
PyObject* call_with_self(PyObject* target, PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                         PyObject* kwnames) {
  const Py_ssize_t nkw = kwnames == nullptr ? 0 : PyTuple_GET_SIZE(kwnames);
  PyObject* small[8];
  std::vector<PyObject*> big;
  PyObject** argv = small;
  if (nargs + nkw + 1 > 8) {
    big.resize(static_cast<size_t>(nargs + nkw + 1));
    argv = big.data();
  }
  argv[0] = self;
  for (Py_ssize_t i = 0; i < nargs + nkw; ++i) argv[i + 1] = args[i];
  return PyObject_Vectorcall(target, argv, static_cast<size_t>(nargs + 1), kwnames);
}

// A C++ wrapper: see Note [Escapes of C++ wrappers].
PyObject* call_escape(const EscapeMethod& m, const at::Tensor& t, PyObject* self,
                      PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  HANDLE_TH_ERRORS
  NoCaptureGuard no_capture;
  if (m.escape != nullptr) return call_with_self(m.escape, self, args, nargs, kwnames);
  py::object value = py::reinterpret_steal<py::object>(
      THPVariable_Wrap(t.requires_grad() ? escaped_leaf(t) : escaped_value(t)));
  if (!value) return nullptr;
  return call_with_self(m.original, value.ptr(), args, nargs, kwnames);
  END_HANDLE_TH_ERRORS
}

PyObject* call_escape_method(const EscapeMethod& m, PyObject* self, PyObject* const* args,
                             Py_ssize_t nargs, PyObject* kwnames) {
  const at::Tensor& t = THPVariable_Unpack(self);  // the descriptor checked self's type
  if (C10_UNLIKELY(is_dtr(t))) return call_escape(m, t, self, args, nargs, kwnames);
  // Any other tensor: torch's own method, called as it was (nothing here can throw).
  return call_with_self(m.original, self, args, nargs, kwnames);
}

template <size_t I>
PyObject* escape_method(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                        PyObject* kwnames) {
  return call_escape_method(escape_table[I], self, args, nargs, kwnames);
}

template <size_t... I>
constexpr std::array<PyObject* (*)(PyObject*, PyObject* const*, Py_ssize_t, PyObject*),
                     sizeof...(I)>
escape_functions(std::index_sequence<I...>) {
  return {&escape_method<I>...};
}

}  // namespace

at::Tensor escaped_value(const at::Tensor& t) {
  DTRTensorImpl* w = t.defined() ? dtr_impl(t) : nullptr;
  if (w == nullptr) return t;
  c10::intrusive_ptr<Cell> cell = w->cell();
  at::Tensor value;
  try {
    // The runtime's lock may be held by a thread waiting for the GIL.
    py::gil_scoped_release no_gil;
    value = cell->storage->runtime->escape(cell);
  } catch (const DTRError& e) {
    rethrow_as_python(e);
  }
  return value;
}

at::Tensor escaped_leaf(const at::Tensor& t) {
  if (!is_dtr(t)) return t;
  at::Tensor value = escaped_value(t);
  at::Tensor leaf;
  {
    BelowDTRGuard below;
    leaf = value.detach();
  }
  if (t.requires_grad()) leaf.set_requires_grad(true);
  return leaf;
}

void install_escape_methods(py::handle tensor_class, py::dict methods) {
  if (num_escape_methods != 0) return;
  static const auto functions = escape_functions(std::make_index_sequence<kMaxEscapeMethods>());
  TORCH_CHECK(methods.size() <= kMaxEscapeMethods, "dtr: internal error: too many escape methods");
  auto* type = reinterpret_cast<PyTypeObject*>(tensor_class.ptr());
  std::vector<std::pair<std::string, py::object>> descrs;
  size_t i = 0;
  for (auto item : methods) {
    std::string name = py::str(item.first);
    py::object original = tensor_class.attr(name.c_str());
    escape_names[i] = name;
    escape_table[i].original = original.release().ptr();
    escape_table[i].escape =
        item.second.is_none() ? nullptr : py::reinterpret_borrow<py::object>(item.second).release().ptr();
    PyObject* doc = PyObject_GetAttrString(escape_table[i].original, "__doc__");
    const char* doc_text = nullptr;
    if (doc != nullptr && PyUnicode_Check(doc)) doc_text = PyUnicode_AsUTF8(doc);
    escape_docs[i] = doc;
    PyErr_Clear();
    escape_defs[i] = PyMethodDef{escape_names[i].c_str(),
                                 reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(functions[i])),
                                 METH_FASTCALL | METH_KEYWORDS, doc_text};
    PyObject* descr = PyDescr_NewMethod(type, &escape_defs[i]);
    if (descr == nullptr) throw py::error_already_set();
    descrs.emplace_back(name, py::reinterpret_steal<py::object>(descr));
    ++i;
  }
  // Every descriptor is made before any is installed: all or nothing.
  for (auto& [name, descr] : descrs) tensor_class.attr(name.c_str()) = descr;
  num_escape_methods = i;
}

}  // namespace dtr
