// A counting wrapper around the CPU allocator, so the runtime can learn how
// much scratch an op allocates while it runs (see Note [Measured op scratch]
// in dtr/scratch.py).
#pragma once

#include <cstdint>
#include <utility>

namespace dtr::meter {

// Prepares a counting wrapper around the current CPU allocator (once per
// process). Returns false when the allocator is not one whose DataPtr context
// is its data pointer (the default allocator's layout, which
// raw_allocate/raw_deallocate rely on); then nothing is measured.
bool install();

// Bytes currently allocated through the wrapper and not yet freed.
int64_t current_bytes();

// Opens a measuring window (Note [Metering windows]): the wrapper becomes the CPU
// allocator, the peak is reset to the current bytes, which are returned; -1 when
// another window is open (on another thread), and then there is nothing to end.
int64_t begin();
// Closes it: (peak above start, bytes still allocated above start).
std::pair<int64_t, int64_t> end(int64_t start);

}  // namespace dtr::meter
