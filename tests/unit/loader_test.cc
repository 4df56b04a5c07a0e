// The loader's File-free parts: the waiter list wakes only the requests
// whose pages settled; the readahead window grows on sequential reads,
// resets on a seek and never reaches past its limit.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "deferfs/loader.h"

namespace deferfs {
namespace {

// Spins (yielding) until `cond` holds; the test's own bound is meson's timeout.
template <typename F>
void until(F cond) {
  while (!cond()) std::this_thread::yield();
}

TEST(LoadWaiters, WakesOnlyTheWaitersOfTheSettledPages) {
  Mutex mu;
  LoadWaiters waiters;
  std::atomic<int> low_done{0}, high_done{0};
  auto waiter = [&](uint64_t first, uint64_t last, std::atomic<int>& done) {
    MutexLock lk(mu);
    waiters.wait(mu, first, last);
    done = 1;
  };
  std::thread low(waiter, 0, 4, std::ref(low_done));
  std::thread high(waiter, 100, 104, std::ref(high_done));
  until([&] {
    MutexLock lk(mu);
    return waiters.waiting() == 2;
  });
  {
    MutexLock lk(mu);
    waiters.wake({4, 50, 99});  // none of them waits for these
    EXPECT_EQ(waiters.waiting(), 2u);
    waiters.wake({2, 3});  // the low waiter's pages
    EXPECT_EQ(waiters.waiting(), 1u);  // unlinked at once, under the lock
  }
  low.join();
  EXPECT_EQ(low_done, 1);
  EXPECT_EQ(high_done, 0);
  {
    MutexLock lk(mu);
    waiters.wake({103});
    EXPECT_EQ(waiters.waiting(), 0u);
  }
  high.join();
  EXPECT_EQ(high_done, 1);
}

TEST(LoadWaiters, OneSettledRunWakesEveryWaiterOfIt) {
  Mutex mu;
  LoadWaiters waiters;
  std::atomic<int> done{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 3; ++i)
    threads.emplace_back([&, i] {
      MutexLock lk(mu);
      waiters.wait(mu, 10 + i, 11 + i);
      ++done;
    });
  until([&] {
    MutexLock lk(mu);
    return waiters.waiting() == 3;
  });
  {
    MutexLock lk(mu);
    waiters.wake({10, 11, 12});
    EXPECT_EQ(waiters.waiting(), 0u);
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(done, 3);
}

TEST(Readahead, GrowsOnSequentialReadsAndResetsOnASeek) {
  Readahead ra;
  ra.set_max(1 << 20);
  const uint64_t k = 1024;
  // The first read is not known to be sequential: nothing ahead.
  auto [a0, b0] = ra.follow(0, 64 * k, ~uint64_t{0});
  EXPECT_GE(a0, b0);
  // Sequential: 128 KiB past the read, then the window doubles.
  auto [a1, b1] = ra.follow(64 * k, 64 * k, ~uint64_t{0});
  EXPECT_EQ(a1, 128 * k);
  EXPECT_EQ(b1, 256 * k);
  auto [a2, b2] = ra.follow(128 * k, 64 * k, ~uint64_t{0});
  EXPECT_EQ(a2, 256 * k);  // what was handed out is not handed out again
  EXPECT_EQ(b2, 192 * k + 256 * k);
  // A seek resets the window.
  auto [a3, b3] = ra.follow(10 << 20, 64 * k, ~uint64_t{0});
  EXPECT_GE(a3, b3);
  // The window never reaches past the limit (the cut).
  auto [a4, b4] = ra.follow((10 << 20) + 64 * k, 64 * k, (10 << 20) + 160 * k);
  EXPECT_EQ(a4, (10 << 20) + 128 * k);
  EXPECT_EQ(b4, (10 << 20) + 160 * k);
}

TEST(Readahead, CappedAndOffWithoutAMax) {
  Readahead ra;
  ra.set_max(256 * 1024);
  uint64_t off = 0;
  uint64_t last_window = 0;
  for (int i = 0; i < 8; ++i, off += 4096) {
    auto [a, b] = ra.follow(off, 4096, ~uint64_t{0});
    if (b > a) last_window = b - (off + 4096);
  }
  EXPECT_LE(last_window, 256u * 1024);
  Readahead none;  // max 0: never anything ahead
  for (uint64_t o = 0; o < 10 * 4096; o += 4096) {
    auto [a, b] = none.follow(o, 4096, ~uint64_t{0});
    EXPECT_GE(a, b);
  }
}

}  // namespace
}  // namespace deferfs
