// File: one file's snapshot (segment + page map + source), without the
// kernel. The source is a FakeSource holding the page-numbered pattern, so
// every byte read names the page it came from, and its counters say exactly
// what the core asked of the source.
#include "deferfs/file.h"

#include <gtest/gtest.h>
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "fake_source.h"

namespace deferfs {
namespace {

using namespace std::chrono_literals;
using testing::FakeSource;
using testing::kPage;
using testing::make_file;
using testing::page_number_at;
using testing::pattern_bytes;
using testing::read_bytes;
using testing::read_or_fail;

std::vector<char> zeros(size_t n) { return std::vector<char>(n, 0); }
std::vector<char> concat(std::vector<char> a, const std::vector<char>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}
ssize_t write_vec(File& f, const std::vector<char>& v, uint64_t off) {
  return f.write(v.data(), v.size(), off);
}
// How long a thread that should be blocked gets to prove it is not.
constexpr auto kSettle = 100ms;

class FileTest : public ::testing::Test {
 protected:
  // A file of `pages` pages (plus `extra` bytes) of the pattern.
  void open_numbered(uint64_t pages, uint64_t extra = 0) {
    auto fw = make_file(FakeSource::numbered(pages * kPage + extra), counters);
    fake = fw.fake;
    file = fw.file;
  }
  void open_with(std::unique_ptr<FakeSource> src) {
    auto fw = make_file(std::move(src), counters);
    fake = fw.fake;
    file = fw.file;
  }
  // What an observer (status, stats) sees: pages a write may have left
  // equal to the snapshot are settled first, as the daemon does.
  File::Info info() {
    file->settle_pending();
    return file->info();
  }

