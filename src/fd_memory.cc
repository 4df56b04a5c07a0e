#include "deferfs/fd_memory.h"

#include <unistd.h>

#include <cerrno>
#include <iterator>
#include <map>

#include "deferfs/mutex.h"

namespace deferfs::fd_memory {

namespace {

struct Range {
  uintptr_t end;
  int fd;
};

// Lock rule: copy_out holds the lock shared across its pread, so remove()
// (exclusive) returns only once no copy reads the fd it is about to close.
SharedMutex g_mu;
std::map<uintptr_t, Range> g_ranges GUARDED_BY(g_mu);  // by start address

}  // namespace

void add(const void* addr, size_t len, int fd) {
  WriterLock lk(g_mu);
  const auto start = reinterpret_cast<uintptr_t>(addr);
  g_ranges[start] = Range{start + len, fd};
}

void remove(const void* addr) {
  WriterLock lk(g_mu);
  g_ranges.erase(reinterpret_cast<uintptr_t>(addr));
}

ssize_t copy_out(void* to, const void* from, size_t len) {
  const auto at = reinterpret_cast<uintptr_t>(from);
  ReaderLock lk(g_mu);
  auto it = g_ranges.upper_bound(at);
  if (it == g_ranges.begin()) return 0;
  it = std::prev(it);
  if (at + len > it->second.end || at + len < at) return 0;
  const off_t off = static_cast<off_t>(at - it->first);
  for (size_t done = 0; done < len;) {
    const ssize_t n = ::pread(it->second.fd, static_cast<char*>(to) + done, len - done, off + static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return -errno;
    if (n == 0) return -EIO;
    done += static_cast<size_t>(n);
  }
  return static_cast<ssize_t>(len);
}

}  // namespace deferfs::fd_memory
