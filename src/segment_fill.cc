// Filling a segment while views map it (segment_fill.h).
#include "deferfs/segment_fill.h"

#include <stdlib.h>
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
constexpr size_t kBounceAlign = 4096;  // Source::load's alignment (O_DIRECT)

// One bounce buffer per loading thread, kept between loads and grown to the
// largest load it has served (at most kBounce): a fresh buffer per load cost
// a page fault per 4 KiB of it each time. Owned by its thread; freed at the
// thread's exit.
struct Bounce {
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> buf;
  size_t cap = 0;

  char* get(size_t want) {
    if (want <= cap) return buf.get();
    void* p = nullptr;
    if (::posix_memalign(&p, kBounceAlign, want) != 0) return nullptr;
    buf.reset(static_cast<char*>(p));
    cap = want;
    return buf.get();
  }
};

ssize_t fill(const std::function<ssize_t(void*, size_t, uint64_t)>& read, int segment_fd, uint64_t off,
             uint64_t len) {
  thread_local Bounce bounce;
  // Whole pages: Source::load may write up to the next 4 KiB boundary.
  const size_t cap = static_cast<size_t>((std::min(len, kBounce) + kBounceAlign - 1) / kBounceAlign * kBounceAlign);
  char* buf = bounce.get(cap);
  if (!buf) return -ENOMEM;
  uint64_t done = 0;
  while (done < len) {
    const size_t want = static_cast<size_t>(std::min(len - done, kBounce));
    const ssize_t n = read(buf, want, off + done);
    if (n < 0) {
      errno = static_cast<int>(-n);  // the spill path reads errno
      return n;
    }
    if (const int rc = pwrite_all(segment_fd, buf, static_cast<size_t>(n), off + done); rc < 0) {
      errno = -rc;  // the spill path reads errno
      return rc;
    }
    done += static_cast<uint64_t>(n);
    if (static_cast<size_t>(n) < want) break;  // the end of the source
  }
  return static_cast<ssize_t>(done);
}

}  // namespace

// The loader's read (O_DIRECT where the source allows: no copy through the
// source's page cache, no page of it allocated), into the aligned bounce
// buffer; `off` is page-aligned, as Source::load wants.
ssize_t read_for_views(Source& src, int segment_fd, uint64_t off, uint64_t len) {
  return fill([&src](void* b, size_t n, uint64_t o) { return src.load(b, n, o); }, segment_fd, off, len);
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
