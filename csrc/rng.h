// Capture and replay of the generator state a random op draws from.
//
// See Note [RNG replay] in dtr/rng.py: a seeded op records the state of the
// generator it will use (`generator=` or its device's default; on CUDA the
// Philox seed and offset live in that state); a recompute sets it, runs the op
// and puts the current state back, so the global stream ends where eager
// leaves it. Pitfall: holding the generator's mutex while the kernel runs
// deadlocks (dropout locks it itself), so only get/set run under it.
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <optional>

namespace dtr {

struct RNGState {
  at::Generator generator;
  at::Tensor state;  // a CPU byte tensor (GeneratorImpl::get_state)
};

// The state of the generator the op will draw from: the `generator` argument
// when given, else the default generator of `device`.
RNGState capture_rng(const c10::IValue* generator_arg, c10::Device device);
// Sets the generator back to a captured state (an op retried after running out of memory).
void reset_rng(const RNGState& saved);

// Sets `saved` for the guard's lifetime and restores the state it found.
class RNGReplayGuard {
 public:
  explicit RNGReplayGuard(const std::optional<RNGState>& saved);
  ~RNGReplayGuard();
  RNGReplayGuard(const RNGReplayGuard&) = delete;
  RNGReplayGuard& operator=(const RNGReplayGuard&) = delete;

 private:
  std::optional<RNGState> current_;
};

}  // namespace dtr
