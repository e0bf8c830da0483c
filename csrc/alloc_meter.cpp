#include "alloc_meter.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <mutex>
#include <unordered_map>

namespace dtr::meter {
namespace {

std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};

// Note [Why a side table]
// oneDNN allocates its scratch with raw_allocate/raw_deallocate, which need the
// DataPtr's context to be its data pointer. So the wrapper cannot put the size
// in a context of its own: it keeps each live allocation's size in a table,
// sharded by address to keep lock contention between threads low.
struct Shard {
  std::mutex mu;
  std::unordered_map<void*, size_t> sizes;
};
constexpr size_t kShards = 64;
std::array<Shard, kShards>& shards() {
  static auto* s = new std::array<Shard, kShards>();  // never destroyed: frees can come at exit
  return *s;
}
Shard& shard_of(void* p) {
  return shards()[(reinterpret_cast<uintptr_t>(p) >> 6) % kShards];
}

c10::Allocator* g_inner = nullptr;
c10::DeleterFnPtr g_inner_delete = nullptr;

void note_alloc(int64_t n) {
  int64_t cur = g_current.fetch_add(n, std::memory_order_relaxed) + n;
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (cur > peak && !g_peak.compare_exchange_weak(peak, cur, std::memory_order_relaxed)) {
  }
}

void metered_delete(void* ptr) {
  if (ptr == nullptr) return;
  size_t n = 0;
  {
    Shard& s = shard_of(ptr);
    std::lock_guard<std::mutex> guard(s.mu);
    auto it = s.sizes.find(ptr);
    if (it != s.sizes.end()) {
      n = it->second;
      s.sizes.erase(it);
    }
  }
  g_current.fetch_sub(static_cast<int64_t>(n), std::memory_order_relaxed);
  g_inner_delete(ptr);
}

struct MeteredCPUAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr d = g_inner->allocate(n);
    void* data = d.get();
    if (data == nullptr || d.get_context() != data || d.get_deleter() != g_inner_delete) {
      return d;  // not the layout we wrap (e.g. n == 0): pass it through uncounted
    }
    c10::Device device = d.device();
    d.release_context();
    {
      Shard& s = shard_of(data);
      std::lock_guard<std::mutex> guard(s.mu);
      s.sizes[data] = n;
    }
    note_alloc(static_cast<int64_t>(n));
    return {data, data, &metered_delete, device};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &metered_delete; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    g_inner->copy_data(dest, src, count);
  }
};

MeteredCPUAllocator* g_metered = nullptr;
std::mutex g_install_mu;
// Held from begin() to end(): one measuring window at a time in the process.
std::mutex g_window;

}  // namespace

bool install() {
  std::lock_guard<std::mutex> guard(g_install_mu);
  if (g_metered != nullptr) return true;
  c10::Allocator* inner = c10::GetCPUAllocator();
  c10::DeleterFnPtr del = inner->raw_deleter();
  if (del == nullptr) return false;
  {
    // The wrapper relies on context == data and the raw deleter; check once.
    c10::DataPtr probe = inner->allocate(64);
    if (probe.get() == nullptr || probe.get_context() != probe.get() || probe.get_deleter() != del) {
      return false;
    }
  }
  g_inner = inner;
  g_inner_delete = del;
  g_metered = new MeteredCPUAllocator();  // never destroyed: its storages outlive windows
  return true;
}

int64_t current_bytes() {
  return g_current.load(std::memory_order_relaxed);
}

// Note [Metering windows]
// The wrapper is the CPU allocator only inside a window, so code outside one
// (eager PyTorch, dtr's ops after their first run) pays nothing. Storages
// allocated in a window keep the wrapper's deleter and are freed through it
// whenever they die. Priority 1 is above the default allocator's 0; the
// allocator in place before the window is put back after it (unless someone
// replaced the wrapper meanwhile).
int64_t begin() {
  TORCH_CHECK(g_metered != nullptr, "dtr: meter_begin before meter_install");
  if (!g_window.try_lock()) return -1;  // another thread is measuring: skip this time
  c10::SetCPUAllocator(g_metered, /*priority=*/1);
  if (c10::GetCPUAllocator() != g_metered) {  // a higher-priority allocator is in place
    g_window.unlock();
    return -1;
  }
  int64_t cur = g_current.load(std::memory_order_relaxed);
  g_peak.store(cur, std::memory_order_relaxed);
  return cur;
}

std::pair<int64_t, int64_t> end(int64_t start) {
  TORCH_CHECK(start >= 0, "dtr: meter_end without an open window");
  if (c10::GetCPUAllocator() == g_metered) c10::SetCPUAllocator(g_inner, /*priority=*/1);
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  int64_t cur = g_current.load(std::memory_order_relaxed);
  g_window.unlock();
  return {std::max<int64_t>(peak - start, 0), std::max<int64_t>(cur - start, 0)};
}

}  // namespace dtr::meter
