#include "rng.h"

#include <ATen/Context.h>
#include <ATen/detail/CUDAHooksInterface.h>

#include <mutex>

namespace dtr {
namespace {

at::Generator default_generator(c10::Device device) {
  if (device.is_cuda()) {
    return at::detail::getCUDAHooks().getDefaultGenerator(device.index());
  }
  return at::detail::getDefaultCPUGenerator();
}

at::Tensor get_state(at::Generator gen) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_state(at::Generator& gen, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

}  // namespace

RNGState capture_rng(const c10::IValue* generator_arg, c10::Device device) {
  at::Generator gen;
  if (generator_arg != nullptr && generator_arg->isGenerator()) {
    gen = generator_arg->toGenerator();
  } else {
    gen = default_generator(device);
  }
  return RNGState{gen, get_state(gen)};
}

void reset_rng(const RNGState& saved) {
  at::Generator gen = saved.generator;
  set_state(gen, saved.state);
}

RNGReplayGuard::RNGReplayGuard(const std::optional<RNGState>& saved) {
  if (!saved) return;
  at::Generator gen = saved->generator;
  current_ = RNGState{gen, get_state(gen)};
  set_state(gen, saved->state);
}

RNGReplayGuard::~RNGReplayGuard() {
  if (current_) set_state(current_->generator, current_->state);
}

}  // namespace dtr
