// Committer: sync of staged pages to the source (spec 6.3), against a
// FakeSource that counts every write and can fail on demand.
#include "deferfs/committer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cstring>
#include <future>
#include <thread>
#include <string>
#include <vector>

#include "fake_source.h"

namespace deferfs {
namespace {

using namespace std::chrono_literals;
using ::testing::HasSubstr;
using testing::FakeSource;
using testing::IoCall;
using testing::kPage;
using testing::make_file;
using testing::pattern_bytes;
using testing::read_or_fail;

std::vector<char> zeros(size_t n) { return std::vector<char>(n, 0); }
std::vector<char> concat(std::vector<char> a, const std::vector<char>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

class CommitterTest : public ::testing::Test {
 protected:
  void open_numbered(uint64_t pages, uint64_t extra = 0) {
    auto fw = make_file(FakeSource::numbered(pages * kPage + extra), counters, "dir/f");
    fake = fw.fake;
    file = fw.file;
  }
  // Writes `byte` over page p through the File.
  void dirty_page(uint64_t p, char byte) {
    auto buf = testing::filled(kPage, byte);
    ASSERT_EQ(file->write(buf.data(), buf.size(), p * kPage), static_cast<ssize_t>(kPage));
  }
  SyncReport sync(bool force = false) { return committer.commit({{file, "dir/f"}}, force); }

  Counters counters;
  Committer committer{counters};
  FakeSource* fake = nullptr;
  std::shared_ptr<File> file;
};

TEST_F(CommitterTest, WritesExactlyTheDirtyPages) {
  open_numbered(16384);  // 64 MiB
  const std::vector<uint64_t> pages = {10, 5000, 16000};
  for (uint64_t p : pages) dirty_page(p, static_cast<char>('a' + p % 26));
  ASSERT_EQ(file->info().dirty_pages, 3u);
  fake->reset_stats();

  SyncReport r = sync();
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.files, 1u);
  EXPECT_EQ(r.pages_written, 3u);
  EXPECT_EQ(r.pages_skipped, 0u);
  EXPECT_EQ(r.bytes_written, 3 * kPage);
  EXPECT_EQ(fake->stats().writes, 3u);
  EXPECT_EQ(fake->stats().bytes_written, 3 * kPage);
  EXPECT_EQ(fake->stats().syncs, 1u);
  EXPECT_EQ(fake->stats().truncates, 0u);
  EXPECT_EQ(fake->stats().zeros, 0u);
  auto log = fake->write_log();
  ASSERT_EQ(log.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(log[i], (IoCall{pages[i] * kPage, kPage})) << i;
  EXPECT_EQ(counters.synced_bytes.load(), 3 * kPage);

  for (uint64_t p : pages)
    EXPECT_EQ(fake->bytes(p * kPage, kPage), testing::filled(kPage, static_cast<char>('a' + p % 26)));
  EXPECT_EQ(fake->bytes(11 * kPage, kPage), pattern_bytes(11 * kPage, kPage));
  EXPECT_EQ(fake->size(), 16384 * kPage);

  EXPECT_FALSE(file->has_staged());
  EXPECT_EQ(file->info().dirty_pages, 0u);
  // The committed pages read back through the file, and a second sync has
  // nothing to do.
  EXPECT_EQ(read_or_fail(*file, 5000 * kPage, kPage), testing::filled(kPage, 'a' + 5000 % 26));
  fake->reset_stats();
  SyncReport again = sync();
  EXPECT_TRUE(again.ok());
  EXPECT_EQ(again.pages_written, 0u);
  EXPECT_EQ(fake->stats().writes, 0u);
}

// Dirty pages whose bytes equal the source's are compared and not written.
// (A page stays Dirty with its original bytes when the write-time comparison
// could not read the source; sync compares again.)
TEST_F(CommitterTest, DirtyPagesEqualToTheSourceAreSkipped) {
  open_numbered(64);
  fake->fail_reads(EIO);  // the write-time compare of page 7 fails
  auto same = pattern_bytes(7 * kPage, kPage);
  ASSERT_EQ(file->write(same.data(), kPage, 7 * kPage), static_cast<ssize_t>(kPage));
  ASSERT_EQ(file->info().dirty_pages, 1u) << "precondition: page 7 is Dirty with its source bytes";
  dirty_page(20, 'x');
  fake->reset_stats();

  SyncReport r = sync();
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.pages_written, 1u);
  EXPECT_EQ(r.pages_skipped, 1u);
  EXPECT_EQ(r.bytes_written, kPage);
  ASSERT_EQ(fake->write_log().size(), 1u);
  EXPECT_EQ(fake->write_log()[0], (IoCall{20 * kPage, kPage}));
  EXPECT_FALSE(file->has_staged());
  EXPECT_EQ(counters.skipped_pages.load(), 1u);
}

// The source changed from outside to hold exactly the staged bytes; a forced
// sync compares and writes nothing for that page.
TEST_F(CommitterTest, ForcedSyncSkipsPagesTheSourceAlreadyHolds) {
  open_numbered(8);
  dirty_page(2, 'q');
  dirty_page(3, 'r');
  fake->outside_write(2 * kPage, testing::filled(kPage, 'q'));
  fake->reset_stats();
  SyncReport r = sync(/*force=*/true);
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.pages_written, 1u);
  EXPECT_EQ(r.pages_skipped, 1u);
  ASSERT_EQ(fake->write_log().size(), 1u);
  EXPECT_EQ(fake->write_log()[0], (IoCall{3 * kPage, kPage}));
}

TEST_F(CommitterTest, AdjacentDirtyPagesAreCoalesced) {
  open_numbered(64);
  for (uint64_t p : {10, 11, 12, 13}) dirty_page(p, 'c');
  for (uint64_t p : {20, 21}) dirty_page(p, 'd');
  dirty_page(23, 'e');
  fake->reset_stats();
  SyncReport r = sync();
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.pages_written, 7u);
  EXPECT_EQ(r.bytes_written, 7 * kPage);
  auto log = fake->write_log();
  ASSERT_EQ(log.size(), 3u);
  EXPECT_EQ(log[0], (IoCall{10 * kPage, 4 * kPage}));
  EXPECT_EQ(log[1], (IoCall{20 * kPage, 2 * kPage}));
  EXPECT_EQ(log[2], (IoCall{23 * kPage, kPage}));
}

