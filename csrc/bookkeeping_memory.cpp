#include "bookkeeping_memory.h"

#include <sys/mman.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>

namespace dtr::bookkeeping {
namespace {

constexpr size_t kSlabBytes = size_t{256} << 10;
constexpr size_t kGranule = 16;
constexpr size_t kClasses = kLargestBlock / kGranule;

// Note [Kept empty slabs]
// A training step records thousands of values and frees them all when it
// ends; unmapping their slabs then and mapping fresh ones in the next step
// cost a page fault per 4 KiB page touched again (0.15 faults per recorded op
// on a chain of adds, a tenth of the runtime's time per op, in the kernel).
// So emptied slabs wait in a process-wide list, up to this many (16 MiB), for
// the next slab of any size class; only those beyond it go back to the system.
constexpr size_t kKeptEmptySlabs = 64;

// Note [Per-thread block caches]
// Every allocation and free took its size class's mutex: two lock/unlock
// pairs per record, a dozen per op, the largest libc item in the per-op
// profile. Each thread keeps free blocks per class instead, up to
// kCachedBytes of them; it takes the mutex only to fetch kRefillBlocks at
// once, or to hand half back when it holds too many. Blocks are
// interchangeable within a class, so a block freed on another thread than the
// one that allocated it simply joins that thread's cache. A cached block
// counts as live in its slab, so a slab is never released under a cache.
//
// The cap is in bytes, and large: a step records its values and frees them
// all at its end, and the next step records as many again. With 64 blocks per
// class, the blocks a step freed went back to their slabs' free lists, and
// the next step took half its blocks one at a time under the mutex (a refill
// stops at a free list, see take_block's callers): about 350 instructions of
// locking per op on a chain of adds. Half a MiB per class still held only
// about 1,200 recipes (the largest record), so the blocks of a block of 3,000
// ops (the add chain of bench.runtime_overhead) were again half taken one at a
// time. Two MiB per class and thread holds about 5,000 of each record; a
// thread that ran a block keeps at most a few tens of MiB of free blocks.
constexpr size_t kCachedBytes = size_t{2} << 20;
constexpr uint32_t kMinCachedBlocks = 64;
constexpr uint32_t kRefillBlocks = 16;

struct FreeBlock {
  FreeBlock* next;
};

// Lives at the start of its slab; blocks follow it.
struct Slab {
  Slab* prev = nullptr;  // in its class's list of slabs with a free block
  Slab* next = nullptr;
  bool listed = false;
  size_t block_bytes;
  size_t live = 0;       // blocks handed out (to users or to per-thread caches)
  FreeBlock* free = nullptr;
  char* bump;  // blocks from here to `end` were never handed out
  char* end;
};
constexpr size_t kHeaderBytes = (sizeof(Slab) + 63) / 64 * 64;

struct SizeClass {
  std::mutex mu;
  Slab* with_room = nullptr;  // slabs with at least one free block
};

std::array<SizeClass, kClasses>& classes() {
  static auto* c = new std::array<SizeClass, kClasses>();  // never destroyed: frees come until exit
  return *c;
}

// Note [Kept empty slabs]; taken inside a class's mutex, never the other way.
struct EmptySlabs {
  std::mutex mu;
  void* slabs[kKeptEmptySlabs];
  size_t count = 0;
};

EmptySlabs& empty_slabs() {
  static auto* e = new EmptySlabs();  // never destroyed, as classes()
  return *e;
}

std::atomic<size_t> g_mapped{0};  // slabs in use: mapped and not kept empty
std::atomic<size_t> g_kept{0};

size_t class_of(size_t bytes) { return bytes == 0 ? 0 : (bytes - 1) / kGranule; }

// Note [Per-thread block caches]: how many free blocks of each class a thread
// keeps; a table, so that a free does not divide.
constexpr std::array<uint32_t, kClasses> kCachedBlocks = [] {
  std::array<uint32_t, kClasses> most{};
  for (size_t i = 0; i < kClasses; ++i) {
    const size_t n = kCachedBytes / ((i + 1) * kGranule);
    most[i] = n > kMinCachedBlocks ? static_cast<uint32_t>(n) : kMinCachedBlocks;
  }
  return most;
}();

void* map_slab_memory() {
  {
    EmptySlabs& e = empty_slabs();
    std::lock_guard<std::mutex> guard(e.mu);
    if (e.count > 0) {
      g_kept.fetch_sub(1, std::memory_order_relaxed);
      return e.slabs[--e.count];
    }
  }
  // Twice the size, then the unaligned ends unmapped: a block finds its slab
  // by rounding its address down.
  void* raw = mmap(nullptr, 2 * kSlabBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  auto start = reinterpret_cast<uintptr_t>(raw);
  uintptr_t aligned = (start + kSlabBytes - 1) & ~(kSlabBytes - 1);
  if (aligned > start) munmap(raw, aligned - start);
  uintptr_t tail = aligned + kSlabBytes;
  if (tail < start + 2 * kSlabBytes) munmap(reinterpret_cast<void*>(tail), start + 2 * kSlabBytes - tail);
  return reinterpret_cast<void*>(aligned);
}

Slab* map_slab(size_t block_bytes) {
  void* memory = map_slab_memory();
  auto* slab = new (memory) Slab();
  slab->block_bytes = block_bytes;
  slab->bump = static_cast<char*>(memory) + kHeaderBytes;
  slab->end = static_cast<char*>(memory) + kSlabBytes;
  g_mapped.fetch_add(1, std::memory_order_relaxed);
  return slab;
}

void release_slab(Slab* s) {
  g_mapped.fetch_sub(1, std::memory_order_relaxed);
  {
    EmptySlabs& e = empty_slabs();
    std::lock_guard<std::mutex> guard(e.mu);
    if (e.count < kKeptEmptySlabs) {
      s->~Slab();
      e.slabs[e.count++] = s;
      g_kept.fetch_add(1, std::memory_order_relaxed);
      return;
    }
  }
  munmap(s, kSlabBytes);
}

void link(SizeClass& c, Slab* s) {
  s->prev = nullptr;
  s->next = c.with_room;
  if (c.with_room) c.with_room->prev = s;
  c.with_room = s;
  s->listed = true;
}

void unlink(SizeClass& c, Slab* s) {
  if (s->prev) s->prev->next = s->next;
  else c.with_room = s->next;
  if (s->next) s->next->prev = s->prev;
  s->prev = s->next = nullptr;
  s->listed = false;
}

bool full(const Slab* s) {
  return s->free == nullptr && s->bump + s->block_bytes > s->end;
}

Slab* slab_of(const void* p) {
  return reinterpret_cast<Slab*>(reinterpret_cast<uintptr_t>(p) & ~(kSlabBytes - 1));
}

// Note [Prefetching the next free block]
// A free list runs through blocks freed long ago (a step's records die
// together at its end), so reading a block's link is a cache miss, and the
// next allocation from the list waits for it: the largest item in the per-op
// profile once slabs were reused. The block after the one handed out is
// fetched now, while the op's other work runs.
inline void prefetch_next(const FreeBlock* b) {
  if (b != nullptr) __builtin_prefetch(b, 1);
}

// Both under c.mu.
void* take_block(SizeClass& c, size_t index) {
  Slab* s = c.with_room;
  if (s == nullptr) {
    s = map_slab((index + 1) * kGranule);
    link(c, s);
  }
  void* p;
  if (s->free != nullptr) {
    p = s->free;
    s->free = s->free->next;
    prefetch_next(s->free);
  } else {
    p = s->bump;
    s->bump += s->block_bytes;
  }
  s->live += 1;
  if (full(s)) unlink(c, s);
  return p;
}

void return_block(SizeClass& c, void* p) {
  Slab* s = slab_of(p);
  auto* b = static_cast<FreeBlock*>(p);
  b->next = s->free;
  s->free = b;
  s->live -= 1;
  if (!s->listed) link(c, s);
  if (s->live != 0) return;
  // An empty slab is released unless it is the class's only one with room
  // (kept, so that a class at its edge does not release and take a slab per op).
  if (s->prev != nullptr || s->next != nullptr) {
    unlink(c, s);
    release_slab(s);
    return;
  }
  // Kept: its next blocks are cut in address order again instead of following
  // the free list, whose every step is a cache miss on memory freed long ago.
  s->free = nullptr;
  s->bump = reinterpret_cast<char*>(s) + kHeaderBytes;
}

// Note [Per-thread block caches]. Reached through one pointer per thread, set
// when the thread first caches a block; `state` says whether it is in use.
struct ThreadCache {
  enum State : uint8_t { kActive, kFlushed };
  FreeBlock* head[kClasses] = {};
  uint32_t count[kClasses] = {};
  State state = kActive;

  void push(size_t index, void* p) {
    auto* b = static_cast<FreeBlock*>(p);
    b->next = head[index];
    head[index] = b;
    count[index] += 1;
  }
};

// Note [Initial-exec TLS]
// A thread_local of a shared library is reached through __tls_get_addr (the
// general-dynamic model): two calls per allocation and per free here, about
// 600 instructions per op in the callgrind count of a chain of adds, more
// than the allocator's own. The initial-exec model reads it at a fixed
// offset from the thread pointer instead. A library loaded with dlopen gets
// such variables from the static TLS block's reserve, which is small (glibc
// keeps a few hundred bytes for it), so only this one pointer uses it.
__attribute__((tls_model("initial-exec"))) thread_local ThreadCache* t_cache = nullptr;

// What a thread's pointer holds after its cache was flushed at thread exit:
// never holds blocks, so frees from later destructors take the locked path.
ThreadCache* flushed_cache() {
  static auto* c = [] {
    auto* tc = new ThreadCache();
    tc->state = ThreadCache::kFlushed;
    return tc;
  }();
  return c;
}

void flush(ThreadCache& tc, size_t index, uint32_t keep) {
  SizeClass& c = classes()[index];
  std::lock_guard<std::mutex> guard(c.mu);
  while (tc.count[index] > keep) {
    FreeBlock* b = tc.head[index];
    tc.head[index] = b->next;
    tc.count[index] -= 1;
    return_block(c, b);
  }
}

void flush_all(ThreadCache& tc) {
  for (size_t i = 0; i < kClasses; ++i) {
    if (tc.count[i] > 0) flush(tc, i, 0);
  }
}

// Flushes and frees the thread's cache when the thread ends.
struct CacheOwner {
  ThreadCache* cache = new ThreadCache();
  CacheOwner() { t_cache = cache; }
  ~CacheOwner() {
    flush_all(*cache);
    t_cache = flushed_cache();
    delete cache;
  }
};

// The calling thread's cache, made on its first use; null once flushed.
ThreadCache* usable_cache() {
  ThreadCache* tc = t_cache;
  if (tc == nullptr) {
    thread_local CacheOwner owner;  // constructed here once per thread
    tc = t_cache;
  }
  return tc->state == ThreadCache::kActive ? tc : nullptr;
}

// Note [Allocation fast paths]
// Nearly every allocation and free is served by the thread's cache. With the
// refill and the locked paths inlined, each call saved and restored six
// registers for them (about 35 instructions a call against 12, five calls an
// op each way), so they live out of line.
[[gnu::noinline]] void* allocate_slow(size_t index) {
  ThreadCache* tc = usable_cache();
  SizeClass& c = classes()[index];
  std::lock_guard<std::mutex> guard(c.mu);
  void* p = take_block(c, index);
  if (tc != nullptr) {
    for (uint32_t k = 1; k < kRefillBlocks; ++k) {
      // Only blocks cut in address order: following a free list is a cache
      // miss per step, paid once per allocation rather than all at once.
      if (c.with_room != nullptr && c.with_room->free != nullptr) break;
      tc->push(index, take_block(c, index));
    }
  }
  return p;
}

[[gnu::noinline]] void deallocate_slow(void* p, size_t index) noexcept {
  if (ThreadCache* tc = usable_cache()) {
    tc->push(index, p);
    const uint32_t most = kCachedBlocks[index];
    if (tc->count[index] > most) flush(*tc, index, most / 2);
    return;
  }
  SizeClass& c = classes()[index];
  std::lock_guard<std::mutex> guard(c.mu);
  return_block(c, p);
}

}  // namespace

void* allocate(size_t bytes) {
  if (bytes > kLargestBlock) [[unlikely]] return ::operator new(bytes);
  const size_t index = class_of(bytes);
  if (ThreadCache* tc = t_cache) [[likely]] {
    if (FreeBlock* b = tc->head[index]) [[likely]] {  // only an active cache holds blocks
      tc->head[index] = b->next;
      prefetch_next(b->next);
      tc->count[index] -= 1;
      return b;
    }
  }
  return allocate_slow(index);
}

void deallocate(void* p, size_t bytes) noexcept {
  if (p == nullptr) return;
  if (bytes > kLargestBlock) [[unlikely]] {
    ::operator delete(p);
    return;
  }
  const size_t index = (slab_of(p)->block_bytes / kGranule) - 1;
  ThreadCache* tc = t_cache;
  if (tc != nullptr && tc->state == ThreadCache::kActive &&
      tc->count[index] < kCachedBlocks[index]) [[likely]] {
    tc->push(index, p);
    return;
  }
  deallocate_slow(p, index);
}

size_t mapped_slabs() {
  ThreadCache* tc = t_cache;
  if (tc != nullptr && tc->state == ThreadCache::kActive) flush_all(*tc);
  return g_mapped.load(std::memory_order_relaxed);
}

size_t kept_empty_slabs() {
  return g_kept.load(std::memory_order_relaxed);
}

}  // namespace dtr::bookkeeping
