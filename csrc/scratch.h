// Op scratch: bytes a kernel allocates while it runs beyond the outputs it
// returns (oneDNN's convolution and RNN scratch, reordered weights, matmul
// temporaries), and the RNG state a seeded op's recipe keeps. The budget is
// checked against the allocator, so room is made for both before the op runs
// and before every recompute of it; see Note [Measured op scratch] in
// dtr/scratch.py (the reference) and Note [Op workspace] in dtr/ops.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace dtr {

// Note [Op workspace] in dtr/ops.py: before an (op, shapes) is first measured,
// its scratch is estimated as constant + sum(factor * bytes of a tensor input),
// where input -1 stands for the op's output bytes.
struct WorkspaceEstimate {
  struct Term {
    int input;
    double factor;
  };
  std::array<Term, 2> terms{};
  int nterms = 0;
  int64_t constant = 0;
};

// The estimate for an operator, by its name without namespace ("convolution_backward").
WorkspaceEstimate workspace_estimate_for(const std::string& base);

// The estimate for one call: `inputs` are its tensor inputs, in order.
int64_t estimated_scratch(const WorkspaceEstimate& w, int64_t out_bytes,
                          const std::vector<at::Tensor>& inputs);

// Whether CPU scratch is measured: the counting CPU allocator is installed and
// DTR_MEASURE_SCRATCH is not 0 (read once).
bool scratch_measuring_enabled();

struct OpMemory;

// The scratch one call makes room for (as dtr/scratch.py's `planned`): what its
// (op, input metadata) entry measured, else the estimate. `measure` says the
// call is to be measured: it has an entry not yet measured, on CPU, with the
// counting allocator installed.
struct PlannedScratch {
  int64_t bytes = 0;
  bool measure = false;
};
PlannedScratch planned_scratch(const OpMemory* memory, const WorkspaceEstimate& w,
                               int64_t out_bytes, const std::vector<at::Tensor>& inputs,
                               bool cpu);

// A measuring window on the counting allocator around one kernel call. Opened
// only when `open` and no other thread is measuring; close() gives the
// scratch (peak above the start minus what is still allocated at the end),
// or -1 when it was not open. Destroyed unclosed (the kernel raised), it
// closes the window without a result.
class ScratchWindow {
 public:
  explicit ScratchWindow(bool open);
  ~ScratchWindow();
  ScratchWindow(const ScratchWindow&) = delete;
  ScratchWindow& operator=(const ScratchWindow&) = delete;
  int64_t close();

 private:
  int64_t start_ = -1;
};

// Bytes a seeded op's RNG capture allocates in the memory a budget on `device`
// counts: a CPU generator's state (5 KiB) for a CPU op; nothing for CUDA,
// whose Philox state is 16 bytes of host memory (dtr/rng.py's host_bytes).
int64_t rng_state_bytes(c10::Device device);

}  // namespace dtr