// A run whose middle page equals the source is written as two pieces around it.
TEST_F(CommitterTest, EqualPageInsideARunSplitsTheWrite) {
  open_numbered(64);
  dirty_page(30, 'a');
  fake->fail_reads(EIO);  // keeps page 31 Dirty with its own bytes
  auto same = pattern_bytes(31 * kPage, kPage);
  ASSERT_EQ(file->write(same.data(), kPage, 31 * kPage), static_cast<ssize_t>(kPage));
  dirty_page(32, 'b');
  ASSERT_EQ(file->info().dirty_pages, 3u);
  fake->reset_stats();
  SyncReport r = sync();
  EXPECT_EQ(r.pages_written, 2u);
  EXPECT_EQ(r.pages_skipped, 1u);
  auto log = fake->write_log();
  ASSERT_EQ(log.size(), 2u);
  EXPECT_EQ(log[0], (IoCall{30 * kPage, kPage}));
  EXPECT_EQ(log[1], (IoCall{32 * kPage, kPage}));
}

TEST_F(CommitterTest, ShrinkIsApplied) {
  open_numbered(8);
  ASSERT_EQ(file->truncate(5000), 0);
  fake->reset_stats();
  SyncReport r = sync();
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(fake->truncate_log(), std::vector<uint64_t>{5000});
  EXPECT_EQ(fake->content(), pattern_bytes(0, 5000));
  EXPECT_FALSE(file->has_staged());
  EXPECT_EQ(file->info().size, 5000u);
  // Extending again after the commit shows zeros, and commits as zeros.
  ASSERT_EQ(file->truncate(3 * kPage), 0);
  EXPECT_EQ(read_or_fail(*file, 0, 3 * kPage), concat(pattern_bytes(0, 5000), zeros(3 * kPage - 5000)));
  fake->reset_stats();
  EXPECT_TRUE(sync().ok());
  EXPECT_EQ(fake->truncate_log(), std::vector<uint64_t>{3 * kPage});
  EXPECT_EQ(fake->content(), concat(pattern_bytes(0, 5000), zeros(3 * kPage - 5000)));
}

