// Filling a segment while views map it (segment_fill.h).
#include "deferfs/segment_fill.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <functional>
#include <memory>

#include "deferfs/segment.h"
#include "deferfs/source.h"

namespace deferfs {

namespace {

constexpr uint64_t kBounce = 1 << 20;

ssize_t fill(const std::function<ssize_t(void*, size_t, uint64_t)>& read, int segment_fd, uint64_t off,
             uint64_t len) {
  std::unique_ptr<char[]> buf(new (std::nothrow) char[std::min(len, kBounce)]);
  if (!buf) return -ENOMEM;
  uint64_t done = 0;
  while (done < len) {
    const size_t want = static_cast<size_t>(std::min(len - done, kBounce));
    const ssize_t n = read(buf.get(), want, off + done);
    if (n < 0) {
      errno = static_cast<int>(-n);  // the spill path reads errno
      return n;
    }
    if (const int rc = pwrite_all(segment_fd, buf.get(), static_cast<size_t>(n), off + done); rc < 0) {
      errno = -rc;  // the spill path reads errno
      return rc;
    }
    done += static_cast<uint64_t>(n);
    if (static_cast<size_t>(n) < want) break;  // the end of the source
  }
  return static_cast<ssize_t>(done);
}

}  // namespace

ssize_t read_for_views(Source& src, int segment_fd, uint64_t off, uint64_t len) {
  return fill([&src](void* b, size_t n, uint64_t o) { return src.read(b, n, o); }, segment_fd, off, len);
}

ssize_t read_for_views(int fd, int segment_fd, uint64_t off, uint64_t len) {
  return fill(
      [fd](void* b, size_t n, uint64_t o) {
        for (;;) {
          const ssize_t r = ::pread(fd, b, n, static_cast<off_t>(o));
          if (r >= 0 || errno != EINTR) return r < 0 ? static_cast<ssize_t>(-errno) : r;
        }
      },
      segment_fd, off, len);
}

}  // namespace deferfs
