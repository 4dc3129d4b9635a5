// lowmem's CPU caching allocator (lowmem.hostmem): tensors of 1 MiB or more come from mmap'd blocks that are
// kept when freed and reused for the next tensor of the same size class, so the heap neither fragments (glibc's)
// nor faults in fresh zeroed pages every step (glibc with a fixed mmap threshold). Smaller ones go to c10::alloc_cpu.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr size_t kLarge = size_t(1) << 20;  // below: c10::alloc_cpu
constexpr size_t kPage = 4096;
constexpr size_t kPerOctave = 8;             // size classes per power of two: at most 1/8 rounded up

size_t size_class(size_t n) {
  size_t step = (size_t(1) << (63 - __builtin_clzll(n))) / kPerOctave;
  if (step < kPage) step = kPage;
  return (n + step - 1) / step * step;
}

struct Pool {
  std::mutex mu;
  std::map<size_t, std::vector<void*>> free;  // size class -> cached blocks
  std::unordered_map<void*, size_t> blocks;    // every mapped block (live or cached) -> its size class
  uint64_t live = 0, cached = 0, peak = 0, maps = 0, unmaps = 0, mapped = 0, hits = 0;
  uint64_t limit = UINT64_MAX;                 // live + cached above this: cached blocks are unmapped first

  // take one cached block of the class at `it` out of the cache: (block, its class)
  std::pair<void*, size_t> pop(std::map<size_t, std::vector<void*>>::iterator it) {
    void* p = it->second.back();
    size_t c = it->first;
    it->second.pop_back();
    if (it->second.empty()) free.erase(it);
    cached -= c;
    return {p, c};
  }
  void unmap_largest() {
    auto [p, c] = pop(std::prev(free.end()));
    munmap(p, c);
    blocks.erase(p);
    unmaps++;
  }
  void trim(uint64_t more) {  // unmap cached blocks until live + cached + more fits the limit
    while (cached && live + cached > (limit > more ? limit - more : 0)) unmap_largest();
  }
  void note() { if (live + cached > peak) peak = live + cached; }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may be freed after static destructors ran
  return *p;
}

void* take(size_t n) {
  Pool& P = pool();
  size_t c = size_class(n);
  std::lock_guard<std::mutex> guard(P.mu);
  auto it = P.free.find(c);
  if (it == P.free.end()) {  // else the next larger cached class, if at most one step larger
    auto up = P.free.upper_bound(c);
    if (up != P.free.end() && up->first <= c + c / kPerOctave) it = up;
  }
  if (it != P.free.end()) {
    auto [p, got] = P.pop(it);
    P.live += got;
    P.hits++;
    P.note();
    return p;
  }
  P.trim(c);
  void* p = mmap(nullptr, c, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    while (P.cached) P.unmap_largest();
    p = mmap(nullptr, c, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  }
  TORCH_CHECK(p != MAP_FAILED, "DefaultCPUAllocator: not enough memory: you tried to allocate ", n,
              " bytes (lowmem's host allocator: mmap failed with ", P.live, " bytes in use)");
  P.blocks.emplace(p, c);
  P.live += c;
  P.maps++;
  P.mapped += c;
  P.note();
  return p;
}

// torch.profiler's memory events (profile_memory=True), as torch's default CPU allocator reports them: the size of
// each allocation made while profiling is kept until it is freed
struct Profiled {
  std::mutex mu;
  std::unordered_map<void*, size_t> sizes;
  size_t total = 0;
};
Profiled& profiled() {
  static Profiled* p = new Profiled();
  return *p;
}

void report_alloc(void* p, size_t n) {
  if (p == nullptr || !c10::memoryProfilingEnabled()) return;
  Profiled& R = profiled();
  size_t total;
  {
    std::lock_guard<std::mutex> guard(R.mu);
    R.sizes[p] = n;
    total = R.total += n;
  }
  c10::reportMemoryUsageToProfiler(p, static_cast<int64_t>(n), total, 0, c10::Device(c10::DeviceType::CPU));
}

void report_free(void* p) {
  Profiled& R = profiled();
  size_t n, total;
  {
    std::lock_guard<std::mutex> guard(R.mu);
    if (R.sizes.empty()) return;
    auto it = R.sizes.find(p);
    if (it == R.sizes.end()) return;
    n = it->second;
    R.sizes.erase(it);
    total = R.total -= n;
  }
  c10::reportMemoryUsageToProfiler(p, -static_cast<int64_t>(n), total, 0, c10::Device(c10::DeviceType::CPU));
}

void give_back(void* p) {
  if (p == nullptr) return;
  report_free(p);
  Pool& P = pool();
  {
    std::lock_guard<std::mutex> guard(P.mu);
    auto it = P.blocks.find(p);
    if (it != P.blocks.end()) {
      size_t c = it->second;
      P.live -= c;
      P.free[c].push_back(p);
      P.cached += c;
      P.trim(0);
      return;
    }
  }
  c10::free_cpu(p);
}

struct HostAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* p = n >= kLarge ? take(n) : c10::alloc_cpu(n);
    report_alloc(p, n);
    return {p, p, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &give_back; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HostAllocator* allocator() {
  static HostAllocator* a = new HostAllocator();
  return a;
}

}  // namespace

extern "C" {
// torch keeps the CPU allocator of the highest priority set so far: install and uninstall each pass a higher one
void lowmem_host_install(int priority) { c10::SetCPUAllocator(allocator(), static_cast<uint8_t>(priority)); }
void lowmem_host_uninstall(int priority) {
  c10::SetCPUAllocator(c10::GetDefaultCPUAllocator(), static_cast<uint8_t>(priority));
}
void lowmem_host_set_limit(uint64_t limit) {
  std::lock_guard<std::mutex> guard(pool().mu);
  pool().limit = limit;
  pool().trim(0);
}
void lowmem_host_empty_cache() {
  std::lock_guard<std::mutex> guard(pool().mu);
  while (pool().cached) pool().unmap_largest();
}
void lowmem_host_reset_peak() {
  std::lock_guard<std::mutex> guard(pool().mu);
  pool().peak = pool().live + pool().cached;
}
// live, cached, peak (live + cached), maps, unmaps, mapped bytes, hits, limit
void lowmem_host_stats(uint64_t* out) {
  Pool& P = pool();
  std::lock_guard<std::mutex> guard(P.mu);
  uint64_t v[8] = {P.live, P.cached, P.peak, P.maps, P.unmaps, P.mapped, P.hits, P.limit};
  for (int i = 0; i < 8; i++) out[i] = v[i];
}
}
