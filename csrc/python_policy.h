// Policies given as Python callables, on the C++ runtime.
//
// See Note [Policies written in Python] in pool.h for when the callable runs.
// The scorer calls dtr.python_policy.PolicyCall (the Python half: it turns
// the pool into what a policy written for PythonPool reads) once per search,
// with a PoolHandle through which the Python side reads the pool's entries;
// the handle works only during that call.
//
// Note [The GIL under the runtime's lock]
// Everywhere else the runtime never takes the GIL while holding its lock (Note
// [Errors across the dispatcher]); a Python policy must, since the search runs
// under it. That is safe as long as no thread holds the GIL while waiting for
// the runtime's lock: torch's Python bindings release the GIL before they
// dispatch an op, dtr's bindings release it before they call the runtime, and
// a dying wrapper never waits for the lock (Note [Deferred releases]).
#pragma once

#include <torch/csrc/utils/pybind.h>

#include <memory>

#include "pool.h"

namespace dtr {

// `call`: a dtr.python_policy.PolicyCall; `name`: the policy, for messages.
std::shared_ptr<ExternalScorer> make_python_policy(pybind11::object call, std::string name);

// Adds dtr._C.PoolHandle.
void bind_python_policy(pybind11::module_& m);

}  // namespace dtr
