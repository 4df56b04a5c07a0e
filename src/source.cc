#include "deferfs/source.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <system_error>

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

CloneSource::CloneSource(int source_fd, bool writable, int dir_fd, std::string clone_name)
    : source_(source_fd, writable), dir_fd_(dir_fd), clone_name_(std::move(clone_name)) {
  if (int rc = refresh(); rc < 0)
    throw std::system_error(-rc, std::generic_category(), "reflink clone " + clone_name_);
}

CloneSource::~CloneSource() {
  if (clone_fd_ >= 0) close(clone_fd_);
  unlinkat(dir_fd_, clone_name_.c_str(), 0);
}

int CloneSource::refresh() {
  int fd = openat(dir_fd_, clone_name_.c_str(), O_CREAT | O_RDWR | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return -errno;
  // Costs time in proportion to the file's extents, not its bytes.
  if (ioctl(fd, FICLONE, source_.fd()) < 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  if (clone_fd_ >= 0) close(clone_fd_);
  clone_fd_ = fd;
  return 0;
}

ssize_t CloneSource::read(void* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(clone_fd_, static_cast<char*>(buf) + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return static_cast<ssize_t>(done);
}

int CloneSource::write(const void* buf, size_t len, uint64_t off) { return source_.write(buf, len, off); }
int CloneSource::truncate(uint64_t size) { return source_.truncate(size); }
int CloneSource::zero(uint64_t off, uint64_t len) { return source_.zero(off, len); }
int CloneSource::sync() { return source_.sync(); }
int CloneSource::set_mtime(const struct timespec& mtime) { return source_.set_mtime(mtime); }
int CloneSource::identity(SourceIdentity& out) { return source_.identity(out); }

int64_t CloneSource::next_data(uint64_t off) {
  off_t r = lseek(clone_fd_, static_cast<off_t>(off), SEEK_DATA);
  if (r >= 0) return r;
  if (errno == ENXIO) {
    struct stat st;
    if (fstat(clone_fd_, &st) < 0) return -errno;
    return st.st_size > static_cast<off_t>(off) ? st.st_size : static_cast<int64_t>(off);
  }
  return static_cast<int64_t>(off);
}

int64_t CloneSource::next_hole(uint64_t off) {
  off_t r = lseek(clone_fd_, static_cast<off_t>(off), SEEK_HOLE);
  return r >= 0 ? r : static_cast<int64_t>(off);
}

bool reflink_supported(int dir_fd) {
  const char* a = "reflink-probe.a";
  const char* b = "reflink-probe.b";
  int fa = openat(dir_fd, a, O_CREAT | O_RDWR | O_TRUNC | O_CLOEXEC, 0600);
  int fb = openat(dir_fd, b, O_CREAT | O_RDWR | O_TRUNC | O_CLOEXEC, 0600);
  bool ok = false;
  if (fa >= 0 && fb >= 0) {
    char block[4096] = {1};
    ok = pwrite(fa, block, sizeof block, 0) == static_cast<ssize_t>(sizeof block) && ioctl(fb, FICLONE, fa) == 0;
  }
  if (fa >= 0) close(fa);
  if (fb >= 0) close(fb);
  unlinkat(dir_fd, a, 0);
  unlinkat(dir_fd, b, 0);
  return ok;
}

}  // namespace deferfs
