// A counting wrapper around the CPU allocator, so the runtime can learn how
// much scratch an op allocates while it runs (see Note [Measured op scratch]
// in dtr/runtime.py).
#pragma once

#include <cstdint>
#include <utility>

namespace dtr::meter {

// Wraps the current CPU allocator (once per process; never undone: storages
// allocated through the wrapper must keep finding its deleter). Returns false,
// leaving the allocator alone, when the allocator is not one whose DataPtr
// context is its data pointer (the default allocator's layout, which
// raw_allocate/raw_deallocate rely on).
bool install();
bool installed();

// Bytes currently allocated through the wrapper.
int64_t current_bytes();

// Starts a measuring window: resets the peak to the current bytes and returns them.
int64_t begin();
// Ends it: (peak above start, bytes still allocated above start).
std::pair<int64_t, int64_t> end(int64_t start);

}  // namespace dtr::meter
