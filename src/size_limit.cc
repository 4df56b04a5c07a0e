#include "deferfs/size_limit.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <limits>

namespace deferfs {

uint64_t probe_max_file_size(int dir_fd) {
  constexpr uint64_t kNoLimit = static_cast<uint64_t>(std::numeric_limits<off_t>::max());
  if (dir_fd < 0) return kNoLimit;
  int fd = openat(dir_fd, ".", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    char name[64];
    std::snprintf(name, sizeof name, "size-probe.%d", static_cast<int>(getpid()));
    fd = openat(dir_fd, name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) return kNoLimit;
    unlinkat(dir_fd, name, 0);
  }
  // Invariant: a size of `ok` is accepted, `bad` is not (or out of range).
  uint64_t ok = 0, bad = kNoLimit + 1;
  while (bad - ok > 1) {
    const uint64_t mid = ok + (bad - ok) / 2;
    if (ftruncate(fd, static_cast<off_t>(mid)) == 0) {
      ok = mid;
    } else if (errno == EFBIG || errno == EINVAL) {
      bad = mid;
    } else {  // another failure (EIO, EPERM...): no limit learnt
      ok = kNoLimit;
      break;
    }
  }
  close(fd);  // unnamed, or already unlinked: its blocks (none) go with it
  return ok;
}

}  // namespace deferfs