TEST_F(CommitterTest, ExtendByWriteIsApplied) {
  open_numbered(2);
  ASSERT_EQ(file->write("end", 3, 5 * kPage + 100), 3);
  fake->reset_stats();
  SyncReport r = sync();
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.pages_written, 1u);
  auto want = concat(pattern_bytes(0, 2 * kPage), zeros(3 * kPage + 103));
  std::memcpy(want.data() + 5 * kPage + 100, "end", 3);
  EXPECT_EQ(fake->content(), want);
  EXPECT_EQ(fake->size(), 5 * kPage + 103);
  const auto tl = fake->truncate_log();
  EXPECT_TRUE(tl.empty() || tl == std::vector<uint64_t>{5 * kPage + 103});
  EXPECT_FALSE(file->has_staged());
}

// Shrink then extend: the cut range must end as zeros on the source.
TEST_F(CommitterTest, CutRangeIsZeroedOnTheSource) {
  open_numbered(8);
  ASSERT_EQ(file->truncate(5000), 0);
  ASSERT_EQ(file->truncate(8 * kPage), 0);
  fake->reset_stats();
  SyncReport r = sync();
  EXPECT_TRUE(r.ok());
  auto want = concat(pattern_bytes(0, 5000), zeros(8 * kPage - 5000));
  EXPECT_EQ(fake->content(), want);
  EXPECT_EQ(fake->size(), 8 * kPage);
  EXPECT_FALSE(file->has_staged());
  EXPECT_EQ(read_or_fail(*file, 0, 8 * kPage), want);
}

// `cp` over an existing file with the same bytes costs no write at all.
TEST_F(CommitterTest, CpOfTheSameBytesWritesNothing) {
  open_numbered(32, 77);
  const uint64_t size = 32 * kPage + 77;
  const auto content = pattern_bytes(0, size);
  ASSERT_EQ(file->truncate(0), 0);
  for (uint64_t off = 0; off < size; off += 65536) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(65536, size - off));
    ASSERT_EQ(file->write(content.data() + off, n, off), static_cast<ssize_t>(n));
  }
  fake->reset_stats();
  SyncReport r = sync();
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.pages_written, 0u);
  EXPECT_EQ(fake->stats().writes, 0u);
  EXPECT_EQ(fake->stats().truncates, 0u);
  EXPECT_EQ(fake->stats().zeros, 0u);
  EXPECT_EQ(fake->content(), content);
}

TEST_F(CommitterTest, WriteErrorKeepsEverythingStagedAndALaterSyncSucceeds) {
  open_numbered(64);
  for (uint64_t p : {3, 30, 60}) dirty_page(p, 'z');
  const auto before = file->info();
  ASSERT_EQ(before.dirty_pages, 3u);
  fake->fail_writes(ENOSPC);
  fake->reset_stats();

  SyncReport r = sync();
  EXPECT_FALSE(r.ok());
  ASSERT_EQ(r.failed.size(), 1u);
  EXPECT_EQ(r.failed[0].path, "dir/f");
  EXPECT_THAT(r.failed[0].error, HasSubstr(std::strerror(ENOSPC)));
  EXPECT_EQ(r.files, 0u);
  EXPECT_EQ(r.pages_written, 0u);
  EXPECT_TRUE(file->has_staged());
  EXPECT_EQ(file->info().dirty_pages, before.dirty_pages);
  EXPECT_EQ(file->info().size, before.size);
  EXPECT_EQ(fake->content(), pattern_bytes(0, 64 * kPage)) << "the failed write wrote nothing";
  EXPECT_EQ(read_or_fail(*file, 30 * kPage, kPage), testing::filled(kPage, 'z'));

  // The error is gone: the next sync writes exactly the three pages.
  fake->reset_stats();
  SyncReport ok = sync();
  EXPECT_TRUE(ok.ok());
  EXPECT_EQ(ok.files, 1u);
  EXPECT_EQ(ok.pages_written, 3u);
  EXPECT_EQ(ok.bytes_written, 3 * kPage);
  EXPECT_EQ(fake->stats().writes, 3u);
  auto want = pattern_bytes(0, 64 * kPage);
  for (uint64_t p : {3, 30, 60}) std::memset(want.data() + p * kPage, 'z', kPage);
  EXPECT_EQ(fake->content(), want);
  EXPECT_FALSE(file->has_staged());
  EXPECT_FALSE(file->in_conflict());
}

