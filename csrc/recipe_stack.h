// Rebuilding a recipe's argument stack from its input values (recompute and
// the view-chain replay of in-place recipes share it).
#pragma once

#include <ATen/core/stack.h>

#include <vector>

#include "records.h"

namespace dtr {

struct OpTraits;

// A plain input's tensor as recorded: a copy if it is scratch; StaleInputError
// if it was written in place since.
at::Tensor plain_value(const RecipeInput& in, const OpTraits& traits);
// Pushes the recipe's arguments with these input values onto `stack`.
void fill_stack(const Recipe& r, const std::vector<at::Tensor>& vals, torch::jit::Stack& stack);

}  // namespace dtr
