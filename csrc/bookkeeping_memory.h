// Memory for the runtime's own per-op objects, kept apart from tensor data.
//
// Note [Bookkeeping memory]
// Every op the runtime records leaves a few small objects that live as long as
// its value: a recipe and its argument lists, a cell, a storage record, a
// wrapper. With glibc's malloc they are carved out of the same heap as CPU
// tensor data, from the holes freed tensors leave. A hole with a 64-byte recipe
// in it no longer fits the next activation, so the heap grows instead, and
// glibc later trims its top and the next step faults those pages in again.
// Measured on bench's full-size ResNet with no limit (one torch thread): 2x
// eager's minor page faults and an 818 MB heap against eager's 525 MB, the
// whole of the C++ runtime's 9% over eager in system time. With the runtime's
// small allocations routed elsewhere (an LD_PRELOAD experiment), the heap and
// the step time came back to eager's.
//
// So these objects come from slabs of their own: 256 KiB regions mapped with
// mmap (never from malloc's heap), each cut into blocks of one size class.
// A slab whose blocks are all free is kept for the next slab of any class, up
// to 16 MiB of them (Note [Kept empty slabs] in bookkeeping_memory.cpp), and
// goes back to the system beyond that, except one per class kept for the next
// block. One lock per size class, taken only when a thread's own cache of
// free blocks runs empty or full (Note [Per-thread block caches]);
// allocations larger than the largest class go to operator new.
#pragma once

#include <c10/util/flat_hash_map.h>

#include <cstddef>
#include <functional>
#include <limits>
#include <new>
#include <vector>

namespace dtr::bookkeeping {

constexpr size_t kLargestBlock = 1024;

void* allocate(size_t bytes);
void deallocate(void* p, size_t bytes) noexcept;

// Slabs holding blocks or kept for their class, for tests and diagnostics
// (the calling thread's cached blocks are handed back first).
size_t mapped_slabs();
// Empty slabs kept mapped for reuse (Note [Kept empty slabs]).
size_t kept_empty_slabs();

// Base for objects allocated from bookkeeping memory. An over-aligned one (a
// storage record holds the pool's cache-line entry) gets a block whose size is
// a multiple of its alignment, which slabs align (see Allocator below).
struct Object {
  static void* operator new(size_t bytes) { return allocate(bytes); }
  static void operator delete(void* p, size_t bytes) noexcept { deallocate(p, bytes); }
  static void* operator new(size_t bytes, std::align_val_t align) {
    return allocate(aligned_size(bytes, align));
  }
  static void operator delete(void* p, size_t bytes, std::align_val_t align) noexcept {
    deallocate(p, aligned_size(bytes, align));
  }

 private:
  static size_t aligned_size(size_t bytes, std::align_val_t align) {
    const size_t a = static_cast<size_t>(align);
    if (a > 64 || bytes > kLargestBlock) throw std::bad_alloc();  // slabs align to 64 at most
    return (bytes + a - 1) / a * a;
  }
};

// A stateless allocator for standard containers of bookkeeping objects.
// Blocks are 16-byte aligned; a type aligned more (the pool's cache-line
// entries) gets blocks of a multiple of its alignment, which slabs (64-byte
// aligned block areas) then align.
template <class T>
struct Allocator {
  using value_type = T;
  Allocator() noexcept = default;
  template <class U>
  Allocator(const Allocator<U>&) noexcept {}
  T* allocate(size_t n) {
    if (n > std::numeric_limits<size_t>::max() / sizeof(T) / 2) throw std::bad_array_new_length();
    return static_cast<T*>(bookkeeping::allocate(bytes(n)));
  }
  void deallocate(T* p, size_t n) noexcept { bookkeeping::deallocate(p, bytes(n)); }
  static size_t bytes(size_t n) {
    static_assert(alignof(T) <= 64, "bookkeeping memory aligns to at most 64 bytes");
    size_t b = n * sizeof(T);
    return alignof(T) > 16 ? (b + alignof(T) - 1) / alignof(T) * alignof(T) : b;
  }
  template <class U>
  bool operator==(const Allocator<U>&) const noexcept { return true; }
};

template <class T>
using Vector = std::vector<T, Allocator<T>>;
// Note [Per-op hash tables]
// The tables an op looks up (plain tensors counted and read by recipes, the
// op-memory and op-traits copies, the pool's ids) are open-addressed with
// power-of-two sizes and Fibonacci hashing: one multiply where
// std::unordered_map divides by a prime and follows a node pointer. Rehashing
// moves the values, so only for values nothing points into.
template <class K, class V>
using FlatMap = ska::flat_hash_map<K, V, std::hash<K>, std::equal_to<K>, Allocator<std::pair<K, V>>>;

}  // namespace dtr::bookkeeping