// A staged page whose hash differs from its snapshot page's is written
// without reading the source again to compare it (the source is the
// snapshot: its identity is unchanged).
TEST_F(CommitterTest, PagesKnownToDifferAreNotReadAgainAtSync) {
  open_numbered(64);
  for (uint64_t p : {3, 30, 60}) dirty_page(p, 'z');
  // A write does not read the source; an observer's look (status) compares
  // the pages and learns that they differ.
  file->settle_pending();
  // Every read of the source fails from now on: a compare would fail the
  // sync (the recheck after the commit only gives up).
  fake->fail_reads(EIO, -1);
  SyncReport r = sync();
  EXPECT_TRUE(r.ok()) << (r.failed.empty() ? "" : r.failed[0].error);
  EXPECT_EQ(r.pages_written, 3u);
  auto want = pattern_bytes(0, 64 * kPage);
  for (uint64_t p : {3, 30, 60}) std::memset(want.data() + p * kPage, 'z', kPage);
  EXPECT_EQ(fake->content(), want);
}

// A truncate changes a page's bytes without comparing them: what a write
// knew of the page (that it differs from the snapshot) no longer holds, and
// the sync compares the page again. Here the cut makes the page equal to
// its snapshot bytes again: skipped, nothing written.
TEST_F(CommitterTest, APageATruncateMadeEqualAgainIsComparedAndSkipped) {
  std::vector<char> content = pattern_bytes(0, 3 * kPage);
  std::memset(content.data() + 2 * kPage, 'z', 100);
  std::memset(content.data() + 2 * kPage + 100, 0, kPage - 100);
  auto fw = make_file(std::make_unique<FakeSource>(content), counters, "dir/f");
  fake = fw.fake;
  file = fw.file;
  dirty_page(2, 'z');                           // known to differ: the tail differs
  ASSERT_EQ(file->truncate(2 * kPage + 100), 0);  // the tail reads as zeros: the snapshot's bytes
  ASSERT_EQ(file->truncate(3 * kPage), 0);        // and the size the snapshot's
  fake->reset_stats();
  SyncReport r = sync();
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.pages_written, 0u);
  EXPECT_EQ(r.pages_skipped, 1u);
  EXPECT_EQ(fake->stats().writes, 0u);
  EXPECT_EQ(fake->content(), content);
}

// The error strikes after one page reached the source: still nothing lost,
// and the retry ends with the exact content (the page already there is
// found equal and skipped).
TEST_F(CommitterTest, WriteErrorMidwayKeepsEverythingStaged) {
  open_numbered(64);
  for (uint64_t p : {3, 30, 60}) dirty_page(p, 'z');
  fake->fail_writes(ENOSPC, 1, /*after=*/1);
  SyncReport r = sync();
  ASSERT_EQ(r.failed.size(), 1u);
  EXPECT_THAT(r.failed[0].error, HasSubstr(std::strerror(ENOSPC)));
  EXPECT_EQ(fake->write_log().size(), 1u);
  EXPECT_TRUE(file->has_staged());
  EXPECT_EQ(file->info().dirty_pages, 3u);
  EXPECT_FALSE(file->in_conflict()) << "our own writes are not an outside change";

  fake->reset_stats();
  SyncReport ok = sync();
  EXPECT_TRUE(ok.ok());
  EXPECT_EQ(ok.pages_written, 2u);
  EXPECT_EQ(ok.pages_skipped, 1u);
  auto want = pattern_bytes(0, 64 * kPage);
  for (uint64_t p : {3, 30, 60}) std::memset(want.data() + p * kPage, 'z', kPage);
  EXPECT_EQ(fake->content(), want);
  EXPECT_FALSE(file->has_staged());
  EXPECT_EQ(read_or_fail(*file, 0, 64 * kPage), want);
}

// Every page reached the source, then fsync failed.
TEST_F(CommitterTest, SyncErrorKeepsEverythingStaged) {
  open_numbered(64);
  for (uint64_t p : {3, 30, 60}) dirty_page(p, 'z');
  fake->reset_stats();
  fake->fail_syncs(EIO);
  SyncReport r = sync();
  ASSERT_EQ(r.failed.size(), 1u);
  EXPECT_THAT(r.failed[0].error, HasSubstr(std::strerror(EIO)));
  EXPECT_TRUE(file->has_staged());
  EXPECT_EQ(file->info().dirty_pages, 3u);
  EXPECT_FALSE(file->in_conflict()) << "our own writes are not an outside change";

  SyncReport ok = sync();
  EXPECT_TRUE(ok.ok());
  EXPECT_EQ(ok.pages_written + ok.pages_skipped, 3u);
  EXPECT_EQ(fake->stats().syncs, 2u);
  auto want = pattern_bytes(0, 64 * kPage);
  for (uint64_t p : {3, 30, 60}) std::memset(want.data() + p * kPage, 'z', kPage);
  EXPECT_EQ(fake->content(), want);
  EXPECT_FALSE(file->has_staged());
}

