// probe_max_file_size against a real file of the same filesystem: the size
// found is accepted, one more byte is refused with EFBIG (issue 16.2).
#include "deferfs/size_limit.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <limits>
#include <string>

namespace deferfs {
namespace {

TEST(SizeLimit, TheProbedSizeIsTheLargestTheFilesystemAccepts) {
  char dir[] = "/var/tmp/deferfs-size-limit.XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  const int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(dfd, 0);
  const uint64_t limit = probe_max_file_size(dfd);
  const std::string file = std::string(dir) + "/f";
  const int fd = open(file.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_LT(limit, static_cast<uint64_t>(std::numeric_limits<off_t>::max())) << "no limit found in " << dir;
  EXPECT_EQ(ftruncate(fd, static_cast<off_t>(limit)), 0);
  errno = 0;
  EXPECT_EQ(ftruncate(fd, static_cast<off_t>(limit + 1)), -1);
  EXPECT_EQ(errno, EFBIG);
  close(fd);
  unlink(file.c_str());
  // The probe left nothing behind.
  EXPECT_EQ(rmdir(dir), 0) << "the probe left a file in " << dir;
  close(dfd);
}

TEST(SizeLimit, NoDirectoryMeansNoLimit) {
  EXPECT_EQ(probe_max_file_size(-1), static_cast<uint64_t>(std::numeric_limits<off_t>::max()));
}

}  // namespace
}  // namespace deferfs
