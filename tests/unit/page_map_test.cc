// PageMap: the sparse page index -> entry table of one file.
#include "deferfs/page_map.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <vector>

namespace deferfs {
namespace {

using S = PageState;

// Moves `p` to a resident Clean state along allowed transitions.
void make_clean(PageMap& m, uint64_t p) {
  m.set_state(p, S::Loading);
  m.set_state(p, S::Clean);
}

TEST(PageMap, EmptyMapFindsNothing) {
  PageMap m;
  EXPECT_EQ(m.find(0), nullptr);
  EXPECT_EQ(m.find(12345), nullptr);
  EXPECT_EQ(m.state(7), S::Absent);
  EXPECT_EQ(m.entries(), 0u);
  EXPECT_EQ(m.memory_bytes(), 0u) << "an untouched file allocates nothing";
  for (int s = 0; s < kPageStateCount; ++s) EXPECT_EQ(m.count(static_cast<S>(s)), 0u);
  EXPECT_TRUE(m.collect(0, ~uint64_t{0} - 1, [](const PageEntry&) { return true; }).empty());
  // Setting an absent page Absent is a no-op, not an entry.
  EXPECT_EQ(m.set_state(3, S::Absent), nullptr);
  EXPECT_EQ(m.entries(), 0u);
}

TEST(PageMap, SetFindAndStates) {
  PageMap m;
  PageEntry* e = m.set_state(5, S::Loading);
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->state, S::Loading);
  EXPECT_EQ(m.state(5), S::Loading);
  EXPECT_EQ(m.find(5), e);
  EXPECT_EQ(m.find(4), nullptr);
  EXPECT_EQ(m.find(6), nullptr);
  EXPECT_EQ(m.count(S::Loading), 1u);