TEST_F(CommitterTest, TruncateErrorKeepsTheSizeChangeStaged) {
  open_numbered(8);
  ASSERT_EQ(file->truncate(3 * kPage), 0);
  fake->fail_truncates(ENOSPC);
  SyncReport r = sync();
  ASSERT_EQ(r.failed.size(), 1u);
  EXPECT_TRUE(file->has_staged());
  EXPECT_EQ(file->info().size, 3 * kPage);
  EXPECT_EQ(fake->size(), 8 * kPage);
  EXPECT_TRUE(sync().ok());
  EXPECT_EQ(fake->size(), 3 * kPage);
  EXPECT_FALSE(file->has_staged());
}

TEST_F(CommitterTest, ConflictIsRefusedAndForceWritesIt) {
  open_numbered(16);
  dirty_page(4, 'S');
  fake->outside_write(9 * kPage, testing::filled(kPage, 'O'));  // same size, new mtime
  fake->reset_stats();

  SyncReport r = sync();
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.conflicts, std::vector<std::string>{"dir/f"});
  EXPECT_TRUE(r.failed.empty());
  EXPECT_EQ(r.files, 0u);
  EXPECT_EQ(fake->stats().writes, 0u);
  EXPECT_EQ(fake->stats().truncates, 0u);
  EXPECT_EQ(fake->stats().syncs, 0u);
  EXPECT_TRUE(file->in_conflict());
  EXPECT_TRUE(file->has_staged());
  EXPECT_EQ(file->info().dirty_pages, 1u);

  SyncReport forced = sync(/*force=*/true);
  EXPECT_TRUE(forced.ok());
  EXPECT_TRUE(forced.conflicts.empty());
  EXPECT_EQ(forced.files, 1u);
  EXPECT_EQ(forced.pages_written, 1u);
  ASSERT_EQ(fake->write_log().size(), 1u);
  EXPECT_EQ(fake->write_log()[0], (IoCall{4 * kPage, kPage}));
  auto want = pattern_bytes(0, 16 * kPage);
  std::memset(want.data() + 4 * kPage, 'S', kPage);
  std::memset(want.data() + 9 * kPage, 'O', kPage);
  EXPECT_EQ(fake->content(), want) << "the staged page over the new source";
  EXPECT_FALSE(file->in_conflict());
  EXPECT_FALSE(file->has_staged());
  // The mount now shows the new source plus the committed page.
  EXPECT_EQ(read_or_fail(*file, 0, 16 * kPage), want);
}

// Reads [off, off+len) of f on another thread, giving up after 5 s (then
// the fake fails every read so that a spinning loader stops, and the thread
// is joined). Returns false on timeout.
bool read_with_deadline(File& f, FakeSource& fake, uint64_t off, size_t len, ssize_t& n,
                        std::vector<char>& out) {
  std::promise<void> done;
  auto fut = done.get_future();
  std::thread t([&] {
    n = testing::read_bytes(f, off, len, out);
    done.set_value();
  });
  bool ok = fut.wait_for(5s) == std::future_status::ready;
  if (!ok) fake.fail_reads(EIO, -1);
  t.join();
  fake.clear_failures();
  return ok;
}

// sync --force over a source that shrank from outside. Whatever size the
// forced sync settles on, afterwards the file (nothing staged) must show
// exactly what the source holds, and reads must complete.
TEST_F(CommitterTest, ForcedSyncOverAShrunkSourceLeavesTheFileEqualToTheSource) {
  open_numbered(8);
  dirty_page(1, 'S');
  fake->outside_truncate(4 * kPage);
  SyncReport r = sync(/*force=*/true);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(file->has_staged());
  EXPECT_FALSE(file->in_conflict());
  const uint64_t size = file->info().size;
  EXPECT_EQ(size, fake->size()) << "the file and its source disagree on the size after a sync";
  ssize_t n = 0;
  std::vector<char> out;
  ASSERT_TRUE(read_with_deadline(*file, *fake, 0, size, n, out))
      << "a read of the synced file never returned (0.." << size << ")";
  EXPECT_EQ(n, static_cast<ssize_t>(size));
  EXPECT_EQ(out, fake->bytes(0, size));
}

