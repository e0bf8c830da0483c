// The dtr exception classes, raised from C++.
//
// Note [Errors across the dispatcher]
// Torch turns a c10::Error into a plain RuntimeError; only a python_error
// carries a Python exception of our own class through the dispatcher and the
// autograd engine. Code under the runtime's lock throws a DTRError (no GIL
// needed); the outermost C++ frame (the fallback, a binding, the gradient
// hook) converts it with rethrow_as_python() after the lock is released, so
// the GIL is never taken while the runtime's lock is held.
#pragma once

#include <Python.h>

#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>

namespace dtr {

struct DTRError : std::runtime_error {
  // The Python class in dtr.errors.
  enum Kind { kBudgetExceeded, kStaleInput, kUnsupportedOp, kRecompute, kGeneric };
  DTRError(Kind kind, std::string message) : std::runtime_error(std::move(message)), kind(kind) {}
  Kind kind;
  // BudgetExceededError's fields.
  std::string op;
  int64_t needed_bytes = 0, pinned_bytes = 0, budget_bytes = 0, smallest_feasible_bytes = 0;
  // The error that caused this one (the allocator's out-of-memory error): the
  // Python exception's __cause__.
  std::exception_ptr cause;
};

// Sets the Python error indicator to the dtr.errors exception for `e` (takes the GIL).
void set_python_error(const DTRError& e);

// Throws torch's python_error holding the dtr.errors exception for `e`.
[[noreturn]] void rethrow_as_python(const DTRError& e);

// Runs f, converting a DTRError into the Python exception.
template <typename F>
decltype(auto) with_python_errors(F&& f) {
  try {
    return f();
  } catch (const DTRError& e) {
    rethrow_as_python(e);
  }
}

std::string format_bytes(int64_t n);

// torch.OutOfMemoryError (call with the GIL; libtorch_python does not export its handle).
PyObject* torch_out_of_memory_error();

// Whether a kernel's exception is the allocator's out-of-memory error: c10's, or
// torch.OutOfMemoryError raised by a kernel written in Python (takes the GIL then).
bool is_out_of_memory(const std::exception_ptr& e);
// An exception's message, without C++ backtrace.
std::string message_of(const std::exception_ptr& e);

}  // namespace dtr
