// Note [The op clock] (op_clock.h): the counter's rate, measured when the extension loads.
#include "op_clock.h"

#if DTR_HAVE_TSC
#include <cpuid.h>
#endif

namespace dtr {
namespace op_clock_detail {
namespace {

#if DTR_HAVE_TSC
bool invariant_tsc() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0x80000000u, nullptr) < 0x80000007u) return false;
  __cpuid(0x80000007u, a, b, c, d);
  return (d >> 8) & 1u;
}

double measure_tsc_period() {
  if (!invariant_tsc()) return 0.0;
  // Each steady_clock reading is bracketed by two counter reads and paired
  // with their midpoint; of eight tries, the tightest bracket is kept, so that
  // a thread descheduled between the reads (a loaded machine) does not skew
  // the rate.
  auto pair = [](uint64_t& ns, uint64_t& tsc) {
    uint64_t best = ~uint64_t(0);
    for (int i = 0; i < 8; ++i) {
      const uint64_t before = __rdtsc();
      const uint64_t t = steady_ns();
      const uint64_t width = __rdtsc() - before;
      if (width < best) {
        best = width;
        ns = t;
        tsc = before + width / 2;
      }
    }
  };
  uint64_t ns0 = 0, tsc0 = 0, ns1 = 0, tsc1 = 0;
  pair(ns0, tsc0);
  do {
    pair(ns1, tsc1);
  } while (ns1 - ns0 < 1000000);  // 1 ms
  if (tsc1 <= tsc0) return 0.0;
  return static_cast<double>(ns1 - ns0) * 1e-9 / static_cast<double>(tsc1 - tsc0);
}
#else
double measure_tsc_period() { return 0.0; }
#endif

}  // namespace

double tsc_period = measure_tsc_period();

}  // namespace op_clock_detail
}  // namespace dtr
