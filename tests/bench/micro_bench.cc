// Micro-benchmarks of the page map and of the skip-unchanged comparison
// (issue 3). Google Benchmark; run `build/tests/bench/micro_bench` or
// `meson test -C build --benchmark micro_bench`. Prints figures, asserts none.
//
//   PageMap find: present and absent pages, in dense maps (pages 0..n-1) and
//     sparse maps (n random pages of a 64 TiB file), n = 1k and 1M; the keys
//     are looked up in a shuffled order, so the 1M cases measure cache misses
//     as a real random access does.
//   PageMap set_state churn: a map kept at n entries; each iteration inserts
//     one page (Absent -> Hole) and erases the oldest (Hole -> Absent).
//   Also the realistic life of a page: Absent -> Loading -> Clean -> Absent.
//   Skip-unchanged: memcmp of two equal pages, of two pages differing in the
//     last byte (the worst case of a write that changes little), the all-zero
//     check as File does it, and XXH3_64bits of a page (File's base hash),
//     for 4 KiB and 64 KiB pages.
//   Copy out of fresh segment pages (written by the kernel, never touched in
//     user mode, as loaded pages are): memcpy vs fd_memory::copy_out (pread
//     of the memfd), 1 MiB per copy. On a PVM guest the first user-mode
//     touch of each page costs a fault of the hypervisor's (fd_memory.h).
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "deferfs/fd_memory.h"
#include "deferfs/page_map.h"