// Spec 5.2, "stale data is never served silently": the source changes from
// outside after sync has checked it but before sync writes. The sync must
// not adopt the changed source as its own doing while the file keeps
// serving pages of the old version.
TEST_F(CommitterTest, OutsideChangeDuringSyncIsNotAdoptedSilently) {
  open_numbered(16);
  read_or_fail(*file, 9 * kPage, kPage);  // page 9 resident, Clean
  dirty_page(4, 'S');
  fake->gate_on(4 * kPage, kPage);        // hold sync at its compare-read of page 4
  auto syncing = std::async(std::launch::async, [&] { return sync(); });
  ASSERT_TRUE(fake->wait_blocked(1));
  fake->outside_write(9 * kPage, testing::filled(kPage, 'O'));
  fake->gate_off();
  SyncReport r = syncing.get();

  // Acceptable: the sync refuses (conflict), or the file notices the change
  // (conflict, EIO, or shows the new bytes). Not acceptable: old bytes of
  // page 9 served while the file says its snapshot is unchanged.
  std::vector<char> out;
  ssize_t n = testing::read_bytes(*file, 9 * kPage, kPage, out);
  const bool stale = n == static_cast<ssize_t>(kPage) && out == pattern_bytes(9 * kPage, kPage);
  const File::Validity v = file->revalidate();
  EXPECT_FALSE(stale && v == File::Validity::Unchanged && r.ok())
      << "page 9 serves the old bytes, the source holds 'O' there, the sync reported success "
         "and revalidate() says Unchanged";
}

// A long run of dirty pages is written in a few large writes (1 MiB batches).
TEST_F(CommitterTest, LongRunIsWrittenInLargeWrites) {
  open_numbered(1024);
  auto buf = testing::filled(300 * kPage, 'L');
  ASSERT_EQ(file->write(buf.data(), buf.size(), 100 * kPage), static_cast<ssize_t>(buf.size()));
  fake->reset_stats();
  SyncReport r = sync();
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.pages_written, 300u);
  EXPECT_EQ(r.bytes_written, 300 * kPage);
  EXPECT_LE(fake->stats().writes, 2u);
  uint64_t next = 100 * kPage;
  for (const auto& w : fake->write_log()) {
    EXPECT_EQ(w.off, next);
    next = w.off + w.len;
  }
  EXPECT_EQ(next, 400 * kPage);
  EXPECT_EQ(fake->bytes(100 * kPage, 300 * kPage), buf);
}

// One file of a sync fails: its path and cause are reported, and no staged
// page of any file is lost (spec 6.3 makes one sync atomic across files, so
// the other file may be committed or kept staged, but not lost). Once the
// error is gone, a sync commits both exactly.
TEST_F(CommitterTest, OneFailingFileLosesNothingInAnyFile) {
  auto a = make_file(FakeSource::numbered(8 * kPage), counters, "a");
  auto b = make_file(FakeSource::numbered(8 * kPage), counters, "b");
  auto x = testing::filled(kPage, 'x');
  ASSERT_EQ(a.file->write(x.data(), kPage, kPage), static_cast<ssize_t>(kPage));
  ASSERT_EQ(b.file->write(x.data(), kPage, 2 * kPage), static_cast<ssize_t>(kPage));
  a.fake->fail_writes(EIO);
  SyncReport r = committer.commit({{a.file, "a"}, {b.file, "b"}}, false);
  EXPECT_FALSE(r.ok());
  bool a_named = false;
  for (const auto& f : r.failed)
    if (f.path == "a") {
      a_named = true;
      EXPECT_THAT(f.error, HasSubstr(std::strerror(EIO)));
    }
  EXPECT_TRUE(a_named) << "the failing file is named";
  EXPECT_TRUE(a.file->has_staged());
  EXPECT_EQ(a.file->info().dirty_pages, 1u);
  // b: committed, or still staged with its page.
  if (b.file->has_staged()) {
    EXPECT_EQ(b.file->info().dirty_pages, 1u);
  } else {
    EXPECT_EQ(b.fake->bytes(2 * kPage, kPage), x);
  }
  EXPECT_EQ(read_or_fail(*b.file, 2 * kPage, kPage), x);

  SyncReport ok = committer.commit({{a.file, "a"}, {b.file, "b"}}, false);
  EXPECT_TRUE(ok.ok());
  EXPECT_FALSE(a.file->has_staged());
  EXPECT_FALSE(b.file->has_staged());
  auto want_a = pattern_bytes(0, 8 * kPage);
  std::memcpy(want_a.data() + kPage, x.data(), kPage);
  auto want_b = pattern_bytes(0, 8 * kPage);
  std::memcpy(want_b.data() + 2 * kPage, x.data(), kPage);
  EXPECT_EQ(a.fake->content(), want_a);
  EXPECT_EQ(b.fake->content(), want_b);
}

