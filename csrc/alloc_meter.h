// The CPU allocator dtr installs when it is imported: the default CPU
// allocator plus an always-on count of the bytes of live CPU tensors (see
// Note [Counting CPU allocator] in alloc_meter.cpp). A CPU budget is checked
// against this count, the CPU equivalent of torch.cuda.memory_allocated;
// the runtime also opens short windows on it to measure an op's scratch
// (Note [Measured op scratch] in dtr/scratch.py).
#pragma once

#include <cstdint>
#include <utility>

namespace dtr::meter {

// Makes the counting allocator the CPU allocator (once per process; later
// calls return the first answer). Returns false, and changes nothing, when
// the CPU allocator in place is not c10's default one (someone installed
// their own), so there is nothing this wrapper knows how to count.
bool install();

// Whether install() succeeded.
bool installed();

// Bytes of CPU tensor memory allocated through the counting allocator and not
// yet freed: every CPU storage made since install(), as the torch profiler's
// alloc_size counts it (the requested size). A C++ runtime reads this per op;
// it is one relaxed atomic load.
int64_t current_bytes();

// For benchmarks only (bench/cpu_counter.py): makes c10's default allocator the CPU
// allocator again (on=false) or the counting one (on=true), so that eager code can be
// timed with and without it in one process. Allocations made while off are not counted
// (their frees neither); false when install() did not succeed.
bool set_counting(bool on);

// Called on the allocating thread before each allocation the counting
// allocator makes while it is set there (Note [Room for allocations outside
// ops] in plain_ops.cpp); it may throw, and then nothing is allocated.
using AllocationHook = void (*)(void* context, int64_t nbytes);
struct AllocationHookSetting {
  AllocationHook hook = nullptr;
  void* context = nullptr;
};
// Sets this thread's hook; returns the one it replaces.
AllocationHookSetting set_allocation_hook(AllocationHookSetting setting);

// Opens a measuring window (Note [Metering windows]): the peak is reset to the
// current bytes, which are returned; -1 when a window is open on another
// thread, and then there is nothing to end. Windows nest on one thread: end()
// them in the reverse order.
int64_t begin();
// Closes it: (peak above start, bytes still allocated above start).
std::pair<int64_t, int64_t> end(int64_t start);

}  // namespace dtr::meter
