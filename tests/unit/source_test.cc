// FdSource's batched I/O on a real file: scattered writes (pwrite, one
// call) and io_uring reads in windows of 64, more than one window, checked
// byte for byte against plain pread.
#include "deferfs/source.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
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
