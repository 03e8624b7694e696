// A caching CPU allocator for libtorch: large blocks are kept for reuse instead of going back to the
// system. glibc serves allocations above its mmap threshold (and every large one made from a non-main
// arena, i.e. from our torch threads) with a fresh mmap, so each forward of a big model page-faults and
// zero-fills its activations again; the SD1.5 VAE encoder at 512 px spends about a third of its time
// there on the CPU. Blocks of at least kMinBlock bytes are cached by size class (1/8 of a power of two),
// up to a limit of cached bytes; smaller ones go to libtorch's default CPU allocator.
#pragma once

#include <cstddef>
#include <cstdint>

namespace df {

struct CpuCacheStats {
  bool enabled = false;
  std::size_t limit_bytes = 0;
  std::size_t cached_bytes = 0;   // free blocks held for reuse
  std::size_t in_use_bytes = 0;   // blocks handed out and not freed yet (size classes)
  std::uint64_t hits = 0;         // allocations served from the cache
  std::uint64_t misses = 0;       // allocations that went to the system
};

// Installs the allocator as libtorch's CPU allocator unless DIFFUSION_FEATURES_CPU_CACHE_MB=0.
// The limit is DIFFUSION_FEATURES_CPU_CACHE_MB (MiB) or 4096. Call once, before tensors are made.
void InstallCpuCache();
CpuCacheStats CpuCacheInfo();
// Frees every cached block (blocks in use are untouched); returns the bytes released.
std::size_t EmptyCpuCache();
// Changes the limit (bytes); cached blocks above it are freed.
void SetCpuCacheLimit(std::size_t bytes);

}  // namespace df
