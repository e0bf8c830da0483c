// The clock that times every op (its cost, DTR's compute term), and the
// runtime's victim searches and recomputations (Stats).
//
// Note [The op clock]
// Each op is timed: two clock reads per op. steady_clock::now() is a vDSO
// call of about 20 ns (with the conversions, 60-70 ns per op on our machines,
// about 3% of what the runtime adds to an op). Where the CPU's time-stamp counter runs
// at a constant rate in every power state and on every core (an "invariant
// TSC": x86-64, CPUID leaf 0x80000007, EDX bit 8), reading it takes a few
// cycles; its ticks are turned into seconds by a rate measured once against
// steady_clock over about a millisecond when the extension loads. Elsewhere,
// and where the counter is not invariant, the op clock is steady_clock. A
// difference below zero (a thread moved between cores whose counters disagree
// slightly) counts as zero: costs are never negative.
#pragma once

#include <chrono>
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <x86intrin.h>
#define DTR_HAVE_TSC 1
#else
#define DTR_HAVE_TSC 0
#endif

namespace dtr {
namespace op_clock_detail {
// Seconds per tick of the time-stamp counter; 0 where it is not used. Set
// when the extension loads, before any op runs.
extern double tsc_period;
inline uint64_t steady_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}
}  // namespace op_clock_detail

namespace OpClock {
using Ticks = uint64_t;

inline Ticks now() {
#if DTR_HAVE_TSC
  if (op_clock_detail::tsc_period > 0.0) return __rdtsc();
#endif
  return op_clock_detail::steady_ns();
}

// Seconds from `start` to `end`; never negative.
inline double seconds(Ticks start, Ticks end) {
  if (end <= start) return 0.0;
  const double ticks = static_cast<double>(end - start);
  const double period = op_clock_detail::tsc_period;
  return ticks * (period > 0.0 ? period : 1e-9);
}

inline double seconds_since(Ticks start) { return seconds(start, now()); }

// Whether now() reads the time-stamp counter (for tests and the docs).
inline bool uses_tsc() { return op_clock_detail::tsc_period > 0.0; }
}  // namespace OpClock

}  // namespace dtr
