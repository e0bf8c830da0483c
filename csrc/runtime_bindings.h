#pragma once

#include <torch/csrc/utils/pybind.h>

#include "pool.h"

namespace dtr {

// dtr.SearchOptions as the pool's options (csrc/bindings.cpp); errors on invalid values.
SearchOptions search_from_python(const pybind11::handle& search);

// Adds dtr._C.Runtime and the block/escape functions to the module.
void bind_runtime(pybind11::module_& m);

}  // namespace dtr
