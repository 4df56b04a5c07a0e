#include "deferfs/segment.h"

#include "deferfs/fd_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>

namespace deferfs {

namespace {
// Address space is reserved in large steps: doubling, at least 64 MiB, so a
// growing file is remapped O(log size) times.
constexpr uint64_t kMinCapacity = uint64_t{64} << 20;

uint64_t round_capacity(uint64_t bytes) {
  uint64_t cap = kMinCapacity;
  while (cap < bytes) cap *= 2;
  return cap;
}
}  // namespace

Segment::Segment(const std::string& name, uint64_t capacity) {
  fd_ = memfd_create(("deferfs:" + name).substr(0, 249).c_str(), MFD_CLOEXEC);
  if (fd_ < 0) throw std::system_error(errno, std::generic_category(), "memfd_create for " + name);
  int rc = reserve(capacity);
  if (rc < 0) {
    close(fd_);
    throw std::system_error(-rc, std::generic_category(), "segment mapping for " + name);
  }
}

Segment::Segment(const std::string& shm_path, uint64_t capacity, bool existing) : shm_path_(shm_path) {
  int flags = O_RDWR | O_CLOEXEC | O_NOFOLLOW | (existing ? 0 : O_CREAT | O_TRUNC);
  fd_ = open(shm_path.c_str(), flags, 0600);
  if (fd_ < 0) throw std::system_error(errno, std::generic_category(), shm_path);
  if (existing) {
    struct stat st;
    if (fstat(fd_, &st) == 0 && static_cast<uint64_t>(st.st_size) > capacity)
      capacity = static_cast<uint64_t>(st.st_size);
  }
  int rc = reserve(capacity);
  if (rc < 0) {
    close(fd_);
    throw std::system_error(-rc, std::generic_category(), "segment mapping for " + shm_path);
  }
}

Segment::~Segment() {
  for (const Mapping& m : mappings_) {
    fd_memory::remove(m.addr);
    munmap(m.addr, m.len);
  }
  if (fd_ >= 0) close(fd_);
  if (!shm_path_.empty() && !keep_) unlink(shm_path_.c_str());
}

int Segment::reserve(uint64_t bytes) {
  if (bytes <= capacity_ && base_) return 0;
  uint64_t cap = round_capacity(bytes);
  if (cap < capacity_) cap = capacity_;
  // The memfd is sparse: its size costs nothing until pages are written.
  if (ftruncate(fd_, static_cast<off_t>(cap)) < 0) return -errno;
  void* p = mmap(nullptr, cap, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd_, 0);
  if (p == MAP_FAILED) return -errno;
  base_ = static_cast<char*>(p);
  capacity_ = cap;
  mappings_.push_back({base_, cap});
  fd_memory::add(base_, cap, fd_);  // replies out of the segment are copied by pread (fd_memory.h)
  return 0;
}

void Segment::populate(uint64_t off, uint64_t len) const {
#ifndef MADV_POPULATE_WRITE
  constexpr int MADV_POPULATE_WRITE = 23;  // Linux 5.14; Debian 12's headers may lack it
#endif
  if (off >= capacity_ || len == 0) return;
  len = std::min(len, capacity_ - off);
  madvise(base_ + off, len, MADV_POPULATE_WRITE);
}

int pwrite_all(int fd, const void* buf, size_t len, uint64_t off) {
  for (size_t done = 0; done < len;) {
    const ssize_t k = ::pwrite(fd, static_cast<const char*>(buf) + done, len - done, static_cast<off_t>(off + done));
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) return -errno;
    if (k == 0) return -EIO;
    done += static_cast<size_t>(k);
  }
  return 0;
}

int Segment::write(uint64_t off, const void* buf, size_t len) const {
  if (off > capacity_ || len > capacity_ - off) return -EFBIG;
  return pwrite_all(fd_, buf, len, off);
}

int Segment::punch(uint64_t off, uint64_t len) {
  if (off >= capacity_ || len == 0) return 0;
  if (len > capacity_ - off) len = capacity_ - off;
  if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                static_cast<off_t>(len)) < 0)
    return -errno;
  return 0;
}

uint64_t Segment::resident_bytes() const {
  struct stat st;
  if (fstat(fd_, &st) < 0) return 0;
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

}  // namespace deferfs
