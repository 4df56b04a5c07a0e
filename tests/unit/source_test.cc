// FdSource's batched I/O on a real file: scattered writes (pwrite, one
// call) and io_uring reads in windows of 64, more than one window, checked
// byte for byte against plain pread.
#include "deferfs/source.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace deferfs {
namespace {

class TempFile {
 public:
  TempFile() {
    char tmpl[] = "/tmp/deferfs-source-test.XXXXXX";
    fd_ = mkstemp(tmpl);
    path_ = tmpl;
  }
  ~TempFile() {
    if (fd_ >= 0) close(fd_);
    unlink(path_.c_str());
  }
  int fd() const { return fd_; }

 private:
  int fd_ = -1;
  std::string path_;
};

TEST(SourceBatch, ScatteredWritesLandWhereAskedAndReadBack) {
  TempFile f;
  ASSERT_GE(f.fd(), 0);
  constexpr size_t kPage = 4096, kPages = 1000, kWrites = 300;
  ASSERT_EQ(ftruncate(f.fd(), kPage * kPages), 0);
  FdSource src(dup(f.fd()), true);

  // 300 distinct pages in ascending order, 1 to 3 pages each, no overlap.
  std::mt19937 rng(7);
  std::vector<char> want(kPage * kPages, 0);
  std::vector<std::vector<char>> data;
  std::vector<WriteRequest> writes;
  for (size_t p = 0; writes.size() < kWrites && p < kPages;) {
    size_t len = kPage * (1 + rng() % 3) - rng() % 100;  // not always whole pages
    if ((p + 3) * kPage > want.size()) break;
    data.emplace_back(len);
    for (char& c : data.back()) c = static_cast<char>(rng());
    std::copy(data.back().begin(), data.back().end(), want.begin() + static_cast<long>(p * kPage));
    writes.push_back({nullptr, len, p * kPage});
    p += 3;
  }
  for (size_t i = 0; i < writes.size(); ++i) writes[i].buf = data[i].data();
  ASSERT_GT(writes.size(), 64u) << "more than one io_uring window of the reads below";
  ASSERT_EQ(src.write_batch(writes), 0);
  for (const WriteRequest& w : writes) EXPECT_EQ(w.result, static_cast<int64_t>(w.len));

  std::vector<char> got(want.size());
  ASSERT_EQ(pread(f.fd(), got.data(), got.size(), 0), static_cast<ssize_t>(got.size()));
  EXPECT_TRUE(got == want) << "the file differs from the batch of writes";

  // Batched reads of the same ranges, the last one past the end (short).
  std::vector<std::vector<char>> bufs(writes.size());
  std::vector<ReadRequest> reads;
  for (size_t i = 0; i < writes.size(); ++i) {
    bufs[i].assign(writes[i].len, 0);
    reads.push_back({bufs[i].data(), writes[i].len, writes[i].off});
  }
  std::vector<char> tail(2 * kPage);
  reads.push_back({tail.data(), tail.size(), (kPages - 1) * kPage});
  ASSERT_EQ(src.read_batch(reads), 0);
  for (size_t i = 0; i < writes.size(); ++i) {
    EXPECT_EQ(reads[i].result, static_cast<ssize_t>(writes[i].len));
    EXPECT_TRUE(bufs[i] == data[i]) << "read " << i;
  }
  EXPECT_EQ(reads.back().result, static_cast<ssize_t>(kPage)) << "short at the end of the file";
}

// Source::load reads with O_DIRECT where it can (not on /tmp if it is a
// tmpfs without it: then buffered). Either way the bytes are the file's, a
// read ending at the end of the file is short by exactly the missing bytes,
// the bytes written dirty the same page only, and writes made through the
// buffered fd just before are seen (the kernel writes them back first).
TEST(SourceLoad, LoadsAlignedRunsExactlyWhateverTheEndOfFile) {
  for (const char* dir : {"/var/tmp", "/tmp"}) {
    std::string tmpl = std::string(dir) + "/deferfs-load-test.XXXXXX";
    int fd = mkstemp(tmpl.data());
    ASSERT_GE(fd, 0) << dir;
    unlink(tmpl.c_str());
    constexpr size_t kPage = 4096;
    const size_t size = 37 * kPage + 123;
    std::vector<char> want(size);
    std::mt19937 rng(11);
    for (char& c : want) c = static_cast<char>(rng());
    ASSERT_EQ(pwrite(fd, want.data(), size, 0), static_cast<ssize_t>(size));
    FdSource src(fd, true);
    const size_t cap = 40 * kPage;
    char* buf = static_cast<char*>(mmap(nullptr, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    ASSERT_NE(buf, MAP_FAILED);
    struct Case { uint64_t first_page; size_t len; size_t expect; };
    const Case cases[] = {
        {0, 8 * kPage, 8 * kPage},                  // whole pages
        {3, 5 * kPage + 17, 5 * kPage + 17},        // ends inside a page
        {32, size - 32 * kPage, size - 32 * kPage}, // up to the end of file
        {36, 2 * kPage, size - 36 * kPage},         // past it: short
        {38, kPage, 0},                             // beyond it
    };
    for (const Case& c : cases) {
      std::memset(buf, 0x5a, cap);
      const uint64_t off = c.first_page * kPage;
      ssize_t n = src.load(buf, c.len, off);
      ASSERT_EQ(n, static_cast<ssize_t>(c.expect)) << dir << " page " << c.first_page;
      EXPECT_EQ(0, std::memcmp(buf, want.data() + off, c.expect)) << dir << " page " << c.first_page;
      const size_t page_end = (c.len + kPage - 1) / kPage * kPage;
      for (size_t i = page_end; i < cap; ++i) ASSERT_EQ(buf[i], 0x5a) << "wrote past the last page";
    }
    // A write through the buffered fd is seen by the next load.
    ASSERT_EQ(src.write("fresh", 5, 2 * kPage + 1), 0);
    ASSERT_EQ(src.load(buf, kPage, 2 * kPage), static_cast<ssize_t>(kPage));
    EXPECT_EQ(0, std::memcmp(buf + 1, "fresh", 5));
    // An unaligned buffer is read the buffered way, with the same result.
    ASSERT_EQ(src.load(buf + 1, 100, 0), 100);
    EXPECT_EQ(0, std::memcmp(buf + 1, want.data(), 100));
    munmap(buf, cap);
  }
}

TEST(SourceBatch, AWriteToAReadOnlyFileFailsWithItsErrno) {
  TempFile f;
  ASSERT_GE(f.fd(), 0);
  int ro = open(("/proc/self/fd/" + std::to_string(f.fd())).c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(ro, 0);
  FdSource src(ro, false);
  std::vector<char> page(4096, 'x');
  std::vector<WriteRequest> writes = {{page.data(), page.size(), 0}, {page.data(), page.size(), 8192}};
  EXPECT_EQ(src.write_batch(writes), -EBADF);
}

}  // namespace
}  // namespace deferfs
