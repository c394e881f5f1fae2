// A bounded cache of freed CPU tensor buffers, installed as torch's CPU allocator.
//
// Why: `lst` sets glibc's mmap threshold to 128 KiB so that freed batch buffers leave the process at
// once (bounded RSS). The price was that every side-network step mapped, zero-filled and unmapped
// its ~1 MB temporaries again: on a cached MiniLM SST-2 epoch, 12.7 M page faults and a third of the
// CPU time in the kernel. This allocator keeps up to `cap` bytes of freed buffers (each its own
// mapping, so nothing fragments) and hands them out again to requests of about the same size.
//
// How much it keeps: up to `cap`, or, when more, as much as the live buffers have shrunk below their
// own peak (`peak_live - live`). A training step's forward holds its activations until the backward
// frees them, so a fixed cap smaller than that (32 MB against ~100 MB on MiniLM) let every forward
// miss: 11 k misses per cached SST-2 epoch, ~1.7 M page faults. Keeping what the step itself held at
// its peak lets the next step reuse it, and live + cached never passes max(peak_live, live + cap):
// the process peaks where its own buffers peak, plus at most `cap`, as with a fixed cap. Oldest
// buffers are unmapped first when that bound is reached (also after a miss maps a new one), and
// requests under `min_bytes` go to torch's own allocator (glibc's heap) as before.
//
// A request that no cached block fits (within `slack`) grows the largest smaller one with mremap
// rather than mapping a fresh block: the pages it already holds stay resident, so only the growth is
// faulted in. Batches vary in shape, so a step's buffers vary in size from step to step; a fresh
// mapping for each such miss zero-filled every page again (measured on a cached MiniLM SST-2 epoch:
// 0.92 hit rate, yet ~440 k page faults and ~1 s of kernel time on the training thread).
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr size_t kPage = 4096;
// Kernels may read a vector's width past a tensor's end; glibc leaves slack there, so do we.
constexpr size_t kTail = 64;
// A reused block's unused tail of at least this many bytes is handed back to the OS (see `take`).
constexpr size_t kDropTail = size_t(1) << 20;

struct Entry {
  void* ptr;
  uint64_t seq;
};
using FreeMap = std::multimap<size_t, Entry>;

