#include "deferfs/source.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace deferfs {

bool SourceIdentity::operator==(const SourceIdentity& o) const {
  return dev == o.dev && ino == o.ino && size == o.size && mtime.tv_sec == o.mtime.tv_sec &&
         mtime.tv_nsec == o.mtime.tv_nsec && ctime.tv_sec == o.ctime.tv_sec &&
         ctime.tv_nsec == o.ctime.tv_nsec;
}

FdSource::FdSource(int fd, bool writable) : fd_(fd), writable_(writable) {}

FdSource::~FdSource() { close(fd_); }

ssize_t FdSource::read(void* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd_, static_cast<char*>(buf) + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return -errno;
    }
    if (n == 0) break;  // end of file
    done += static_cast<size_t>(n);
  }
  return static_cast<ssize_t>(done);
}

int FdSource::write(const void* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pwrite(fd_, static_cast<const char*>(buf) + done, len - done,
                       static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return -errno;
    }
    if (n == 0) return -EIO;
    done += static_cast<size_t>(n);
  }
  return 0;
}

int FdSource::truncate(uint64_t size) {
  return ftruncate(fd_, static_cast<off_t>(size)) < 0 ? -errno : 0;
}

int FdSource::zero(uint64_t off, uint64_t len) {
  if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                static_cast<off_t>(len)) == 0)
    return 0;
  if (errno != EOPNOTSUPP && errno != ENOSYS) return -errno;
  static const char zeros[65536] = {};
  for (uint64_t done = 0; done < len;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(sizeof zeros, len - done));
    if (int rc = write(zeros, n, off + done); rc < 0) return rc;
    done += n;
  }
  return 0;
}

int FdSource::set_mtime(const struct timespec& mtime) {
  struct timespec ts[2] = {{0, UTIME_OMIT}, mtime};
  return futimens(fd_, ts) < 0 ? -errno : 0;
}

int FdSource::sync() { return fsync(fd_) < 0 ? -errno : 0; }

int FdSource::identity(SourceIdentity& out) {
  struct stat st;
  if (fstat(fd_, &st) < 0) return -errno;
  out.dev = st.st_dev;
  out.ino = st.st_ino;
  out.size = static_cast<uint64_t>(st.st_size);
  out.mtime = st.st_mtim;
  out.ctime = st.st_ctim;
  return 0;
}

int64_t FdSource::next_data(uint64_t off) {
  off_t r = lseek(fd_, static_cast<off_t>(off), SEEK_DATA);
  if (r >= 0) return r;
  if (errno == ENXIO) {  // no data at or after off
    struct stat st;
    if (fstat(fd_, &st) < 0) return -errno;
    return st.st_size > static_cast<off_t>(off) ? st.st_size : static_cast<int64_t>(off);
  }
  if (errno == EINVAL || errno == EOPNOTSUPP) return static_cast<int64_t>(off);
  return -errno;
}

int64_t FdSource::next_hole(uint64_t off) {
  off_t r = lseek(fd_, static_cast<off_t>(off), SEEK_HOLE);
  if (r >= 0) return r;
  if (errno == ENXIO) return static_cast<int64_t>(off);
  return -errno;
}

}  // namespace deferfs
