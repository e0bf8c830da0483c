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

struct FreeBlock {
  FreeBlock* next;
};

// Lives at the start of its slab; blocks follow it.
struct Slab {
  Slab* prev = nullptr;  // in its class's list of slabs with a free block
  Slab* next = nullptr;
  bool listed = false;
  size_t block_bytes;
  size_t live = 0;
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

std::atomic<size_t> g_mapped{0};

Slab* map_slab(size_t block_bytes) {
  // Twice the size, then the unaligned ends unmapped: a block finds its slab
  // by rounding its address down.
  void* raw = mmap(nullptr, 2 * kSlabBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  auto start = reinterpret_cast<uintptr_t>(raw);
  uintptr_t aligned = (start + kSlabBytes - 1) & ~(kSlabBytes - 1);
  if (aligned > start) munmap(raw, aligned - start);
  uintptr_t tail = aligned + kSlabBytes;
  if (tail < start + 2 * kSlabBytes) munmap(reinterpret_cast<void*>(tail), start + 2 * kSlabBytes - tail);
  auto* slab = new (reinterpret_cast<void*>(aligned)) Slab();
  slab->block_bytes = block_bytes;
  slab->bump = reinterpret_cast<char*>(aligned) + kHeaderBytes;
  slab->end = reinterpret_cast<char*>(aligned) + kSlabBytes;
  g_mapped.fetch_add(1, std::memory_order_relaxed);
  return slab;
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

}  // namespace

void* allocate(size_t bytes) {
  if (bytes > kLargestBlock) return ::operator new(bytes);
  size_t index = bytes == 0 ? 0 : (bytes - 1) / kGranule;
  SizeClass& c = classes()[index];
  std::lock_guard<std::mutex> guard(c.mu);
  Slab* s = c.with_room;
  if (s == nullptr) {
    s = map_slab((index + 1) * kGranule);
    link(c, s);
  }
  void* p;
  if (s->free != nullptr) {
    p = s->free;
    s->free = s->free->next;
  } else {
    p = s->bump;
    s->bump += s->block_bytes;
  }
  s->live += 1;
  if (full(s)) unlink(c, s);
  return p;
}

void deallocate(void* p, size_t bytes) noexcept {
  if (p == nullptr) return;
  if (bytes > kLargestBlock) {
    ::operator delete(p);
    return;
  }
  auto* s = reinterpret_cast<Slab*>(reinterpret_cast<uintptr_t>(p) & ~(kSlabBytes - 1));
  SizeClass& c = classes()[(s->block_bytes / kGranule) - 1];
  std::lock_guard<std::mutex> guard(c.mu);
  auto* b = static_cast<FreeBlock*>(p);
  b->next = s->free;
  s->free = b;
  s->live -= 1;
  if (!s->listed) link(c, s);
  // An empty slab goes back to the system unless it is the class's only one
  // with room (kept, so that a class at its edge does not map and unmap a
  // slab per op).
  if (s->live == 0 && (s->prev != nullptr || s->next != nullptr)) {
    unlink(c, s);
    munmap(s, kSlabBytes);
    g_mapped.fetch_sub(1, std::memory_order_relaxed);
  }
}

size_t mapped_slabs() {
  return g_mapped.load(std::memory_order_relaxed);
}

}  // namespace dtr::bookkeeping