  Counters counters;
  FakeSource* fake = nullptr;
  std::shared_ptr<File> file;
};

// ---------------------------------------------------------------- reading

TEST_F(FileTest, OpeningDoesNoIo) {
  open_numbered(16384);  // 64 MiB
  EXPECT_EQ(fake->stats().reads, 0u);
  EXPECT_EQ(info().size, 16384 * kPage);
  EXPECT_EQ(info().resident_pages, 0u);
  EXPECT_FALSE(file->has_staged());
  EXPECT_EQ(counters.loaded_bytes.load(), 0u);
}

TEST_F(FileTest, ReadsReturnThePagesOwnBytes) {
  open_numbered(16);
  for (uint64_t p : {0u, 5u, 15u, 1u}) {
    auto got = read_or_fail(*file, p * kPage, kPage);
    EXPECT_EQ(got, pattern_bytes(p * kPage, kPage)) << "page " << p;
    EXPECT_EQ(page_number_at(got.data()), p);
  }
  // Unaligned, across a page boundary.
  EXPECT_EQ(read_or_fail(*file, 3 * kPage - 10, 20), pattern_bytes(3 * kPage - 10, 20));
  // The whole file in one read.
  EXPECT_EQ(read_or_fail(*file, 0, 16 * kPage), pattern_bytes(0, 16 * kPage));
}

TEST_F(FileTest, ReadsLoadOnlyTouchedPages) {
  open_numbered(1024);
  read_or_fail(*file, 100 * kPage, kPage);
  EXPECT_EQ(fake->stats().reads, 1u);
  EXPECT_EQ(fake->stats().bytes_read, kPage);
  EXPECT_EQ(info().resident_pages, 1u);
  EXPECT_EQ(counters.loaded_bytes.load(), kPage);

  // Again: served from the segment.
  read_or_fail(*file, 100 * kPage + 10, 100);
  EXPECT_EQ(fake->stats().reads, 1u);

  // Three consecutive pages: one read of three pages.
  read_or_fail(*file, 500 * kPage, 3 * kPage);
  EXPECT_EQ(fake->stats().reads, 2u);
  EXPECT_EQ(fake->stats().bytes_read, 4 * kPage);
  EXPECT_EQ(info().resident_pages, 4u);

  // 20 bytes straddling pages 700 and 701 load exactly those two.
  read_or_fail(*file, 701 * kPage - 10, 20);
  EXPECT_EQ(info().resident_pages, 6u);
  auto log = fake->read_log();
  ASSERT_EQ(log.size(), 3u);
  EXPECT_EQ(log[0], (testing::IoCall{100 * kPage, kPage}));
  EXPECT_EQ(log[1], (testing::IoCall{500 * kPage, 3 * kPage}));
  EXPECT_EQ(log[2], (testing::IoCall{700 * kPage, 2 * kPage}));
  // Bookkeeping stays tiny for a few pages of a big file (spec 7.1).
  EXPECT_LE(info().map_bytes, 64u * 16u);
}

// read_into (the copy the FUSE layer replies from) sees what read sees.
TEST_F(FileTest, ReadIntoCopiesTheSameBytes) {
  auto src = FakeSource::numbered(8 * kPage + 300);
  src->add_hole(2 * kPage, kPage);
  open_with(std::move(src));
  ASSERT_EQ(file->write("xyz", 3, 5 * kPage + 1), 3);
  const uint64_t size = 8 * kPage + 300;
  std::vector<char> buf(size + 1000, 'U');
  ASSERT_EQ(file->read_into(0, size + 1000, buf.data()), static_cast<ssize_t>(size));
  buf.resize(size);
  EXPECT_EQ(buf, read_or_fail(*file, 0, size));
  std::vector<char> tail(100, 'U');
  EXPECT_EQ(file->read_into(size - 50, 100, tail.data()), 50);
  EXPECT_EQ(std::vector<char>(tail.begin(), tail.begin() + 50), pattern_bytes(size - 50, 50));
  EXPECT_EQ(file->read_into(size, 10, tail.data()), 0);
}

TEST_F(FileTest, ReadAtAndPastTheEnd) {
  open_numbered(2, 1000);  // 9192 bytes
  std::vector<char> out;
  EXPECT_EQ(read_bytes(*file, 2 * kPage, kPage, out), 1000);
  EXPECT_EQ(out, pattern_bytes(2 * kPage, 1000));
  EXPECT_EQ(read_bytes(*file, 2 * kPage + 1000, 10, out), 0);
  EXPECT_EQ(read_bytes(*file, 100 * kPage, 10, out), 0);
  EXPECT_EQ(read_bytes(*file, 0, 0, out), 0);
}

TEST_F(FileTest, HolesReadAsZerosWithoutReadingOrMaterializing) {
  auto src = FakeSource::numbered(8 * kPage);
  src->add_hole(2 * kPage, 3 * kPage);  // pages 2, 3, 4
  open_with(std::move(src));

  EXPECT_EQ(read_or_fail(*file, 3 * kPage, kPage), zeros(kPage));
  EXPECT_EQ(fake->stats().reads, 0u) << "a hole is never read";
  EXPECT_EQ(info().resident_pages, 0u) << "a hole is never materialized";

  auto want = pattern_bytes(0, 8 * kPage);
  std::memset(want.data() + 2 * kPage, 0, 3 * kPage);
  EXPECT_EQ(read_or_fail(*file, 0, 8 * kPage), want);
  EXPECT_EQ(fake->stats().reads, 2u);  // [0,2) and [5,8)
  EXPECT_EQ(fake->stats().bytes_read, 5 * kPage);
  EXPECT_EQ(info().resident_pages, 5u);
  for (const auto& call : fake->read_log())
    EXPECT_TRUE(call.off + call.len <= 2 * kPage || call.off >= 5 * kPage)
        << "read of [" << call.off << ", " << call.off + call.len << ") touches the hole";
}

// A sparse tail on a file whose size is not page-aligned (what `truncate -s`
// makes): the last, partial page is a hole too (spec 4.4).
TEST_F(FileTest, HoleInThePartialLastPageIsNotMaterialized) {
  auto src = FakeSource::numbered(2 * kPage + 1000);
  src->add_hole(kPage, kPage + 1000);  // pages 1 and 2 (2 is partial): hole to EOF
  open_with(std::move(src));
  EXPECT_EQ(read_or_fail(*file, kPage, kPage + 1000), zeros(kPage + 1000));
  EXPECT_EQ(fake->stats().reads, 0u);
  EXPECT_EQ(info().resident_pages, 0u);
}

TEST_F(FileTest, WhollySparseFileIsNeverRead) {
  auto src = std::make_unique<FakeSource>(std::vector<char>(10000, 0));
  src->add_hole(0, 10000);
  open_with(std::move(src));
  EXPECT_EQ(read_or_fail(*file, 0, 10000), zeros(10000));
  EXPECT_EQ(fake->stats().reads, 0u);
  EXPECT_EQ(info().resident_pages, 0u);
}

TEST_F(FileTest, ReadErrorIsReturnedAndNotSticky) {
  open_numbered(4);
  fake->fail_reads(EIO);
  std::vector<char> out;
  EXPECT_EQ(read_bytes(*file, kPage, kPage, out), -EIO);
  EXPECT_EQ(info().resident_pages, 0u);
  EXPECT_EQ(read_or_fail(*file, kPage, kPage), pattern_bytes(kPage, kPage));
  EXPECT_EQ(info().resident_pages, 1u);
}

// ---------------------------------------------------------------- interleavings

// Spec 4.3: two clients faulting the same page at once cause one load.
TEST_F(FileTest, ConcurrentFaultsOnOnePageMergeIntoOneLoad) {
  open_numbered(16);
  fake->gate_on();
  auto first = std::async(std::launch::async, [&] { return read_or_fail(*file, 7 * kPage, kPage); });
  ASSERT_TRUE(fake->wait_blocked(1));
  std::vector<std::future<std::vector<char>>> others;
  for (int i = 0; i < 3; ++i)
    others.push_back(std::async(std::launch::async, [&, i] {
      return read_or_fail(*file, 7 * kPage + 100 * i, kPage - 100 * i);
    }));
  // They cannot finish before the one load does, and they start no load.
  for (auto& f : others) EXPECT_EQ(f.wait_for(kSettle), std::future_status::timeout);
  EXPECT_EQ(fake->stats().reads, 1u);
  EXPECT_EQ(fake->blocked(), 1u);
  fake->gate_off();
  EXPECT_EQ(first.get(), pattern_bytes(7 * kPage, kPage));
  for (int i = 0; i < 3; ++i)
    EXPECT_EQ(others[i].get(), pattern_bytes(7 * kPage + 100 * i, kPage - 100 * i));
  EXPECT_EQ(fake->stats().reads, 1u) << "merged faults: exactly one source read";
  EXPECT_EQ(counters.loaded_bytes.load(), kPage);
  EXPECT_EQ(info().resident_pages, 1u);
}

// Spec 4.3: loading never holds a lock that another page's read needs.
TEST_F(FileTest, ReadOfAnotherPageDoesNotWaitForAGatedLoad) {
  open_numbered(16);
  fake->gate_on(7 * kPage, kPage);  // only page 7's load is held
  auto blocked = std::async(std::launch::async, [&] { return read_or_fail(*file, 7 * kPage, kPage); });
  ASSERT_TRUE(fake->wait_blocked(1));

  auto other = std::async(std::launch::async, [&] { return read_or_fail(*file, 3 * kPage, kPage); });
  ASSERT_EQ(other.wait_for(5s), std::future_status::ready)
      << "a read of page 3 waited for the load of page 7";
  EXPECT_EQ(other.get(), pattern_bytes(3 * kPage, kPage));

  // Writes to other pages, size queries and reads of resident pages go on too.
  auto writer = std::async(std::launch::async, [&] {
    auto buf = testing::filled(kPage, 'w');
    return file->write(buf.data(), buf.size(), 4 * kPage);
  });
  ASSERT_EQ(writer.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(writer.get(), static_cast<ssize_t>(kPage));
  auto stat = std::async(std::launch::async, [&] { return file->info().size; });
  ASSERT_EQ(stat.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(stat.get(), 16 * kPage);

  EXPECT_EQ(blocked.wait_for(0s), std::future_status::timeout);
  fake->gate_off();
  EXPECT_EQ(blocked.get(), pattern_bytes(7 * kPage, kPage));
}

// Invariant I5: only the loader writes a Loading page's bytes; a write to it
// waits for the load and then wins. (The reader copies with read_into, under
// the lock: read()'s iovecs point into the segment, and a write after the
// read returned would show through them.)
TEST_F(FileTest, WriteToAPageBeingLoadedWaitsAndThenWins) {
  open_numbered(16);
  fake->gate_on(7 * kPage, kPage);
  auto reader = std::async(std::launch::async, [&] {
    std::vector<char> out(kPage);
    EXPECT_EQ(file->read_into(7 * kPage, kPage, out.data()), static_cast<ssize_t>(kPage));
    return out;
  });
  ASSERT_TRUE(fake->wait_blocked(1));
  auto w = testing::filled(kPage, 'W');
  auto writer = std::async(std::launch::async, [&] { return write_vec(*file, w, 7 * kPage); });
  EXPECT_EQ(writer.wait_for(kSettle), std::future_status::timeout);
  fake->gate_off();
  EXPECT_EQ(reader.get(), pattern_bytes(7 * kPage, kPage));
  EXPECT_EQ(writer.get(), static_cast<ssize_t>(kPage));
  EXPECT_EQ(read_or_fail(*file, 7 * kPage, kPage), w);
  EXPECT_EQ(info().dirty_pages, 1u);
}

// Spec 5.2: a load that raced with an outside change is not trusted. The
// fake hands the loader the old bytes and then the source changes before the
// load completes; the reader must get the new bytes (nothing staged:
// re-snapshot), never the stale ones.
TEST_F(FileTest, LoadRacingAnOutsideChangeIsNotServedStale) {
  open_numbered(8);
  fake->gate_on(3 * kPage, kPage, /*after_copy=*/true);
  auto reader = std::async(std::launch::async, [&] { return read_or_fail(*file, 3 * kPage, kPage); });
  ASSERT_TRUE(fake->wait_blocked(1));
  fake->outside_write(3 * kPage, testing::filled(kPage, 'N'));
  fake->gate_off();
  EXPECT_EQ(reader.get(), testing::filled(kPage, 'N'));
  EXPECT_EQ(read_or_fail(*file, 3 * kPage, kPage), testing::filled(kPage, 'N'));
}

TEST_F(FileTest, LoadRacingAnOutsideChangeWithStagedPagesFailsWithEio) {
  open_numbered(8);
  ASSERT_EQ(write_vec(*file, testing::filled(kPage, 'W'), 0), static_cast<ssize_t>(kPage));
  fake->gate_on(3 * kPage, kPage, /*after_copy=*/true);
  auto reader = std::async(std::launch::async, [&] {
    std::vector<char> out;
    return read_bytes(*file, 3 * kPage, kPage, out);
  });
  ASSERT_TRUE(fake->wait_blocked(1));
  fake->outside_write(3 * kPage, testing::filled(kPage, 'N'));
  fake->gate_off();
  EXPECT_EQ(reader.get(), -EIO);
  EXPECT_TRUE(file->in_conflict());
  EXPECT_EQ(info().resident_pages, 1u) << "the stale page must not stay resident";
  EXPECT_EQ(read_or_fail(*file, 0, kPage), testing::filled(kPage, 'W'));
}

// A load that fails wakes its waiters; they retry and load the page themselves.
TEST_F(FileTest, WaitersRetryAfterAFailedLoad) {
  open_numbered(8);
  fake->gate_on();
  auto first = std::async(std::launch::async, [&] {
    std::vector<char> out;
    return read_bytes(*file, 3 * kPage, kPage, out);
  });
  ASSERT_TRUE(fake->wait_blocked(1));
  auto second = std::async(std::launch::async, [&] { return read_or_fail(*file, 3 * kPage, kPage); });
  EXPECT_EQ(second.wait_for(kSettle), std::future_status::timeout);
  fake->fail_reads(EIO, 1);  // the held load fails when it goes on
  fake->gate_off();
  EXPECT_EQ(first.get(), -EIO);
  EXPECT_EQ(second.get(), pattern_bytes(3 * kPage, kPage));
  EXPECT_EQ(fake->stats().reads, 2u);
  EXPECT_EQ(info().resident_pages, 1u);
}

// A truncate that cuts a page while it is being loaded: the load's bytes are
// thrown away (LoadingInvalidated) and the cut page reads as zeros after an
// extend.
TEST_F(FileTest, TruncateDuringALoadThrowsTheLoadAway) {
  open_numbered(8);
  fake->gate_on(6 * kPage, kPage);
  auto reader = std::async(std::launch::async, [&] {
    std::vector<char> out;
    ssize_t n = read_bytes(*file, 6 * kPage, kPage, out);
    return std::make_pair(n, out);
  });
  ASSERT_TRUE(fake->wait_blocked(1));
  auto cutter = std::async(std::launch::async, [&] {
    int rc = file->truncate(2 * kPage);
    if (rc == 0) rc = file->truncate(8 * kPage);
    return rc;
  });
  ASSERT_EQ(cutter.wait_for(5s), std::future_status::ready) << "truncate waited for a load";
  EXPECT_EQ(cutter.get(), 0);
  fake->gate_off();
  auto [n, out] = reader.get();
  // The reader either saw the file before the cut (the page's bytes) or
  // after it (zeros); never anything else.
  ASSERT_EQ(n, static_cast<ssize_t>(kPage));
  EXPECT_TRUE(out == zeros(kPage) || out == pattern_bytes(6 * kPage, kPage));
  EXPECT_EQ(read_or_fail(*file, 6 * kPage, kPage), zeros(kPage));
  EXPECT_EQ(read_or_fail(*file, 0, 2 * kPage), pattern_bytes(0, 2 * kPage));
  EXPECT_EQ(info().resident_pages, 2u) << "pages 0 and 1; the invalidated load left nothing";
}

// The source shrank from outside while a page past its new end was loading:
// with nothing staged the file is re-snapshotted and the read sees the new end.
TEST_F(FileTest, LoadRacingAnOutsideShrinkSeesTheNewEnd) {
  open_numbered(8);
  fake->gate_on(6 * kPage, kPage);
  auto reader = std::async(std::launch::async, [&] {
    std::vector<char> out;
    return read_bytes(*file, 6 * kPage, kPage, out);
  });
  ASSERT_TRUE(fake->wait_blocked(1));
  fake->outside_truncate(2 * kPage);
  fake->gate_off();
  ASSERT_EQ(reader.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(reader.get(), 0);
  EXPECT_EQ(info().size, 2 * kPage);
}

// ---------------------------------------------------------------- writing

TEST_F(FileTest, WriteOfEqualBytesToAResidentPageIsSkipped) {
  open_numbered(8);
  read_or_fail(*file, 2 * kPage, kPage);
  const auto before = fake->stats().reads;
  EXPECT_EQ(write_vec(*file, pattern_bytes(2 * kPage, kPage), 2 * kPage),
            static_cast<ssize_t>(kPage));
  EXPECT_EQ(counters.skipped_pages.load(), 1u);
  EXPECT_EQ(info().dirty_pages, 0u);
  EXPECT_FALSE(file->has_staged());
  EXPECT_EQ(fake->stats().reads, before) << "a resident page is compared in memory";
  // A partial write of equal bytes too.
  EXPECT_EQ(write_vec(*file, pattern_bytes(2 * kPage + 10, 50), 2 * kPage + 10), 50);
  EXPECT_EQ(counters.skipped_pages.load(), 2u);
  EXPECT_EQ(info().dirty_pages, 0u);
}

TEST_F(FileTest, WriteOfEqualBytesToAnAbsentPageLeavesItClean) {
  open_numbered(8);
  // Full page: compared with the source after the copy.
  EXPECT_EQ(write_vec(*file, pattern_bytes(3 * kPage, kPage), 3 * kPage),
            static_cast<ssize_t>(kPage));
  EXPECT_EQ(info().dirty_pages, 0u);
  EXPECT_EQ(counters.skipped_pages.load(), 1u);
  // Partial: the page is loaded first and compared in memory.
  EXPECT_EQ(write_vec(*file, pattern_bytes(4 * kPage + 50, 100), 4 * kPage + 50), 100);
  EXPECT_EQ(info().dirty_pages, 0u);
  EXPECT_EQ(counters.skipped_pages.load(), 2u);
  EXPECT_FALSE(file->has_staged());
  EXPECT_EQ(read_or_fail(*file, 0, 8 * kPage), pattern_bytes(0, 8 * kPage));
}

TEST_F(FileTest, WriteThenRestoreMakesThePageCleanAgain) {
  open_numbered(8);
  // Partial write on page 1, then the old bytes back.
  const auto x = testing::filled(100, 'x');
  EXPECT_EQ(write_vec(*file, x, kPage + 10), 100);
  EXPECT_EQ(info().dirty_pages, 1u);
  EXPECT_TRUE(file->has_staged());
  auto want = pattern_bytes(kPage, kPage);
  std::memset(want.data() + 10, 'x', 100);
  EXPECT_EQ(read_or_fail(*file, kPage, kPage), want);
  EXPECT_EQ(write_vec(*file, pattern_bytes(kPage + 10, 100), kPage + 10), 100);
  EXPECT_EQ(info().dirty_pages, 0u);
  EXPECT_FALSE(file->has_staged());

  // Full page on an absent page, then restored in two halves.
  EXPECT_EQ(write_vec(*file, testing::filled(kPage, 'A'), 5 * kPage), static_cast<ssize_t>(kPage));
  EXPECT_EQ(info().dirty_pages, 1u);
  EXPECT_EQ(write_vec(*file, pattern_bytes(5 * kPage, kPage / 2), 5 * kPage),
            static_cast<ssize_t>(kPage / 2));
  EXPECT_EQ(info().dirty_pages, 1u);  // half restored: still different
  EXPECT_EQ(write_vec(*file, pattern_bytes(5 * kPage + kPage / 2, kPage / 2), 5 * kPage + kPage / 2),
            static_cast<ssize_t>(kPage / 2));
  EXPECT_EQ(info().dirty_pages, 0u);
  EXPECT_FALSE(file->has_staged());
  EXPECT_EQ(read_or_fail(*file, 0, 8 * kPage), pattern_bytes(0, 8 * kPage));
}

TEST_F(FileTest, PartialWritesKeepTheOtherBytesOfThePage) {
  open_numbered(8);
  const std::string hello = "hello";
  EXPECT_EQ(file->write(hello.data(), hello.size(), kPage + 1000), 5);
  auto want = pattern_bytes(0, 8 * kPage);
  std::memcpy(want.data() + kPage + 1000, hello.data(), 5);
  // Straddling pages 2 and 3.
  EXPECT_EQ(file->write(hello.data(), hello.size(), 3 * kPage - 2), 5);
  std::memcpy(want.data() + 3 * kPage - 2, hello.data(), 5);
  EXPECT_EQ(read_or_fail(*file, 0, 8 * kPage), want);
  EXPECT_EQ(info().dirty_pages, 3u);
  EXPECT_EQ(info().size, 8 * kPage);
}

TEST_F(FileTest, WritesIntoHoles) {
  auto src = FakeSource::numbered(4 * kPage);
  src->add_hole(kPage, 2 * kPage);  // pages 1, 2
  open_with(std::move(src));
  // Zeros into a hole change nothing.
  EXPECT_EQ(write_vec(*file, zeros(kPage), kPage), static_cast<ssize_t>(kPage));
  EXPECT_EQ(write_vec(*file, zeros(10), 2 * kPage + 5), 10);
  EXPECT_EQ(info().dirty_pages, 0u);
  EXPECT_FALSE(file->has_staged());
  // A partial write into a hole: the rest of the page stays zero.
  EXPECT_EQ(write_vec(*file, testing::filled(10, 'h'), 2 * kPage + 5), 10);
  auto want = pattern_bytes(0, 4 * kPage);
  std::memset(want.data() + kPage, 0, 2 * kPage);
  std::memset(want.data() + 2 * kPage + 5, 'h', 10);
  EXPECT_EQ(read_or_fail(*file, 0, 4 * kPage), want);
  EXPECT_EQ(info().dirty_pages, 1u);
  // Zeros again restore the hole's content: Clean again.
  EXPECT_EQ(write_vec(*file, zeros(10), 2 * kPage + 5), 10);
  EXPECT_EQ(info().dirty_pages, 0u);
  EXPECT_FALSE(file->has_staged());
}

TEST_F(FileTest, WritePastTheEndExtends) {
  open_numbered(2);
  EXPECT_EQ(file->write("abc", 3, 5 * kPage + 7), 3);
  EXPECT_EQ(info().size, 5 * kPage + 10);
  auto want = concat(pattern_bytes(0, 2 * kPage), zeros(3 * kPage + 10));
  std::memcpy(want.data() + 5 * kPage + 7, "abc", 3);
  EXPECT_EQ(read_or_fail(*file, 0, 5 * kPage + 10), want);
  EXPECT_TRUE(file->has_staged());
  EXPECT_EQ(info().dirty_pages, 1u);
  EXPECT_EQ(fake->stats().bytes_read, 2 * kPage) << "only the source's pages are read";
}

// ---------------------------------------------------------------- truncate

// What `cp` does to an existing destination: O_TRUNC, then the same bytes in
// chunks. Nothing is left to commit.
TEST_F(FileTest, TruncateToZeroThenRewritingTheSameBytesLeavesNothingStaged) {
  for (bool read_first : {false, true})
    for (size_t chunk : {size_t{128 * 1024}, size_t{10000}, size_t{4097}}) {
      SCOPED_TRACE("read_first=" + std::to_string(read_first) + " chunk=" + std::to_string(chunk));
      open_numbered(40, 123);
      const uint64_t size = 40 * kPage + 123;
      const auto content = pattern_bytes(0, size);
      if (read_first) read_or_fail(*file, 0, size);
      ASSERT_EQ(file->truncate(0), 0);
      EXPECT_EQ(info().size, 0u);
      EXPECT_TRUE(file->has_staged());
      for (uint64_t off = 0; off < size; off += chunk) {
        size_t n = static_cast<size_t>(std::min<uint64_t>(chunk, size - off));
        ASSERT_EQ(file->write(content.data() + off, n, off), static_cast<ssize_t>(n));
      }
      EXPECT_EQ(info().size, size);
      EXPECT_EQ(info().dirty_pages, 0u);
      EXPECT_FALSE(file->has_staged());
      EXPECT_EQ(read_or_fail(*file, 0, size), content);
    }
}

TEST_F(FileTest, TruncateShrinkThenExtendShowsZerosPastTheOldEnd) {
  open_numbered(4);
  ASSERT_EQ(file->truncate(5000), 0);
  EXPECT_EQ(info().size, 5000u);
  EXPECT_TRUE(file->has_staged());
  std::vector<char> out;
  EXPECT_EQ(read_bytes(*file, 0, 4 * kPage, out), 5000);
  EXPECT_EQ(out, pattern_bytes(0, 5000));
  EXPECT_EQ(read_bytes(*file, 5000, 10, out), 0);

  ASSERT_EQ(file->truncate(4 * kPage), 0);
  EXPECT_EQ(info().size, 4 * kPage);
  EXPECT_EQ(read_or_fail(*file, 0, 4 * kPage),
            concat(pattern_bytes(0, 5000), zeros(4 * kPage - 5000)));
  EXPECT_TRUE(file->has_staged()) << "bytes 5000.. are zeros now, not the source's";
  for (const auto& call : fake->read_log())
    EXPECT_LE(call.off + call.len, 2 * kPage) << "cut pages are never loaded";
}

TEST_F(FileTest, TruncateToAPageBoundaryAndExtendByWrite) {
  open_numbered(4);
  ASSERT_EQ(file->truncate(2 * kPage), 0);
  EXPECT_EQ(fake->stats().reads, 0u) << "an aligned cut needs no page";
  EXPECT_EQ(file->write("z", 1, 3 * kPage), 1);
  EXPECT_EQ(info().size, 3 * kPage + 1);
  auto want = concat(pattern_bytes(0, 2 * kPage), zeros(kPage + 1));
  want.back() = 'z';
  EXPECT_EQ(read_or_fail(*file, 0, 3 * kPage + 1), want);
}

TEST_F(FileTest, TruncateExtendOnlyChangesTheStagedSize) {
  open_numbered(2, 100);
  ASSERT_EQ(file->truncate(10 * kPage), 0);
  EXPECT_EQ(info().size, 10 * kPage);
  EXPECT_TRUE(file->has_staged());
  EXPECT_EQ(read_or_fail(*file, 0, 10 * kPage),
            concat(pattern_bytes(0, 2 * kPage + 100), zeros(8 * kPage - 100)));
  // Back to the snapshot's size: nothing staged any more.
  ASSERT_EQ(file->truncate(2 * kPage + 100), 0);
  EXPECT_FALSE(file->has_staged());
  EXPECT_EQ(read_or_fail(*file, 0, 2 * kPage + 100), pattern_bytes(0, 2 * kPage + 100));
}

// ---------------------------------------------------------------- snapshots

TEST_F(FileTest, OutsideChangeWithNothingStagedResnapshots) {
  open_numbered(8);
  int invalidations = 0;
  file->set_invalidate_hook([&] { ++invalidations; });
  read_or_fail(*file, 0, 2 * kPage);
  EXPECT_EQ(file->revalidate(), File::Validity::Unchanged);

  fake->outside_write(0, testing::filled(kPage, 'N'));
  EXPECT_EQ(file->revalidate(), File::Validity::Resnapshotted);
  EXPECT_EQ(invalidations, 1);
  EXPECT_EQ(read_or_fail(*file, 0, 2 * kPage),
            concat(testing::filled(kPage, 'N'), pattern_bytes(kPage, kPage)));
  EXPECT_EQ(file->revalidate(), File::Validity::Unchanged);

  // A size change from outside.
  fake->outside_truncate(3 * kPage);
  EXPECT_EQ(file->revalidate(), File::Validity::Resnapshotted);
  EXPECT_EQ(info().size, 3 * kPage);
  std::vector<char> out;
  EXPECT_EQ(read_bytes(*file, 0, 8 * kPage, out), static_cast<ssize_t>(3 * kPage));
  fake->outside_write(3 * kPage, testing::filled(kPage, 'M'));
  EXPECT_EQ(file->revalidate(), File::Validity::Resnapshotted);
  EXPECT_EQ(read_or_fail(*file, 3 * kPage, kPage), testing::filled(kPage, 'M'));
  // An mtime bump alone is a change too.
  fake->bump_mtime();
  EXPECT_EQ(file->revalidate(), File::Validity::Resnapshotted);
  EXPECT_FALSE(file->in_conflict());
}

TEST_F(FileTest, OutsideChangeWithStagedPagesIsAConflict) {
  open_numbered(8);
  read_or_fail(*file, 0, kPage);                                  // page 0 Clean
  ASSERT_EQ(write_vec(*file, testing::filled(kPage, 'W'), 2 * kPage), static_cast<ssize_t>(kPage));
  fake->outside_write(5 * kPage, testing::filled(kPage, 'N'));

  EXPECT_EQ(file->revalidate(), File::Validity::Conflict);
  EXPECT_TRUE(file->in_conflict());
  EXPECT_TRUE(info().conflict);
  EXPECT_EQ(file->revalidate(), File::Validity::Conflict);
  // Resident pages still work, with the snapshot's and the staged bytes.
  EXPECT_EQ(read_or_fail(*file, 0, kPage), pattern_bytes(0, kPage));
  EXPECT_EQ(read_or_fail(*file, 2 * kPage, kPage), testing::filled(kPage, 'W'));
  // Pages that would need the changed source fail with EIO.
  std::vector<char> out;
  EXPECT_EQ(read_bytes(*file, 5 * kPage, kPage, out), -EIO);
  EXPECT_EQ(read_bytes(*file, 6 * kPage, 10, out), -EIO);
  EXPECT_EQ(read_bytes(*file, 0, 2 * kPage, out), -EIO) << "page 1 is not resident";
  // Staged pages are kept.
  EXPECT_EQ(info().dirty_pages, 1u);
  EXPECT_TRUE(file->has_staged());
}

TEST_F(FileTest, ConflictIsFoundByALoadWithoutRevalidate) {
  open_numbered(8);
  ASSERT_EQ(write_vec(*file, testing::filled(kPage, 'W'), 2 * kPage), static_cast<ssize_t>(kPage));
  fake->outside_write(5 * kPage, testing::filled(kPage, 'N'));
  std::vector<char> out;
  EXPECT_EQ(read_bytes(*file, 5 * kPage, kPage, out), -EIO);
  EXPECT_TRUE(file->in_conflict());
  EXPECT_EQ(read_bytes(*file, 4 * kPage, kPage, out), -EIO);
  EXPECT_EQ(read_or_fail(*file, 2 * kPage, kPage), testing::filled(kPage, 'W'));
}

TEST_F(FileTest, DiscardRestoresTheSnapshot) {
  open_numbered(8);
  ASSERT_EQ(write_vec(*file, testing::filled(kPage, 'W'), kPage), static_cast<ssize_t>(kPage));
  ASSERT_EQ(write_vec(*file, testing::filled(10, 'x'), 3 * kPage + 4), 10);
  ASSERT_EQ(file->truncate(6 * kPage + 7), 0);
  ASSERT_EQ(file->write("tail", 4, 12 * kPage), 4);
  EXPECT_TRUE(file->has_staged());

  EXPECT_GE(file->discard(), 3u);
  EXPECT_FALSE(file->has_staged());
  EXPECT_EQ(info().dirty_pages, 0u);
  EXPECT_EQ(info().size, 8 * kPage);
  EXPECT_EQ(read_or_fail(*file, 0, 8 * kPage), pattern_bytes(0, 8 * kPage));
  std::vector<char> out;
  EXPECT_EQ(read_bytes(*file, 8 * kPage, kPage, out), 0);
  // And the file works as before.
  ASSERT_EQ(write_vec(*file, testing::filled(kPage, 'V'), 7 * kPage), static_cast<ssize_t>(kPage));
  EXPECT_EQ(read_or_fail(*file, 7 * kPage, kPage), testing::filled(kPage, 'V'));
}

TEST_F(FileTest, DiscardOfAConflictShowsTheNewSource) {
  open_numbered(8);
  read_or_fail(*file, 0, kPage);
  ASSERT_EQ(write_vec(*file, testing::filled(kPage, 'W'), 2 * kPage), static_cast<ssize_t>(kPage));
  fake->outside_write(0, testing::filled(kPage, 'N'));
  ASSERT_EQ(file->revalidate(), File::Validity::Conflict);
  EXPECT_EQ(file->discard(), 1u);
  EXPECT_FALSE(file->in_conflict());
  EXPECT_FALSE(file->has_staged());
  auto want = pattern_bytes(0, 8 * kPage);
  std::memset(want.data(), 'N', kPage);
  EXPECT_EQ(read_or_fail(*file, 0, 8 * kPage), want);
}

// ---------------------------------------------------------------- memory

// Evicted clean pages come back from the source with the same bytes; staged
// pages are never evicted.
TEST_F(FileTest, EvictedPagesReloadTheSameBytes) {
  open_numbered(16);
  read_or_fail(*file, 0, 16 * kPage);
  ASSERT_EQ(write_vec(*file, testing::filled(kPage, 'D'), 3 * kPage), static_cast<ssize_t>(kPage));
  uint64_t freed = 0;
  for (int i = 0; i < 3; ++i) freed += file->evict_clean(100);  // the clock may pass twice
  EXPECT_EQ(freed, 15u);
  EXPECT_EQ(info().resident_pages, 1u) << "only the dirty page stays";
  EXPECT_EQ(counters.evicted_bytes.load(), 15 * kPage);
  auto want = pattern_bytes(0, 16 * kPage);
  std::memset(want.data() + 3 * kPage, 'D', kPage);
  fake->reset_stats();
  EXPECT_EQ(read_or_fail(*file, 0, 16 * kPage), want);
  EXPECT_EQ(fake->stats().bytes_read, 15 * kPage);
}

// Eviction after the truncate/rewrite dance and after a shrink: the content
// model (cut mark) must still give the right bytes once pages are reloaded.
TEST_F(FileTest, EvictionKeepsTheContentAfterTruncates) {
  open_numbered(8, 100);
  const uint64_t size = 8 * kPage + 100;
  const auto content = pattern_bytes(0, size);
  ASSERT_EQ(file->truncate(0), 0);
  for (uint64_t off = 0; off < size; off += 5000) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(5000, size - off));
    ASSERT_EQ(file->write(content.data() + off, n, off), static_cast<ssize_t>(n));
  }
  ASSERT_FALSE(file->has_staged());
  for (int i = 0; i < 3; ++i) file->evict_clean(100);
  EXPECT_EQ(read_or_fail(*file, 0, size), content);
  EXPECT_FALSE(file->has_staged());

  // Shrink into a page, evict, extend: zeros past the cut, base before it.
  ASSERT_EQ(file->truncate(2 * kPage + 10), 0);
  for (int i = 0; i < 3; ++i) file->evict_clean(100);
  ASSERT_EQ(file->truncate(5 * kPage), 0);
  for (int i = 0; i < 3; ++i) file->evict_clean(100);
  EXPECT_EQ(read_or_fail(*file, 0, 5 * kPage),
            concat(pattern_bytes(0, 2 * kPage + 10), zeros(3 * kPage - 10)));
}

// Staged pages moved to the spill file are still the file's content: reads
// bring them back, writes over them win, discard drops them.
class SpillTest : public FileTest {
 protected:
  void SetUp() override {
    open_numbered(16);
    file->set_spill_opener([] { return memfd_create("deferfs-test-spill", MFD_CLOEXEC); });
  }
};

TEST_F(SpillTest, SpilledPagesReadBackTheirStagedBytes) {
  for (uint64_t p : {2, 3, 9})
    ASSERT_EQ(write_vec(*file, testing::filled(kPage, static_cast<char>('a' + p)), p * kPage),
              static_cast<ssize_t>(kPage));
  EXPECT_EQ(file->spill_dirty(10), 3);
  EXPECT_EQ(info().spilled_pages, 3u);
  EXPECT_EQ(info().dirty_pages, 3u) << "spilled pages are still staged";
  EXPECT_TRUE(file->has_staged());
  EXPECT_EQ(info().resident_pages, 0u);
  auto want = pattern_bytes(0, 16 * kPage);
  for (uint64_t p : {2, 3, 9}) std::memset(want.data() + p * kPage, 'a' + p, kPage);
  EXPECT_EQ(read_or_fail(*file, 0, 16 * kPage), want);
  EXPECT_EQ(info().dirty_pages, 3u);
  // A partial write into a spilled page keeps its other staged bytes.
  file->spill_dirty(10);
  ASSERT_EQ(file->write("Q", 1, 9 * kPage + 7), 1);
  want[9 * kPage + 7] = 'Q';
  EXPECT_EQ(read_or_fail(*file, 0, 16 * kPage), want);
}

TEST_F(SpillTest, DiscardDropsSpilledPages) {
  ASSERT_EQ(write_vec(*file, testing::filled(kPage, 'S'), 4 * kPage), static_cast<ssize_t>(kPage));
  ASSERT_EQ(file->spill_dirty(10), 1);
  EXPECT_EQ(file->discard(), 1u);
  EXPECT_FALSE(file->has_staged());
  EXPECT_EQ(info().spilled_pages, 0u);
  EXPECT_EQ(read_or_fail(*file, 0, 16 * kPage), pattern_bytes(0, 16 * kPage));
}

TEST_F(SpillTest, WritingASpilledPageBackToItsBaseMakesItClean) {
  ASSERT_EQ(write_vec(*file, testing::filled(kPage, 'S'), 4 * kPage), static_cast<ssize_t>(kPage));
  ASSERT_EQ(file->spill_dirty(10), 1);
  ASSERT_EQ(write_vec(*file, pattern_bytes(4 * kPage, kPage), 4 * kPage), static_cast<ssize_t>(kPage));
  EXPECT_FALSE(file->has_staged());
  EXPECT_EQ(info().spilled_pages, 0u);
  EXPECT_EQ(read_or_fail(*file, 4 * kPage, kPage), pattern_bytes(4 * kPage, kPage));
}

// ---------------------------------------------------------------- stress

// Several threads write and read their own pages while reading each other's;
// every page ends with its owner's last bytes, and nothing deadlocks.
TEST_F(FileTest, ConcurrentReadersAndWritersOfDistinctPages) {
  open_numbered(64);
  constexpr int kThreads = 4;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int i = 0; i < 2000; ++i) {
        uint64_t p = (rng() % 16) * kThreads + t;  // my pages
        uint64_t off = p * kPage + rng() % kPage;
        size_t len = 1 + rng() % std::min<uint64_t>(300, (p + 1) * kPage - off);
        std::vector<char> buf(len, static_cast<char>('a' + (i % 26)));
        if (file->write(buf.data(), len, off) != static_cast<ssize_t>(len)) ++failures;
        std::vector<char> got;
        if (read_bytes(*file, off, len, got) != static_cast<ssize_t>(len) || got != buf) ++failures;
        uint64_t q = rng() % 64;  // anyone's page: copied under the lock (read_into), as
                                  // read()'s iovecs may be overwritten by its owner
        std::vector<char> any(kPage);
        if (file->read_into(q * kPage, kPage, any.data()) != static_cast<ssize_t>(kPage)) ++failures;
      }
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_LE(fake->stats().reads, 64u + 64u) << "each page loaded at most once (+ compares)";
}

}  // namespace
}  // namespace deferfs
