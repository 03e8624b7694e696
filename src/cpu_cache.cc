// Caching CPU allocator (see cpu_cache.h).
#include "cpu_cache.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

namespace df {
namespace {

constexpr std::size_t kAlign = 64;                // c10's gAlignment on x86-64
constexpr std::size_t kHeader = kAlign;           // block size stored in front of the data
constexpr std::size_t kMinBlock = std::size_t{1} << 20;  // smaller requests are not cached
constexpr std::size_t kMaxRequest = std::size_t{1} << 56;  // larger ones fail as out of memory

// Size class: round up to a multiple of 1/8 of the request's power of two (at most 12.5% waste).
std::size_t SizeClass(std::size_t n) {
  std::size_t p = 1;
  while (p * 2 <= n) p *= 2;
  const std::size_t step = p / 8;
  return (n + step - 1) / step * step;
}

class CachingCpuAllocator final : public c10::Allocator {
 public:
  explicit CachingCpuAllocator(std::size_t limit) : limit_(limit) {}

  // libtorch < 2.3 declares allocate() const, later versions non-const; defining both (without
  // `override`) makes one of them the override on either, and copy_data() is the pure virtual that
  // later versions add (a plain member before that).
  c10::DataPtr allocate(std::size_t n) const { return Allocate(n); }
  c10::DataPtr allocate(std::size_t n) { return Allocate(n); }
  void copy_data(void* dest, const void* src, std::size_t count) const { std::memcpy(dest, src, count); }
  c10::DeleterFnPtr raw_deleter() const override { return &Free; }

  CpuCacheStats Stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    CpuCacheStats s;
    s.enabled = true;
    s.limit_bytes = limit_;
    s.cached_bytes = cached_;
    s.in_use_bytes = in_use_;
    s.hits = hits_;
    s.misses = misses_;
    return s;
  }

  std::size_t Empty() {
    std::vector<void*> drop;
    std::size_t released = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [size, blocks] : free_) {
        for (void* b : blocks) drop.push_back(b);
        released += size * blocks.size();
      }
      free_.clear();
      cached_ = 0;
    }
    for (void* b : drop) std::free(b);
    return released;
  }

  void SetLimit(std::size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_ = bytes;
      if (cached_ <= limit_) return;
    }
    Empty();
  }

  static CachingCpuAllocator* instance;

 private:
  // Every block, cached size or not, carries the header, so that Free (also the raw_deleter, which
  // oneDNN's allocator hook calls on raw_allocate'd memory) can tell them apart.
  c10::DataPtr Allocate(std::size_t n) const {
    void* base = nullptr;
    // No size class or header arithmetic may wrap around (a wrapped size would hand out a tiny block).
    TORCH_CHECK_WITH(OutOfMemoryError, n <= kMaxRequest, "diffusion-features CPU allocator: out of memory allocating ", n, " bytes");
    if (n < kMinBlock) {
      if (posix_memalign(&base, kAlign, n + kHeader) != 0 || base == nullptr) {
        TORCH_CHECK_WITH(OutOfMemoryError, false, "diffusion-features CPU allocator: out of memory allocating ", n, " bytes");
      }
      *static_cast<std::size_t*>(base) = 0;  // 0: not a cached size class
      void* data = static_cast<char*>(base) + kHeader;
      return {data, data, &Free, c10::Device(c10::DeviceType::CPU)};
    }
    const std::size_t size = SizeClass(n);
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        base = it->second.back();
        it->second.pop_back();
        cached_ -= size;
        ++hits_;
      } else {
        ++misses_;
      }
      in_use_ += size;
    }
    if (base == nullptr) {
      if (posix_memalign(&base, kAlign, size + kHeader) != 0 || base == nullptr) {
        {
          std::lock_guard<std::mutex> lock(mu_);
          in_use_ -= size;
        }
        TORCH_CHECK_WITH(OutOfMemoryError, false, "diffusion-features CPU allocator: out of memory allocating ", n, " bytes");
      }
      *static_cast<std::size_t*>(base) = size;
    }
    void* data = static_cast<char*>(base) + kHeader;
    return {data, data, &Free, c10::Device(c10::DeviceType::CPU)};
  }

  static void Free(void* data) {
    if (data == nullptr) return;
    void* base = static_cast<char*>(data) - kHeader;
    const std::size_t size = *static_cast<std::size_t*>(base);
    if (size == 0) {
      std::free(base);
      return;
    }
    CachingCpuAllocator* self = instance;
    {
      std::lock_guard<std::mutex> lock(self->mu_);
      self->in_use_ -= size;
      if (self->cached_ + size <= self->limit_) {
        self->free_[size].push_back(base);
        self->cached_ += size;
        return;
      }
    }
    std::free(base);
  }

  mutable std::mutex mu_;
  mutable std::map<std::size_t, std::vector<void*>> free_;
  std::size_t limit_;
  mutable std::size_t cached_ = 0;
  mutable std::size_t in_use_ = 0;
  mutable std::uint64_t hits_ = 0;
  mutable std::uint64_t misses_ = 0;
};

CachingCpuAllocator* CachingCpuAllocator::instance = nullptr;

void InstallOnce();

}  // namespace

void InstallCpuCache() {
  // Each env (main thread, every Worker) calls this from its own thread.
  static std::once_flag once;
  std::call_once(once, InstallOnce);
}

namespace {
void InstallOnce() {
  std::size_t limit_mb = 4096;
  if (const char* e = std::getenv("DIFFUSION_FEATURES_CPU_CACHE_MB")) {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(e, &end, 10);
    if (end != e && *end == '\0') limit_mb = static_cast<std::size_t>(v > (1ULL << 30) ? (1ULL << 30) : v);
  }
  if (limit_mb == 0) return;
  // libtorch keeps a raw pointer to the CPU allocator for the life of the process and tensors may be
  // freed during exit, after static destructors: the allocator is deliberately never destroyed.
  static CachingCpuAllocator* const alloc = new CachingCpuAllocator(limit_mb << 20);  // NOLINT: process lifetime
  CachingCpuAllocator::instance = alloc;
  c10::SetCPUAllocator(alloc, /*priority=*/100);
}
}  // namespace

CpuCacheStats CpuCacheInfo() {
  if (CachingCpuAllocator::instance == nullptr) return {};
  return CachingCpuAllocator::instance->Stats();
}

std::size_t EmptyCpuCache() {
  return CachingCpuAllocator::instance == nullptr ? 0 : CachingCpuAllocator::instance->Empty();
}

void SetCpuCacheLimit(std::size_t bytes) {
  if (CachingCpuAllocator::instance != nullptr) CachingCpuAllocator::instance->SetLimit(bytes);
}

}  // namespace df
