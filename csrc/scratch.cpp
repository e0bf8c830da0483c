#include "scratch.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>

#include <cstdlib>
#include <cstring>

#include "alloc_meter.h"
#include "op_memory.h"

namespace dtr {

WorkspaceEstimate workspace_estimate_for(const std::string& base) {
  // Measured on torch 2.13 CPU (oneDNN), as in dtr/ops.py: forward scratch about
  // the output's bytes plus a reordered weight, backward twice the incoming
  // gradient's and the weight's, BatchNorm backward one input's worth.
  WorkspaceEstimate w;
  if (base == "convolution_backward") {
    w.terms = {{{0, 2.0}, {2, 2.0}}};
    w.nterms = 2;
    w.constant = 32 << 10;
  } else if (base.find("convolution") != std::string::npos) {
    w.terms = {{{-1, 1.0}, {1, 2.0}}};
    w.nterms = 2;
    w.constant = 32 << 10;
  } else if (base.find("batch_norm_backward") != std::string::npos) {
    w.terms = {{{1, 1.0}, {0, 0.0}}};
    w.nterms = 1;
  }
  return w;
}

int64_t estimated_scratch(const WorkspaceEstimate& w, int64_t out_bytes,
                          const std::vector<at::Tensor>& inputs) {
  if (w.nterms == 0) return 0;
  double total = static_cast<double>(w.constant);
  for (int i = 0; i < w.nterms; ++i) {
    const auto& t = w.terms[i];
    if (t.input < 0) {
      total += t.factor * static_cast<double>(out_bytes);
    } else if (static_cast<size_t>(t.input) < inputs.size() && inputs[t.input].defined()) {
      total += t.factor * static_cast<double>(inputs[t.input].nbytes());
    }
  }
  return static_cast<int64_t>(total);
}

bool scratch_measuring_enabled() {
  static const bool env_on = [] {
    const char* v = std::getenv("DTR_MEASURE_SCRATCH");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return env_on && meter::installed();
}

PlannedScratch planned_scratch(const OpMemory* memory, const WorkspaceEstimate& w,
                               int64_t out_bytes, const std::vector<at::Tensor>& inputs,
                               bool cpu) {
  const int64_t measured =
      memory ? memory->scratch.load(std::memory_order_relaxed) : OpMemory::kUnmeasured;
  if (measured >= 0) return {measured, false};
  return {estimated_scratch(w, out_bytes, inputs),
          memory != nullptr && cpu && scratch_measuring_enabled()};
}

ScratchWindow::ScratchWindow(bool open) {
  if (open) start_ = meter::begin();
}

ScratchWindow::~ScratchWindow() {
  if (start_ >= 0) meter::end(start_);
}

int64_t ScratchWindow::close() {
  if (start_ < 0) return -1;
  auto [peak_above, still_allocated] = meter::end(start_);
  start_ = -1;
  return std::max<int64_t>(peak_above - still_allocated, 0);
}

int64_t rng_state_bytes(c10::Device device) {
  if (device.type() != c10::DeviceType::CPU) return 0;
  static const int64_t bytes = [] {
    at::Generator g = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(g.mutex());
    return static_cast<int64_t>(g.get_state().nbytes());
  }();
  return bytes;
}

}  // namespace dtr
