#include "alloc_meter.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/alignment.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <vector>

namespace dtr::meter {
namespace {

// Note [Counting CPU allocator]
// A CPU budget must bound every CPU tensor of the process (parameters,
// gradients, optimizer state, data made before the block), as
// torch.cuda.memory_allocated does on CUDA. c10 keeps no such count (its
// ProfiledCPUMemoryReporter counts only while the profiler records), so dtr
// installs this allocator at import: c10's alloc_cpu/free_cpu, as the default
// allocator calls them, with the requested size written in a header of
// gAlignment bytes in front of the data (so the data keeps its alignment).
// The header, not a side table, because oneDNN allocates through
// raw_allocate/raw_deallocate, which need the DataPtr's context to be its data
// pointer: the deleter gets only that pointer, and finds the size before it.
// Per allocation and free this adds one relaxed atomic add to what the default
// allocator does (bench/cpu_counter.py measures it on eager code).
//
// It also stands in for the default allocator towards the profiler: it
// reports each allocation with its requested size, and a free only if the
// allocation was reported (the header records whether), exactly as the
// default allocator's reporter does, so dtr.measure sees what it saw before.
constexpr size_t kHeader = c10::gAlignment;
struct Header {
  int64_t nbytes;
  bool reported;
};
static_assert(sizeof(Header) <= kHeader);

std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};
std::atomic<bool> g_window_open{false};

const c10::Device kCPU(c10::DeviceType::CPU);

void note_alloc(int64_t n) {
  int64_t cur = g_current.fetch_add(n, std::memory_order_relaxed) + n;
  if (g_window_open.load(std::memory_order_relaxed)) {
    int64_t peak = g_peak.load(std::memory_order_relaxed);
    while (cur > peak && !g_peak.compare_exchange_weak(peak, cur, std::memory_order_relaxed)) {
    }
  }
}

void counted_delete(void* data) {
  if (data == nullptr) return;
  char* base = static_cast<char*>(data) - kHeader;
  const Header* h = reinterpret_cast<const Header*>(base);
  int64_t n = h->nbytes;
  bool reported = h->reported;
  int64_t cur = g_current.fetch_sub(n, std::memory_order_relaxed) - n;
  if (reported && c10::memoryProfilingEnabled()) {
    c10::reportMemoryUsageToProfiler(data, -n, static_cast<size_t>(cur), 0, kCPU);
  }
  c10::free_cpu(base);
}

thread_local AllocationHookSetting t_hook;

struct CountingCPUAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &counted_delete, kCPU};
    if (t_hook.hook != nullptr) t_hook.hook(t_hook.context, static_cast<int64_t>(n));
    void* base = c10::alloc_cpu(n + kHeader);  // throws c10::Error when out of memory
    Header* h = static_cast<Header*>(base);
    h->nbytes = static_cast<int64_t>(n);
    h->reported = false;
    void* data = static_cast<char*>(base) + kHeader;
    note_alloc(static_cast<int64_t>(n));
    if (c10::memoryProfilingEnabled()) {
      h->reported = true;
      c10::reportMemoryUsageToProfiler(
          data, static_cast<int64_t>(n), static_cast<size_t>(g_current.load(std::memory_order_relaxed)),
          0, kCPU);
    }
    return {data, data, &counted_delete, kCPU};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &counted_delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    if (count) std::memcpy(dest, src, count);
  }
};

CountingCPUAllocator* counting_allocator() {
  static auto* a = new CountingCPUAllocator();  // never destroyed: frees come until exit
  return a;
}

std::mutex g_install_mu;
bool g_tried = false;
std::atomic<bool> g_installed{false};  // read per op by the C++ runtime: no lock
// Held from begin() to end(): windows open on one thread at a time, nested there.
std::recursive_mutex g_window;
int g_window_depth = 0;  // guarded by g_window
// Per open window of this thread, outermost first: the peak the enclosing
// window had reached when this one opened (Note [Metering windows]).
thread_local std::vector<int64_t> t_enclosing_peaks;

}  // namespace

AllocationHookSetting set_allocation_hook(AllocationHookSetting setting) {
  AllocationHookSetting previous = t_hook;
  t_hook = setting;
  return previous;
}

bool install() {
  std::lock_guard<std::mutex> guard(g_install_mu);
  if (g_tried) return g_installed;
  g_tried = true;
  if (c10::GetCPUAllocator() != c10::GetDefaultCPUAllocator()) return false;
  // Priority 1, above the default allocator's 0. Storages made before keep
  // their own deleter, so they are never counted, in or out.
  c10::SetCPUAllocator(counting_allocator(), /*priority=*/1);
  g_installed.store(c10::GetCPUAllocator() == counting_allocator());
  return g_installed.load();
}

bool set_counting(bool on) {
  std::lock_guard<std::mutex> guard(g_install_mu);
  if (!g_installed) return false;
  c10::SetCPUAllocator(on ? counting_allocator() : c10::GetDefaultCPUAllocator(), /*priority=*/1);
  return true;
}

bool installed() {
  return g_installed.load(std::memory_order_relaxed);
}

int64_t current_bytes() {
  return g_current.load(std::memory_order_relaxed);
}

// Note [Metering windows]
// The count is always on; a window only tracks a peak over it, so an op's
// scratch is what it allocated above its start and freed again before its
// end. Allocations of other threads fall in the window too: the measurement
// is an upper bound, which only makes the reservation safer. Windows nest on
// one thread (an op measured while another measurement is open, e.g. the
// Python runtime's around a C++ one): opening one saves the enclosing
// window's peak so far and restarts the peak at the current bytes; closing
// it puts back the larger of the two, so the enclosing window still sees
// every byte of its own span. Another thread's begin() gets -1 meanwhile.
int64_t begin() {
  TORCH_CHECK(g_installed.load(std::memory_order_relaxed),
              "dtr: meter_begin without the counting CPU allocator installed");
  if (!g_window.try_lock()) return -1;  // another thread is measuring: skip this time
  int64_t cur = g_current.load(std::memory_order_relaxed);
  t_enclosing_peaks.push_back(g_window_depth > 0 ? g_peak.load(std::memory_order_relaxed) : 0);
  g_window_depth += 1;
  g_peak.store(cur, std::memory_order_relaxed);
  g_window_open.store(true, std::memory_order_relaxed);
  return cur;
}

std::pair<int64_t, int64_t> end(int64_t start) {
  TORCH_CHECK(start >= 0 && !t_enclosing_peaks.empty(), "dtr: meter_end without an open window");
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  int64_t cur = g_current.load(std::memory_order_relaxed);
  const int64_t enclosing = t_enclosing_peaks.back();
  t_enclosing_peaks.pop_back();
  g_window_depth -= 1;
  if (g_window_depth > 0) {
    g_peak.store(std::max(peak, enclosing), std::memory_order_relaxed);
  } else {
    g_window_open.store(false, std::memory_order_relaxed);
  }
  g_window.unlock();
  return {std::max<int64_t>(peak - start, 0), std::max<int64_t>(cur - start, 0)};
}

}  // namespace dtr::meter