  m.set_state(5, S::Clean);
  EXPECT_EQ(m.count(S::Loading), 0u);
  EXPECT_EQ(m.count(S::Clean), 1u);
  m.set_state(5, S::Dirty);
  m.set_state(5, S::Writeback);
  EXPECT_EQ(m.count(S::Writeback), 1u);
  EXPECT_EQ(m.count(S::Dirty), 0u);
  EXPECT_EQ(m.entries(), 1u);
  EXPECT_EQ(m.set_state(5, S::Absent), nullptr);
  EXPECT_EQ(m.find(5), nullptr);
  EXPECT_EQ(m.entries(), 0u);
  EXPECT_EQ(m.count(S::Writeback), 0u);
}

TEST(PageMap, HashIsKeptAcrossNonAbsentTransitionsAndResetByAbsent) {
  PageMap m;
  make_clean(m, 9);
  PageEntry* e = m.set_state(9, S::Dirty);
  e->has_base_hash = true;
  e->base_hash = 0xabcdef01;
  e = m.set_state(9, S::Writeback);
  EXPECT_TRUE(e->has_base_hash);
  EXPECT_EQ(e->base_hash, 0xabcdef01u);
  e = m.set_state(9, S::Dirty);
  EXPECT_TRUE(e->has_base_hash);
  EXPECT_EQ(e->base_hash, 0xabcdef01u);
  m.set_state(9, S::Absent);
  e = m.set_state(9, S::Hole);
  EXPECT_FALSE(e->has_base_hash);
  EXPECT_EQ(e->base_hash, 0u);
}

TEST(PageMap, SameStateIsANoOp) {
  PageMap m;
  make_clean(m, 1);
  PageEntry* e = m.set_state(1, S::Clean);
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(m.count(S::Clean), 1u);
  EXPECT_EQ(m.entries(), 1u);
}

TEST(PageMap, SparseIndexes) {
  PageMap m;
  const std::vector<uint64_t> pages = {0, 1, 1000, 1u << 20, uint64_t{1} << 32,
                                       uint64_t{1} << 40, (uint64_t{1} << 52) - 1};
  for (uint64_t p : pages) make_clean(m, p);
  EXPECT_EQ(m.entries(), pages.size());
  EXPECT_EQ(m.count(S::Clean), pages.size());
  for (uint64_t p : pages) {
    ASSERT_NE(m.find(p), nullptr) << p;
    EXPECT_EQ(m.state(p), S::Clean) << p;
    if (std::find(pages.begin(), pages.end(), p + 1) == pages.end()) {
      EXPECT_EQ(m.find(p + 1), nullptr) << p + 1;
    }
  }
  EXPECT_EQ(m.find(uint64_t{1} << 41), nullptr);
  EXPECT_EQ(m.find(2), nullptr);
  // A handful of pages spread over 2^52 allocate the minimum table only.
  EXPECT_LE(m.memory_bytes(), 64u * 16u);
}

TEST(PageMap, HugeIndexesAroundOneTebipage) {
  PageMap m;
  const uint64_t base = uint64_t{1} << 40;
  for (uint64_t i = 0; i < 1000; ++i) m.set_state(base + i * 3, S::Hole);
  EXPECT_EQ(m.count(S::Hole), 1000u);
  for (uint64_t i = 0; i < 3000; ++i)
    EXPECT_EQ(m.state(base + i), i % 3 == 0 ? S::Hole : S::Absent) << i;
  auto got = m.collect(base + 30, base + 60, [](const PageEntry&) { return true; });
  std::vector<uint64_t> want;
  for (uint64_t p = base + 30; p < base + 60; p += 3) want.push_back(p);
  EXPECT_EQ(got, want);
}

TEST(PageMap, DenseRangeAndCounts) {
  PageMap m;
  const uint64_t n = 100000;
  for (uint64_t p = 0; p < n; ++p) {
    make_clean(m, p);
    if (p % 4 == 1) m.set_state(p, S::Dirty);
    if (p % 4 == 2) {
      m.set_state(p, S::Dirty);
      m.set_state(p, S::Writeback);
    }
    if (p % 4 == 3) m.set_state(p, S::Hole);
  }
  EXPECT_EQ(m.entries(), n);
  EXPECT_EQ(m.count(S::Clean), n / 4);
  EXPECT_EQ(m.count(S::Dirty), n / 4);
  EXPECT_EQ(m.count(S::Writeback), n / 4);
  EXPECT_EQ(m.count(S::Hole), n / 4);
  EXPECT_EQ(m.count(S::Loading), 0u);
  for (uint64_t p = 0; p < n; ++p) {
    static const S want[] = {S::Clean, S::Dirty, S::Writeback, S::Hole};
    ASSERT_EQ(m.state(p), want[p % 4]) << p;
  }
  EXPECT_EQ(m.find(n), nullptr);
}

TEST(PageMap, CollectIsSortedFilteredAndHalfOpen) {
  PageMap m;
  std::mt19937_64 rng(7);
  std::vector<uint64_t> dirty;
  for (int i = 0; i < 5000; ++i) {
    uint64_t p = rng() % 1000000;
    if (m.find(p)) continue;
    make_clean(m, p);
    if (rng() % 2) {
      m.set_state(p, S::Dirty);
      dirty.push_back(p);
    }
  }
  std::sort(dirty.begin(), dirty.end());
  auto all_dirty =
      m.collect(0, ~uint64_t{0}, [](const PageEntry& e) { return e.state == S::Dirty; });
  EXPECT_EQ(all_dirty, dirty);

  // [first, last): first included, last excluded.
  ASSERT_GE(dirty.size(), 10u);
  const uint64_t first = dirty[3], last = dirty[8];
  auto mid = m.collect(first, last, [](const PageEntry& e) { return e.state == S::Dirty; });
  EXPECT_EQ(mid, std::vector<uint64_t>(dirty.begin() + 3, dirty.begin() + 8));
  EXPECT_TRUE(m.collect(first, first, [](const PageEntry&) { return true; }).empty());
}

// The randomized model test: thousands of operations against std::map, with
// pages chosen from a small range so probe runs collide and deletions must
// shift members back; after every batch every page is checked.
TEST(PageMap, RandomOpsMatchStdMap) {
  for (uint64_t seed : {1u, 2u, 3u, 4u}) {
    SCOPED_TRACE(seed);
    std::mt19937_64 rng(seed);
    PageMap m;
    std::map<uint64_t, S> model;
    // Two key shapes: a small dense range (many collisions of runs), and
    // keys that are equal modulo large powers of two.
    auto pick = [&]() -> uint64_t {
      switch (rng() % 3) {
        case 0: return rng() % 3000;
        case 1: return (rng() % 64) << 32;
        default: return (uint64_t{1} << 40) + (rng() % 500) * 4096;
      }
    };
    for (int op = 0; op < 40000; ++op) {
      const uint64_t p = pick();
      auto it = model.find(p);
      if (it == model.end()) {
        const S to = (rng() % 2) ? S::Hole : S::Loading;
        ASSERT_NE(m.set_state(p, to), nullptr);
        model[p] = to;
      } else if (rng() % 3 == 0) {
        // Move along an allowed transition that stays present.
        S to = it->second == S::Loading ? S::Clean
               : it->second == S::Hole  ? S::Dirty
               : it->second == S::Dirty ? S::Writeback
                                        : S::Dirty;
        if (it->second == S::Clean) to = S::Dirty;
        if (it->second == S::Writeback) to = S::Clean;
        ASSERT_NE(m.set_state(p, to), nullptr);
        it->second = to;
      } else {
        ASSERT_EQ(m.set_state(p, S::Absent), nullptr);
        model.erase(it);
      }
      if (op % 2000 == 1999) {
        ASSERT_EQ(m.entries(), model.size());
        for (const auto& [page, st] : model) ASSERT_EQ(m.state(page), st) << page;
        for (int k = 0; k < 200; ++k) {
          uint64_t q = pick();
          ASSERT_EQ(m.find(q) != nullptr, model.count(q) == 1) << q;
        }
        uint64_t counted[kPageStateCount] = {};
        for (const auto& [page, st] : model) ++counted[static_cast<int>(st)];
        for (int s = 1; s < kPageStateCount; ++s)
          ASSERT_EQ(m.count(static_cast<S>(s)), counted[s]) << to_string(static_cast<S>(s));
      }
    }
  }
}

// Insert many, delete in random order, verify after each deletion that every
// remaining page is still found (backward shift must not strand a member of
// a probe run behind a gap).
TEST(PageMap, RandomOrderDeletionKeepsTheRestFindable) {
  std::mt19937_64 rng(99);
  PageMap m;
  std::vector<uint64_t> pages;
  for (uint64_t p = 0; p < 4000; ++p) pages.push_back(p * 64);  // same low bits
  for (uint64_t p : pages) make_clean(m, p);
  std::shuffle(pages.begin(), pages.end(), rng);
  for (size_t i = 0; i < pages.size(); ++i) {
    m.set_state(pages[i], S::Absent);
    ASSERT_EQ(m.find(pages[i]), nullptr);
    if (i % 97 == 0 || i + 10 > pages.size()) {
      for (size_t k = i + 1; k < pages.size(); ++k) ASSERT_NE(m.find(pages[k]), nullptr) << k;
    }
  }
  EXPECT_EQ(m.entries(), 0u);
  EXPECT_EQ(m.count(S::Clean), 0u);
}

// Spec 7.1: bookkeeping below 1% of materialized bytes (40 bytes per 4 KiB
// page) plus a small constant. The header promises 16-byte slots at 7/16 to
// 7/8 load, ~37 bytes per entry.
TEST(PageMap, MemoryPerEntryStaysUnderOnePercentWhileGrowing) {
  PageMap m;
  std::mt19937_64 rng(5);
  uint64_t n = 0;
  for (uint64_t target : {64u, 100u, 1000u, 4096u, 10000u, 65536u, 100000u, 500000u}) {
    while (n < target) {
      uint64_t p = rng() >> 12;
      if (m.find(p)) continue;
      make_clean(m, p);
      ++n;
    }
    EXPECT_LE(m.memory_bytes(), 40 * n) << n << " entries use " << m.memory_bytes() << " bytes";
  }
  // Every growth step, not only the sampled ones.
  PageMap d;
  for (uint64_t p = 0; p < 300000; ++p) {
    make_clean(d, p);
    if (p + 1 >= 64) {
      ASSERT_LE(d.memory_bytes(), 40 * (p + 1)) << p + 1 << " entries";
    }
  }
}

// After most entries are removed (eviction, truncate) the map must not keep
// the memory of its peak: the header says the table "stays between 7/16 and
// 7/8 full", and spec 7.1 bounds bookkeeping by materialized bytes.
TEST(PageMap, MemoryFollowsEntriesDownAfterMassRemoval) {
  PageMap m;
  const uint64_t n = 200000;
  for (uint64_t p = 0; p < n; ++p) make_clean(m, p);
  const uint64_t peak = m.memory_bytes();
  for (uint64_t p = 0; p < n - 100; ++p) m.set_state(p, S::Absent);
  EXPECT_EQ(m.entries(), 100u);
  for (uint64_t p = n - 100; p < n; ++p) ASSERT_EQ(m.state(p), S::Clean);
  EXPECT_LE(m.memory_bytes(), 40u * 100u + 64u * 16u)
      << "100 entries keep " << m.memory_bytes() << " bytes (peak " << peak << ")";
}

TEST(PageMap, ClearFreesEverything) {
  PageMap m;
  for (uint64_t p = 0; p < 1000; ++p) make_clean(m, p);
  m.clear();
  EXPECT_EQ(m.entries(), 0u);
  EXPECT_EQ(m.memory_bytes(), 0u);
  EXPECT_EQ(m.count(S::Clean), 0u);
  EXPECT_EQ(m.find(5), nullptr);
  make_clean(m, 5);  // usable again
  EXPECT_EQ(m.state(5), S::Clean);
}

TEST(PageMapDeath, ForbiddenTransitionThroughSetStateAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  PageMap m;
  EXPECT_DEATH(m.set_state(1, S::Writeback), "Absent -> Writeback is not allowed");
  make_clean(m, 2);
  EXPECT_DEATH(m.set_state(2, S::Loading), "Clean -> Loading is not allowed");
}

}  // namespace
}  // namespace deferfs
