// The journal on a real directory: what JournalWriter writes, replay hands
// to its target exactly, in order; data handed out in place stays valid
// until the target's release() (LiveTarget gathers writes on that promise),
// across more than one window of the reader; and PathJournalTarget makes the
// files what the journal says.
#include "deferfs/journal.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace deferfs {
namespace {

constexpr size_t kPage = 4096;

// The bytes of write `i`: distinct for every write.
std::vector<char> bytes_of(size_t i, size_t len) {
  std::vector<char> b(len);
  for (size_t k = 0; k < len; ++k) b[k] = static_cast<char>((i * 131 + k * 7 + (k >> 12)) & 0xff);
  return b;
}

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/deferfs-journal-test.XXXXXX";
    path_ = mkdtemp(tmpl);
    fd_ = open(path_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  }
  ~TempDir() {
    close(fd_);
    std::string cmd = "rm -rf '" + path_ + "'";
    (void)std::system(cmd.c_str());
  }
  int fd() const { return fd_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
};

struct Write {
  uint64_t off;
  size_t len;
};

// 3,000 page writes (with their headers, more than one 16 MiB window of the
// reader) and 1 MiB writes, in two files.
std::vector<Write> plan_for(int file) {
  std::vector<Write> w;
  for (size_t i = 0; i < 3000; ++i) w.push_back({(i * 2 + static_cast<size_t>(file)) * kPage, kPage});
  for (size_t i = 0; i < 3; ++i) w.push_back({(8000 + i * 300) * kPage, size_t{1} << 20});
  return w;
}

void write_journal(int dirfd) {
  JournalWriter j(dirfd, kJournalName);
  size_t n = 0;
  for (int f = 0; f < 2; ++f) {
    j.begin_file("f" + std::to_string(f), 1, static_cast<ino_t>(10 + f), 9000 * kPage);
    j.zero(100 * kPage, 2 * kPage);
    for (const Write& w : plan_for(f)) {
      std::vector<char> b = bytes_of(n++, w.len);
      j.write(w.off, b.data(), w.len);
    }
    j.mtime({1700000000, 5});
    j.end_file();
  }
  ASSERT_EQ(j.error(), 0);
  ASSERT_EQ(j.commit(), 0);
}

// Keeps every write's pointer until release(), then checks the bytes behind
// it: they must still be the journal's.
class HoldingTarget : public JournalTarget {
 public:
  int open(const std::string& path, dev_t, ino_t) override {
    opened.push_back(path);
    return 0;
  }
  int zero(uint64_t off, uint64_t len) override {
    zeros.push_back({off, static_cast<size_t>(len)});
    return 0;
  }
  int write(uint64_t off, const char* data, uint64_t len) override {
    held.push_back({off, data, static_cast<size_t>(len), next++});
    return 0;
  }
  int release() override {
    ++releases;
    for (const Held& h : held) {
      std::vector<char> want = bytes_of(h.index, h.len);
      if (std::memcmp(h.data, want.data(), h.len) != 0) ++stale;
      writes.push_back({h.off, h.len});
    }
    held.clear();
    return 0;
  }
  int finish(uint64_t final_size, const struct timespec* mtime) override {
    sizes.push_back(final_size);
    mtimes.push_back(mtime ? mtime->tv_sec : 0);
    return 0;
  }
  struct Held {
    uint64_t off;
    const char* data;
    size_t len;
    size_t index;
  };
  std::vector<Held> held;
  std::vector<std::string> opened;
  std::vector<Write> zeros, writes;
  std::vector<uint64_t> sizes;
  std::vector<time_t> mtimes;
  size_t next = 0, releases = 0, stale = 0;
};

TEST(Journal, ReplayHandsOutDataThatStaysValidUntilRelease) {
  TempDir d;
  write_journal(d.fd());
  HoldingTarget t;
  uint64_t files = 0, bytes = 0;
  ASSERT_EQ(replay_journal(d.fd(), kJournalName, t, &files, &bytes), 0);
  EXPECT_EQ(t.stale, 0u) << "data handed out in place changed before release()";
  EXPECT_GE(t.releases, 3u) << "the journal spans more than one window";
  EXPECT_TRUE(t.held.empty()) << "the replay ends with a release";
  EXPECT_EQ(files, 2u);
  EXPECT_EQ(t.opened, (std::vector<std::string>{"f0", "f1"}));
  EXPECT_EQ(t.sizes, (std::vector<uint64_t>{9000 * kPage, 9000 * kPage}));
  EXPECT_EQ(t.mtimes, (std::vector<time_t>{1700000000, 1700000000}));
  ASSERT_EQ(t.zeros.size(), 2u);
  // Every write, in the journal's order, at its offset.
  std::vector<Write> want;
  for (int f = 0; f < 2; ++f)
    for (const Write& w : plan_for(f)) want.push_back(w);
  ASSERT_EQ(t.writes.size(), want.size());
  uint64_t total = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(t.writes[i].off, want[i].off) << i;
    EXPECT_EQ(t.writes[i].len, want[i].len) << i;
    total += want[i].len;
  }
  EXPECT_EQ(bytes, total);
}

