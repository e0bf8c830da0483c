#pragma once

#include <torch/csrc/utils/pybind.h>

namespace dtr {

// Adds dtr._C.Runtime and the block/escape functions to the module.
void bind_runtime(pybind11::module_& m);

}  // namespace dtr
