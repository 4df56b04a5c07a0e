// Instances (issue 13.1) and file identities (issue 16.1) on a real
// directory: a live instance's journal is never recovered, a dead one's is;
// an inode number given to a new file is told apart from the file it was;
// a renamed file is found again by its handle.
#include "deferfs/instance.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "deferfs/committer.h"
#include "deferfs/file_identity.h"
#include "deferfs/journal.h"

namespace deferfs {
namespace {

constexpr size_t kPage = 4096;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/deferfs-instance-test.XXXXXX";
    path_ = mkdtemp(tmpl);
    fd_ = open(path_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    mkdirat(fd_, ".deferfs", 0700);
    state_ = openat(fd_, ".deferfs", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  }
  ~TempDir() {
    close(state_);
    close(fd_);
    (void)std::system(("rm -rf '" + path_ + "'").c_str());
  }
  int fd() const { return fd_; }
  int state() const { return state_; }
  const std::string& path() const { return path_; }
  void write(const std::string& name, const std::string& data) {
    int f = openat(fd_, name.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
    ASSERT_GE(f, 0);
    ASSERT_EQ(pwrite(f, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
    close(f);
  }
  std::string read(const std::string& name) {
    int f = openat(fd_, name.c_str(), O_RDONLY | O_CLOEXEC);
    std::string out(1 << 20, 0);
    ssize_t n = f < 0 ? 0 : pread(f, out.data(), out.size(), 0);
    if (f >= 0) close(f);
    out.resize(n > 0 ? static_cast<size_t>(n) : 0);
    return out;
  }

 private:
  std::string path_;
  int fd_ = -1, state_ = -1;
};

bool exists(int dirfd, const std::string& name) { return faccessat(dirfd, name.c_str(), F_OK, AT_SYMLINK_NOFOLLOW) == 0; }

TEST(Instance, LockFileLivesWithTheInstance) {
  TempDir d;
  std::string id;
  {
    auto inst = Instance::create(d.state(), "/mnt/x");
    id = inst->id();
    EXPECT_EQ(id.size(), 16u);
    EXPECT_TRUE(exists(d.state(), "instance." + id));
    EXPECT_EQ(journal_name(id), "journal." + id);
    auto other = Instance::create(d.state(), "/mnt/y");
    EXPECT_NE(other->id(), id) << "two mounts never share an id";
    const auto ids = instances_in(d.state(), id);
    ASSERT_EQ(ids.size(), 1u);
    EXPECT_EQ(ids[0], other->id());
  }
  EXPECT_FALSE(exists(d.state(), "instance." + id)) << "a clean end removes its lock file";
}

// A child process holds an instance; the parent plays another mount.
TEST(Instance, LiveInstanceJournalIsNeverRecoveredDeadOneIs) {
  TempDir d;
  d.write("f", std::string(8 * kPage, 'o'));
  int up[2], down[2];
  ASSERT_EQ(pipe(up), 0);
  ASSERT_EQ(pipe(down), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto inst = Instance::create(d.state(), "/mnt/child");
    (void)!::write(up[1], inst->id().data(), 16);
    char c;
    (void)!::read(down[0], &c, 1);
    _exit(0);  // as if killed: the lock goes, the lock file stays
  }
  char buf[16];
  ASSERT_EQ(::read(up[0], buf, 16), 16);
  const std::string id(buf, 16);

  // The live instance's decided journal (as if it were applying it now).
  struct stat st;
  ASSERT_EQ(fstatat(d.fd(), "f", &st, 0), 0);
  {
    JournalWriter j(d.state(), journal_name(id));
    j.begin_file("f", st.st_dev, st.st_ino, 8 * kPage);
    const std::string page(kPage, 'n');
    j.write(kPage, page.data(), kPage);
    j.end_file();
    ASSERT_EQ(j.commit(), 0);
  }
  EXPECT_TRUE(instance_alive(d.state(), id));
  EXPECT_EQ(DeadInstance::claim(d.state(), id), nullptr);
  EXPECT_EQ(Committer::recover_dead(d.fd(), d.state(), "", true), 0);
  EXPECT_EQ(d.read("f"), std::string(8 * kPage, 'o')) << "a live instance's journal was replayed";
  EXPECT_TRUE(exists(d.state(), journal_name(id)));

  ASSERT_EQ(::write(down[1], "x", 1), 1);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_FALSE(instance_alive(d.state(), id));
  EXPECT_EQ(Committer::recover_dead(d.fd(), d.state(), "", true), 1);
  std::string want(8 * kPage, 'o');
  want.replace(kPage, kPage, std::string(kPage, 'n'));
  EXPECT_EQ(d.read("f"), want) << "a dead instance's decided sync is finished";
  EXPECT_FALSE(exists(d.state(), journal_name(id)));
  close(up[0]);
  close(up[1]);
  close(down[0]);
  close(down[1]);
}

TEST(FileIdentity, ReusedInodeNumberIsAnotherFile) {
  TempDir d;
  d.write("a", "first");
  int fd = openat(d.fd(), "a", O_RDONLY | O_CLOEXEC);
  FileIdentity before;
  ASSERT_EQ(take_identity(fd, before), 0);
  close(fd);
  EXPECT_TRUE(before.flags & (FileIdentity::kHasGeneration | FileIdentity::kHasBtime));
  ASSERT_EQ(unlinkat(d.fd(), "a", 0), 0);
  FileIdentity now;
  bool reused = false;
  for (int i = 0; i < 3000 && !reused; ++i) {
    const std::string n = "n" + std::to_string(i);
    d.write(n, "second");
    int f = openat(d.fd(), n.c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_EQ(take_identity(f, now), 0);
    close(f);
    reused = now.ino == before.ino;
  }
  ASSERT_TRUE(reused) << "no new file got the inode number back";
  EXPECT_EQ(compare_identity(before, now), Sameness::Other);
  EXPECT_EQ(compare_identity(before, before), Sameness::Same);
  EXPECT_EQ(find_by_handle(d.fd(), d.path(), before), "") << "the handle of a deleted file finds nothing";
}

TEST(FileIdentity, RenamedFileIsFoundByItsHandle) {
  TempDir d;
  d.write("a", "data");
  int fd = openat(d.fd(), "a", O_RDONLY | O_CLOEXEC);
  FileIdentity id;
  ASSERT_EQ(take_identity(fd, id), 0);
  close(fd);
  ASSERT_TRUE(id.flags & FileIdentity::kHasHandle);
  ASSERT_EQ(mkdirat(d.fd(), "sub", 0755), 0);
  ASSERT_EQ(renameat(d.fd(), "a", d.fd(), "sub/b"), 0);
  EXPECT_EQ(find_by_handle(d.fd(), d.path(), id), "sub/b");
}

}  // namespace
}  // namespace deferfs
