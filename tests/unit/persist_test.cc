// PersistMeta: counting other sources' staged sets never gets in the way of
// a daemon restoring one of them.
#include "deferfs/persist.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>

namespace deferfs {
namespace {

TEST(PersistMetaTest, CountingHomelessSetsNeverLocksThem) {
  // A set whose source no longer exists, as a killed daemon leaves it.
  const std::string path = "/dev/shm/deferfs.unit-persist-" + std::to_string(getpid()) + ".meta";
  {
    auto m = PersistMeta::create(path, 16);
    const std::string gone = "/nonexistent/deferfs-unit-source";
    gone.copy(m->header().source_root, gone.size());
    m->keep(true);
  }
  std::atomic<bool> stop{false};
  std::atomic<int> counted{0};
  std::thread counter([&] {
    while (!stop.load()) counted += count_homeless() > 0;
  });
  // Meanwhile a daemon restoring that set must always get it.
  int refused = 0;
  for (int i = 0; i < 3000; ++i) {
    std::string why;
    auto m = PersistMeta::open_existing(path, why);
    if (!m) {
      ++refused;
      continue;
    }
    m->keep(true);
  }
  stop = true;
  counter.join();
  unlink(path.c_str());
  EXPECT_EQ(refused, 0) << "a restore was refused as 'in use by a running daemon' while another daemon counted";
  EXPECT_GT(counted.load(), 0);
}

}  // namespace
}  // namespace deferfs