namespace {

using deferfs::PageMap;
using deferfs::PageState;

constexpr uint64_t kSparseSpan = uint64_t{1} << 34;  // pages of a 64 TiB file (4 KiB pages)

// n distinct page indexes: 0..n-1 (dense) or random below kSparseSpan.
std::vector<uint64_t> make_pages(size_t n, bool sparse, uint64_t seed) {
  std::vector<uint64_t> v;
  v.reserve(n);
  if (!sparse) {
    for (size_t i = 0; i < n; ++i) v.push_back(i);
  } else {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<uint64_t> d(0, kSparseSpan - 1);
    while (v.size() < n) v.push_back(d(rng));
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
    while (v.size() < n) v.push_back(d(rng));  // rare duplicates replaced
  }
  return v;
}

void fill(PageMap& m, const std::vector<uint64_t>& pages) {
  for (uint64_t p : pages) m.set_state(p, PageState::Hole);
}

// Keys to look up: the present pages, or pages that are not in the map.
std::vector<uint64_t> lookup_keys(const std::vector<uint64_t>& present, bool want_present, bool sparse,
                                  const PageMap& m) {
  std::vector<uint64_t> keys;
  std::mt19937_64 rng(42);
  if (want_present) {
    keys = present;
  } else {
    const size_t n = present.size();
    std::uniform_int_distribution<uint64_t> d(0, sparse ? kSparseSpan - 1 : 4 * n);
    while (keys.size() < n) {
      // dense: absent pages just past the map's range and anywhere below 4n.
      uint64_t k = sparse ? d(rng) : n + d(rng) % (3 * n + 1);
      if (m.find(k) == nullptr) keys.push_back(k);
    }
  }
  std::shuffle(keys.begin(), keys.end(), rng);
  return keys;
}

// Args: {n, sparse (0/1), present (0/1)}
void BM_PageMapFind(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const bool sparse = state.range(1) != 0;
  const bool present = state.range(2) != 0;
  PageMap m;
  const auto pages = make_pages(n, sparse, 1);
  fill(m, pages);
  const auto keys = lookup_keys(pages, present, sparse, m);
  size_t i = 0, hits = 0;
  for (auto _ : state) {
    const deferfs::PageEntry* e = m.find(keys[i]);
    benchmark::DoNotOptimize(e);
    hits += e != nullptr;
    if (++i == keys.size()) i = 0;
  }
  if ((hits != 0) != present) state.SkipWithError("lookups found the wrong pages");
  state.SetItemsProcessed(state.iterations());
  state.SetLabel(std::string(sparse ? "sparse" : "dense") + (present ? ", present" : ", absent") +
                 ", map " + std::to_string(m.memory_bytes() >> 10) + " KiB");
}
BENCHMARK(BM_PageMapFind)
    ->ArgNames({"n", "sparse", "present"})
    ->ArgsProduct({{1 << 10, 1 << 20}, {0, 1}, {1, 0}});

// Args: {n, sparse}: a map of n entries; insert one new page, erase the oldest.
void BM_PageMapChurn(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const bool sparse = state.range(1) != 0;
  // A ring of 2n distinct pages: the first n are in the map, the next
  // n come in one by one while the oldest go.
  const auto pages = make_pages(2 * n, sparse, 2);
  std::vector<uint64_t> ring = pages;
  std::shuffle(ring.begin(), ring.end(), std::mt19937_64(3));
  PageMap m;
  for (size_t k = 0; k < n; ++k) m.set_state(ring[k], PageState::Hole);
  size_t head = n, tail = 0;  // next to insert, next to erase
  for (auto _ : state) {
    benchmark::DoNotOptimize(m.set_state(ring[head], PageState::Hole));
    m.set_state(ring[tail], PageState::Absent);
    if (++head == ring.size()) head = 0;
    if (++tail == ring.size()) tail = 0;
  }
  if (m.entries() != n) state.SkipWithError("churn changed the map's size");
  state.SetItemsProcessed(state.iterations() * 2);  // one insert + one erase
  state.SetLabel(sparse ? "sparse" : "dense");
}
BENCHMARK(BM_PageMapChurn)->ArgNames({"n", "sparse"})->ArgsProduct({{1 << 10, 1 << 20}, {0, 1}});

// The life of a loaded page in a map of n entries: Absent -> Loading -> Clean
// (found again by key, as the loader does after retaking the lock) -> Absent.
void BM_PageMapLoadCycle(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  const auto pages = make_pages(n + 4096, true, 4);
  PageMap m;
  for (size_t k = 0; k < n; ++k) m.set_state(pages[k], PageState::Clean);
  size_t i = n;
  for (auto _ : state) {
    const uint64_t p = pages[i];
    m.set_state(p, PageState::Loading);
    benchmark::DoNotOptimize(m.find(p));
    m.set_state(p, PageState::Clean);
    m.set_state(p, PageState::Absent);
    if (++i == pages.size()) i = n;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_PageMapLoadCycle)->Arg(1 << 10)->Arg(1 << 20);

// --- skip-unchanged comparison ------------------------------------------------

std::vector<char> random_page(size_t n, uint64_t seed) {
  std::vector<char> v(n);
  std::mt19937_64 rng(seed);
  for (auto& c : v) c = static_cast<char>(rng());
  return v;
}

void BM_MemcmpEqual(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  auto a = random_page(n, 1), b = a;
  for (auto _ : state) {
    benchmark::DoNotOptimize(a.data());
    benchmark::DoNotOptimize(b.data());
    benchmark::DoNotOptimize(std::memcmp(a.data(), b.data(), n));
  }
  state.SetBytesProcessed(state.iterations() * n);
}
BENCHMARK(BM_MemcmpEqual)->Arg(4096)->Arg(65536);

void BM_MemcmpDiffersAtEnd(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  auto a = random_page(n, 1), b = a;
  b[n - 1] ^= 1;
  for (auto _ : state) {
    benchmark::DoNotOptimize(a.data());
    benchmark::DoNotOptimize(b.data());
    benchmark::DoNotOptimize(std::memcmp(a.data(), b.data(), n));
  }
  state.SetBytesProcessed(state.iterations() * n);
}
BENCHMARK(BM_MemcmpDiffersAtEnd)->Arg(4096)->Arg(65536);

// File's all_zero(): p[0] == 0 && memcmp(p, p + 1, n - 1) == 0 (src/file.cc).
bool all_zero(const char* p, size_t n) { return n == 0 || (p[0] == 0 && std::memcmp(p, p + 1, n - 1) == 0); }

void BM_AllZero(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::vector<char> z(n, 0);
  bool ok = true;
  for (auto _ : state) {
    benchmark::DoNotOptimize(z.data());
    bool r = all_zero(z.data(), n);
    benchmark::DoNotOptimize(r);
    ok &= r;
  }
  if (!ok) state.SkipWithError("a zero page was not all zero");
  state.SetBytesProcessed(state.iterations() * n);
  state.SetLabel("zero page (full scan)");
}
BENCHMARK(BM_AllZero)->Arg(4096)->Arg(65536);

// A page whose only non-zero byte is the last: the longest scan that answers no.
void BM_AllZeroNonzeroAtEnd(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  std::vector<char> z(n, 0);
  z[n - 1] = 1;
  for (auto _ : state) {
    benchmark::DoNotOptimize(z.data());
    benchmark::DoNotOptimize(all_zero(z.data(), n));
  }
  state.SetBytesProcessed(state.iterations() * n);
}
BENCHMARK(BM_AllZeroNonzeroAtEnd)->Arg(4096)->Arg(65536);

void BM_Xxh3(benchmark::State& state) {
  const size_t n = static_cast<size_t>(state.range(0));
  auto a = random_page(n, 7);
  for (auto _ : state) {
    benchmark::DoNotOptimize(a.data());
    benchmark::DoNotOptimize(XXH3_64bits(a.data(), n));
  }
  state.SetBytesProcessed(state.iterations() * n);
}
BENCHMARK(BM_Xxh3)->Arg(4096)->Arg(65536);

// Arg: 0 memcpy, 1 fd_memory::copy_out.
void BM_CopyFreshPages(benchmark::State& state) {
  constexpr size_t kChunk = 1 << 20, kSpan = 256u << 20;
  const int fd = memfd_create("micro_bench_copy", MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, kSpan) != 0) return state.SkipWithError("memfd");
  char* seg = static_cast<char*>(mmap(nullptr, kSpan, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  if (seg == MAP_FAILED) return state.SkipWithError("mmap");
  deferfs::fd_memory::add(seg, kSpan, fd);
  std::vector<char> src(kChunk, 7), dst(kChunk, 1);
  size_t at = 0;
  for (auto _ : state) {
    state.PauseTiming();
    if (at + kChunk > kSpan) {  // start over with pages never touched in user mode
      fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, kSpan);
      at = 0;
    }
    if (pwrite(fd, src.data(), kChunk, static_cast<off_t>(at)) != static_cast<ssize_t>(kChunk))
      return state.SkipWithError("pwrite");
    state.ResumeTiming();
    if (state.range(0) == 0)
      std::memcpy(dst.data(), seg + at, kChunk);
    else if (deferfs::fd_memory::copy_out(dst.data(), seg + at, kChunk) != static_cast<ssize_t>(kChunk))
      return state.SkipWithError("copy_out");
    benchmark::DoNotOptimize(dst.data());
    at += kChunk;
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * kChunk));
  deferfs::fd_memory::remove(seg);
  munmap(seg, kSpan);
  close(fd);
}
BENCHMARK(BM_CopyFreshPages)->ArgNames({"by_fd"})->Arg(0)->Arg(1);

}  // namespace

BENCHMARK_MAIN();