// A write during sync to a page being written back: the page stays staged,
// and the next sync puts the newest bytes on the source.
TEST_F(CommitterTest, WriteDuringSyncIsNotLost) {
  open_numbered(16);
  dirty_page(5, 'A');
  // Hold the sync at its compare-read of page 5.
  fake->gate_on(5 * kPage, kPage);
  auto syncing = std::async(std::launch::async, [&] { return sync(); });
  ASSERT_TRUE(fake->wait_blocked(1));
  auto b = testing::filled(kPage, 'B');
  auto writer = std::async(std::launch::async, [&] { return file->write(b.data(), kPage, 5 * kPage); });
  ASSERT_EQ(writer.wait_for(5s), std::future_status::ready) << "a write waited for a sync's I/O";
  EXPECT_EQ(writer.get(), static_cast<ssize_t>(kPage));
  fake->gate_off();
  EXPECT_TRUE(syncing.get().ok());
  EXPECT_EQ(read_or_fail(*file, 5 * kPage, kPage), b);
  if (fake->bytes(5 * kPage, kPage) != b) {
    EXPECT_TRUE(file->has_staged()) << "B is neither on the source nor staged";
  }
  EXPECT_TRUE(sync().ok());
  EXPECT_EQ(fake->bytes(5 * kPage, kPage), b);
  EXPECT_FALSE(file->has_staged());
}

// Pages spilled to disk (dirty_limit) are committed from the spill file.
TEST_F(CommitterTest, SpilledPagesAreCommitted) {
  open_numbered(32);
  file->set_spill_opener([] { return memfd_create("deferfs-test-spill", MFD_CLOEXEC); });
  for (uint64_t p : {5, 6, 20}) dirty_page(p, static_cast<char>('k' + p % 10));
  ASSERT_EQ(file->spill_dirty(2), 2);
  ASSERT_EQ(file->info().spilled_pages, 2u);
  fake->reset_stats();
  SyncReport r = sync();
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.pages_written, 3u);
  EXPECT_EQ(r.bytes_written, 3 * kPage);
  auto want = pattern_bytes(0, 32 * kPage);
  for (uint64_t p : {5, 6, 20}) std::memset(want.data() + p * kPage, 'k' + p % 10, kPage);
  EXPECT_EQ(fake->content(), want);
  EXPECT_FALSE(file->has_staged());
  EXPECT_EQ(file->info().spilled_pages, 0u);
  EXPECT_EQ(read_or_fail(*file, 0, 32 * kPage), want);
}

TEST_F(CommitterTest, NothingStagedIsNotAFile) {
  open_numbered(4);
  read_or_fail(*file, 0, 4 * kPage);
  fake->reset_stats();
  SyncReport r = sync();
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.files, 0u);
  EXPECT_EQ(fake->stats().writes + fake->stats().syncs + fake->stats().truncates, 0u);
}

TEST_F(CommitterTest, ProgressReachesTheTotal) {
  open_numbered(64);
  for (uint64_t p : {1, 2, 40}) dirty_page(p, 'p');
  uint64_t last_done = 0, last_total = 0;
  int calls = 0;
  committer.commit({{file, "dir/f"}}, false, [&](uint64_t done, uint64_t total) {
    EXPECT_GE(done, last_done);
    last_done = done;
    last_total = total;
    ++calls;
  });
  EXPECT_GT(calls, 0);
  EXPECT_EQ(last_total, 3u);
  EXPECT_EQ(last_done, 3u);
}

}  // namespace
}  // namespace deferfs
