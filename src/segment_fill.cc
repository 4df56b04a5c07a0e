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

// Loads this small (a random touch: one page, up to 16 KiB pages) reuse a
// buffer their thread keeps: allocated afresh each time, a first touch of a
// view cost 30-40 us more here. Larger ones get a buffer of their own, freed
// at their end, so that no thread (each view has one) holds more than this
// outside every memory limit.
constexpr size_t kKeptBounce = 16 << 10;

struct FreeBuffer {
  void operator()(char* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<char, FreeBuffer>;

Buffer aligned_buffer(size_t bytes) {
  void* mem = nullptr;
  return Buffer(::posix_memalign(&mem, kBounceAlign, bytes) == 0 ? static_cast<char*>(mem) : nullptr);
}

ssize_t fill(const std::function<ssize_t(void*, size_t, uint64_t)>& read, int segment_fd, uint64_t off,
             uint64_t len) {
  // Aligned for O_DIRECT, whole pages: Source::load may write up to the
  // next 4 KiB boundary.
  const size_t cap = static_cast<size_t>((std::min(len, kBounce) + kBounceAlign - 1) / kBounceAlign * kBounceAlign);
  thread_local Buffer kept;  // kKeptBounce bytes once allocated; its thread's own
  Buffer own;
  char* buf;
  if (cap <= kKeptBounce) {
    if (!kept) kept = aligned_buffer(kKeptBounce);
    buf = kept.get();
  } else {
    own = aligned_buffer(cap);
    buf = own.get();
  }
  if (!buf) {
    errno = ENOMEM;  // the spill path reads errno
    return -ENOMEM;
  }
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