class BoundedCachingCPUAllocator final : public c10::Allocator {
 public:
  BoundedCachingCPUAllocator(c10::Allocator* base, size_t min_bytes, size_t cap, double slack)
      : base_(base), min_bytes_(min_bytes), cap_(cap), slack_(slack) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes_) return base_->allocate(n);
    const size_t want = (n + kTail + kPage - 1) & ~(kPage - 1);
    auto [p, size] = take(want);
    if (!p) {
      size = want;
      p = grow_smaller(want);
      if (!p) p = map(want);
      if (!p) {
        release_all();
        p = map(want);
      }
      TORCH_CHECK(p, "lst CPU buffer cache: out of memory mapping ", want, " bytes");
      std::vector<std::pair<void*, size_t>> unmap;
      {
        std::lock_guard<std::mutex> g(mu_);
        live_[p] = size;
        live_bytes_ += size;
        peak_live_ = std::max(peak_live_, live_bytes_);
        misses_++;
        evict_to(allowed(), unmap);
      }
      for (auto& u : unmap) munmap(u.first, u.second);
    }
    return {p, p, &Delete, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &Delete; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void release(void* p) {
    std::vector<std::pair<void*, size_t>> unmap;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = live_.find(p);
      if (it == live_.end()) {
        // raw_allocate of a small block went to the base allocator, but raw_deleter() is ours.
        base_->raw_deleter()(p);
        return;
      }
      const size_t size = it->second;
      live_.erase(it);
      live_bytes_ -= size;
      const size_t limit = allowed();
      if (size > limit) {
        unmap.emplace_back(p, size);
      } else {
        evict_to(limit - size, unmap);
        const uint64_t s = seq_++;
        order_.emplace(s, free_.emplace(size, Entry{p, s}));
        cached_ += size;
        peak_cached_ = std::max(peak_cached_, cached_);
      }
    }
    for (auto& u : unmap) munmap(u.first, u.second);
  }

  void release_all() {
    std::vector<std::pair<void*, size_t>> unmap;
    {
      std::lock_guard<std::mutex> g(mu_);
      for (auto& f : free_) unmap.emplace_back(f.second.ptr, f.first);
      free_.clear();
      order_.clear();
      cached_ = 0;
      peak_live_ = live_bytes_;  // a fresh start: earlier peaks no longer license a larger cache
    }
    for (auto& u : unmap) munmap(u.first, u.second);
  }

  void restore_peak(size_t peak) {
    std::lock_guard<std::mutex> g(mu_);
    peak_live_ = std::max(peak_live_, peak);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {int64_t(cached_), int64_t(peak_cached_), int64_t(cap_), hits_, misses_, int64_t(live_.size()),
            int64_t(min_bytes_), int64_t(live_bytes_), int64_t(peak_live_), resized_};
  }

  static void Delete(void* p);

 private:
  // A cached block of at least `want` bytes and at most `want * (1 + slack)` and its size, or nullptr.
  // A tail of `kDropTail` or more past `want` goes back to the OS (MADV_DONTNEED: it reads as zeros
  // when touched again): its pages stayed resident from the block's last, longer use, yet the request
  // never touches them. The block still counts its whole size, so what the cache keeps is decided as
  // before and the process holds no more than before at any moment; a later, longer request the block
  // serves faults the tail in again. Measured on the 7B-shaped side step (`lst bench scale`, 128 MB
  // at 128 tokens): the step's requests peak at 709-714 MB, the blocks serving them at 723, and the
  // process peaks ~2 MB lower. Counting such a block as `want` bytes instead took 3 MB off there
  // but let MiniLM's cache keep 2 MB more.
  std::pair<void*, size_t> take(size_t want) {
    void* p = nullptr;
    size_t size = 0;
    bool drop = false;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.lower_bound(want);
      if (it == free_.end() || it->first > want + size_t(double(want) * slack_)) return {nullptr, 0};
      p = it->second.ptr;
      size = it->first;
      order_.erase(it->second.seq);
      free_.erase(it);
      cached_ -= size;
      drop = size - want >= kDropTail;
      live_[p] = size;
      live_bytes_ += size;
      peak_live_ = std::max(peak_live_, live_bytes_);
      hits_++;
    }
    if (drop) madvise(static_cast<char*>(p) + want, size - want, MADV_DONTNEED);
    return {p, size};
  }

  // A miss: the largest cached block smaller than `want`, grown to `want` bytes by mremap (its pages
  // stay resident, so only the growth faults), or nullptr when there is none of at least a quarter of
  // `want`. Larger blocks are never shrunk for it: on the 7B-shaped side step (`lst bench scale`,
  // 128 MB at 128 tokens), shrinking the nearest larger block as well raised the peak by 21 MB and
  // the misses from ~60 to ~125 per step; growing only kept the peak (1,137 MB against 1,140) and
  // cut the faults by 29%.
  void* grow_smaller(size_t want) {
    void* p = nullptr;
    size_t size = 0;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto hi = free_.lower_bound(want);
      if (hi == free_.begin() || std::prev(hi)->first < want / 4) return nullptr;
      FreeMap::iterator pick = std::prev(hi);
      p = pick->second.ptr;
      size = pick->first;
      order_.erase(pick->second.seq);
      free_.erase(pick);
      cached_ -= size;
      resized_++;
    }
    void* q = mremap(p, size, want, MREMAP_MAYMOVE);
    if (q != MAP_FAILED) return q;
    munmap(p, size);
    return nullptr;
  }

  // The most the cache may hold now: `cap`, or what the live buffers have shrunk below their peak.
  size_t allowed() const { return std::max(cap_, peak_live_ - live_bytes_); }

  // Unmap the oldest cached blocks (into `unmap`, done outside the lock) until at most `limit` remain.
  void evict_to(size_t limit, std::vector<std::pair<void*, size_t>>& unmap) {
    while (cached_ > limit && !order_.empty()) {
      FreeMap::iterator victim = order_.begin()->second;
      order_.erase(order_.begin());
      unmap.emplace_back(victim->second.ptr, victim->first);
      cached_ -= victim->first;
      free_.erase(victim);
    }
  }

  static void* map(size_t n) {
    void* p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
  }

  c10::Allocator* base_;
  const size_t min_bytes_, cap_;
  const double slack_;
  std::mutex mu_;
  FreeMap free_;                                 // size -> cached block
  std::map<uint64_t, FreeMap::iterator> order_;  // age -> cached block
  std::unordered_map<void*, size_t> live_;       // handed-out block -> its mapped size
  size_t cached_ = 0, peak_cached_ = 0;
  size_t live_bytes_ = 0, peak_live_ = 0;  // bytes of the blocks handed out (now, and at most so far)
  uint64_t seq_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  int64_t resized_ = 0;  // misses served by growing a smaller cached block
};

BoundedCachingCPUAllocator* g_cache = nullptr;
void BoundedCachingCPUAllocator::Delete(void* p) { g_cache->release(p); }

}  // namespace

// Install once per process; later calls keep the first settings. Returns whether this call installed it.
bool install(int64_t min_bytes, int64_t cap, double slack) {
  if (g_cache) return false;
  g_cache = new BoundedCachingCPUAllocator(c10::GetCPUAllocator(), size_t(min_bytes), size_t(cap), slack);
  c10::SetCPUAllocator(g_cache, /*priority=*/100);
  return true;
}

// [cached bytes, peak cached bytes, cap, hits, misses, live blocks, min bytes, live bytes, peak live bytes,
//  misses served by growing a smaller cached block];
// empty when not installed.
std::vector<int64_t> stats() { return g_cache ? g_cache->stats() : std::vector<int64_t>{}; }

// Unmap every cached block (the cache itself stays installed).
void release() {
  if (g_cache) g_cache->release_all();
}

// Cache against a peak of live bytes again (at least `peak`): the training steps' peak after an
// evaluation's `release`, so the next epoch keeps as many blocks as the one before did.
void restore_peak(int64_t peak) {
  if (g_cache && peak > 0) g_cache->restore_peak(size_t(peak));
}
