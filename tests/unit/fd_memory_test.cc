// fd_memory: copies out of a registered file mapping go through the file
// and give the mapping's bytes; anything else is left to the caller.
#include "deferfs/fd_memory.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <vector>

namespace deferfs {
namespace {

class FdMemoryTest : public ::testing::Test {
 protected:
  static constexpr size_t kLen = 64 * 1024;
  void SetUp() override {
    fd_ = memfd_create("fd_memory_test", MFD_CLOEXEC);
    ASSERT_GE(fd_, 0);
    ASSERT_EQ(ftruncate(fd_, kLen), 0);
    map_ = static_cast<char*>(mmap(nullptr, kLen, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0));
    ASSERT_NE(map_, MAP_FAILED);
    for (size_t i = 0; i < kLen; ++i) map_[i] = static_cast<char>(i * 7 + 3);
    fd_memory::add(map_, kLen, fd_);
  }
  void TearDown() override {
    fd_memory::remove(map_);
    munmap(map_, kLen);
    close(fd_);
  }
  int fd_ = -1;
  char* map_ = nullptr;
};

TEST_F(FdMemoryTest, CopiesRegisteredBytesThroughTheFile) {
  std::vector<char> out(5000);
  ASSERT_EQ(fd_memory::copy_out(out.data(), map_ + 4093, out.size()), 5000);
  EXPECT_EQ(std::memcmp(out.data(), map_ + 4093, out.size()), 0);
  // A later store through the mapping is what the next copy sees.
  map_[4093] = 'x';
  ASSERT_EQ(fd_memory::copy_out(out.data(), map_ + 4093, 1), 1);
  EXPECT_EQ(out[0], 'x');
}

TEST_F(FdMemoryTest, LeavesOtherMemoryToTheCaller) {
  std::vector<char> other(100, 'a'), out(100);
  EXPECT_EQ(fd_memory::copy_out(out.data(), other.data(), other.size()), 0);
  // Running past the registered range: not one mapping, not copied here.
  EXPECT_EQ(fd_memory::copy_out(out.data(), map_ + kLen - 10, 20), 0);
  fd_memory::remove(map_);
  EXPECT_EQ(fd_memory::copy_out(out.data(), map_, 10), 0);
  fd_memory::add(map_, kLen, fd_);
}

TEST_F(FdMemoryTest, FileShorterThanTheMappingIsEio) {
  // Where a load through the mapping would raise SIGBUS.
  ASSERT_EQ(ftruncate(fd_, 4096), 0);
  std::vector<char> out(100);
  EXPECT_EQ(fd_memory::copy_out(out.data(), map_ + 8192, out.size()), -EIO);
  EXPECT_EQ(fd_memory::copy_out(out.data(), map_ + 100, out.size()), 100);
}

}  // namespace
}  // namespace deferfs
