// What the C++ runtime needs to know about an operator, read once from its schema.
//
// The Python runtime's dtr/ops.py is the reference: the same classification,
// computed once per operator and cached by schema address (stable for the
// operator's lifetime).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <vector>

#include "scratch.h"

namespace dtr {

struct OpTraits {
  std::string name;         // "aten.add.Tensor", as str(torch.ops.aten.add.Tensor)
  bool is_view = false;     // returns alias an argument without writing it
  bool alias_ok = false;    // detach/alias: the output is the same value (same cell)
  bool seeded = false;      // draws random numbers (Tag nondeterministic_seeded)
  bool returns_tensor = false;
  bool unsupported = false; // changes a tensor's metadata or storage in place
  bool collective = false;  // communication: never replayed (Note [Collectives] in dtr/ops.py)
  // The op run in this one's place (Note [Collectives in the C++ runtime]).
  std::optional<c10::OperatorHandle> run_as;
  // Arguments the schema marks as written (in-place, out=, _foreach_*_).
  std::vector<int> written;
  // See Note [Hidden running-stat updates] in dtr/ops.py: positions of
  // running_mean/running_var and of `training` (-1: always trains).
  int running_mean = -1, running_var = -1, training = -2;
  // The `generator` argument, if the schema has one.
  int generator = -1;
  // Arguments named `device` (set to meta when planning output sizes).
  std::vector<int> device_args;
  // Its kernel's scratch before the first measurement (Note [Op workspace]).
  WorkspaceEstimate workspace;
  // Bit i: argument i's type can hold a tensor (Tensor, Tensor?, lists of
  // them, Any); arguments past the 64th always count. The per-op loop over
  // arguments skips the others (ints, scalars, sizes) without testing their
  // IValue's tag three times over.
  uint64_t tensor_args = ~uint64_t{0};
  bool may_hold_tensor(size_t i) const { return i >= 64 || ((tensor_args >> i) & 1) != 0; }
  // Whether its outputs are new storage: it returns a tensor, writes none of
  // its arguments and neither views nor aliases one (as dtr/runtime.py's
  // _output_bytes). The others allocate nothing a budget plans for.
  bool makes_new_storage() const {
    return returns_tensor && written.empty() && !is_view && !alias_ok;
  }
};

// Cached per operator; thread-safe.
const OpTraits& op_traits(const c10::OperatorHandle& op);

}  // namespace dtr