TEST(Journal, PathTargetMakesTheFilesWhatTheJournalSays) {
  TempDir d;
  // The files exist with other bytes; the journal names them by dev/ino.
  struct stat st[2];
  for (int f = 0; f < 2; ++f) {
    std::string p = d.path() + "/f" + std::to_string(f);
    int fd = open(p.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
    ASSERT_GE(fd, 0);
    std::vector<char> junk(9500 * kPage, 'j');
    ASSERT_EQ(pwrite(fd, junk.data(), junk.size(), 0), static_cast<ssize_t>(junk.size()));
    ASSERT_EQ(fstat(fd, &st[f]), 0);
    close(fd);
  }
  {
    JournalWriter j(d.fd(), kJournalName);
    size_t n = 0;
    for (int f = 0; f < 2; ++f) {
      j.begin_file("f" + std::to_string(f), st[f].st_dev, st[f].st_ino, 9000 * kPage);
      for (const Write& w : plan_for(f)) {
        std::vector<char> b = bytes_of(n++, w.len);
        j.write(w.off, b.data(), w.len);
      }
      j.end_file();
    }
    ASSERT_EQ(j.commit(), 0);
  }
  PathJournalTarget t(d.fd());
  ASSERT_EQ(replay_journal(d.fd(), kJournalName, t), 0);
  size_t n = 0;
  for (int f = 0; f < 2; ++f) {
    std::string p = d.path() + "/f" + std::to_string(f);
    int fd = open(p.c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    struct stat now;
    ASSERT_EQ(fstat(fd, &now), 0);
    EXPECT_EQ(static_cast<uint64_t>(now.st_size), 9000 * kPage);
    for (const Write& w : plan_for(f)) {
      std::vector<char> got(w.len), want = bytes_of(n++, w.len);
      ASSERT_EQ(pread(fd, got.data(), w.len, static_cast<off_t>(w.off)), static_cast<ssize_t>(w.len));
      EXPECT_TRUE(got == want) << "file " << f << " at " << w.off;
    }
    close(fd);
  }
}

// A journal of version 1 (xxh64 sum), as an earlier deferfs left it after a
// crash, is still replayed at the next mount; a wrong sum is refused.
std::string v1_journal(const std::string& path, dev_t dev, ino_t ino, const std::vector<char>& page,
                       bool good_sum) {
  std::string body;
  auto put = [&body](const void* p, size_t n) { body.append(static_cast<const char*>(p), n); };
  const uint32_t len = static_cast<uint32_t>(path.size());
  const uint64_t d = dev, i = ino, final_size = 2 * kPage, off = kPage, n = page.size();
  put("F", 1), put(&len, 4), put(path.data(), path.size()), put(&d, 8), put(&i, 8), put(&final_size, 8);
  put("W", 1), put(&off, 8), put(&n, 8), put(page.data(), page.size());
  put("E", 1);
  const uint64_t body_len = body.size(), sum = XXH64(body.data(), body.size(), 0) + (good_sum ? 0 : 1);
  const uint32_t version = 1;
  std::string j = "DFJ1";
  j.append(reinterpret_cast<const char*>(&version), 4);
  j += body;
  j += 'T';
  j.append(reinterpret_cast<const char*>(&body_len), 8);
  j.append(reinterpret_cast<const char*>(&sum), 8);
  return j;
}

TEST(Journal, AVersion1JournalIsStillReplayed) {
  for (bool good : {true, false}) {
    TempDir d;
    std::string p = d.path() + "/old";
    int fd = open(p.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
    ASSERT_GE(fd, 0);
    std::vector<char> zeros(2 * kPage, 0);
    ASSERT_EQ(pwrite(fd, zeros.data(), zeros.size(), 0), static_cast<ssize_t>(zeros.size()));
    struct stat st;
    ASSERT_EQ(fstat(fd, &st), 0);
    std::vector<char> page = bytes_of(42, kPage);
    std::string j = v1_journal("old", st.st_dev, st.st_ino, page, good);
    int jfd = openat(d.fd(), kJournalName, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
    ASSERT_GE(jfd, 0);
    ASSERT_EQ(write(jfd, j.data(), j.size()), static_cast<ssize_t>(j.size()));
    close(jfd);
    std::string why;
    EXPECT_EQ(check_journal(d.fd(), kJournalName, why), good ? JournalCheck::Complete : JournalCheck::Incomplete)
        << why;
    PathJournalTarget t(d.fd());
    EXPECT_EQ(replay_journal(d.fd(), kJournalName, t), good ? 0 : -EINVAL);
    std::vector<char> got(kPage);
    ASSERT_EQ(pread(fd, got.data(), kPage, kPage), static_cast<ssize_t>(kPage));
    EXPECT_EQ(got == page, good);
    close(fd);
  }
}

}  // namespace
}  // namespace deferfs
