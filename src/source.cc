#include "deferfs/source.h"

#include <fcntl.h>
#include <liburing.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
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

int Source::read_batch(std::vector<ReadRequest>& reqs) {
  int first_err = 0;
  for (ReadRequest& r : reqs) {
    r.result = read(r.buf, r.len, r.off);
    if (r.result < 0 && !first_err) first_err = static_cast<int>(r.result);
  }
  return first_err;
}

namespace {

// A ring per thread: sources are read from several threads at once.
struct Ring {
  io_uring ring{};
  bool ok = false;
  Ring() { ok = io_uring_queue_init(64, &ring, 0) == 0; }
  ~Ring() {
    if (ok) io_uring_queue_exit(&ring);
  }
};

// One pread or pwrite step of a request done without io_uring: bytes moved,
// 0 at end of file (reads), or -errno.
ssize_t sync_step(int fd, ReadRequest& q, size_t done) {
  return pread(fd, static_cast<char*>(q.buf) + done, q.len - done, static_cast<off_t>(q.off + done));
}
ssize_t sync_step(int fd, WriteRequest& q, size_t done) {
  return pwrite(fd, static_cast<const char*>(q.buf) + done, q.len - done, static_cast<off_t>(q.off + done));
}
void prep_step(io_uring_sqe* sqe, int fd, ReadRequest& q, size_t done) {
  io_uring_prep_read(sqe, fd, static_cast<char*>(q.buf) + done, static_cast<unsigned>(q.len - done), q.off + done);
}
// A read ends at end of file (0 bytes: the result is what was read); a write
// that makes no progress is an error.
constexpr bool kIsWrite(const ReadRequest*) { return false; }
constexpr bool kIsWrite(const WriteRequest*) { return true; }

// The whole request with plain pread/pwrite, retried on EINTR/EAGAIN and
// short transfers: bytes moved (a read is short only at end of file) or
// -errno (-EIO for a write that makes no progress).
template <typename Req>
ssize_t transfer_all(int fd, Req& q) {
  size_t done = 0;
  while (done < q.len) {
    ssize_t n = sync_step(fd, q, done);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0) return -errno;
    if (n == 0) {
      if (kIsWrite(&q)) return -EIO;
      break;  // end of file
    }
    done += static_cast<size_t>(n);
  }
  return static_cast<ssize_t>(done);
}

}  // namespace

int read_batch_fd(int fd, std::vector<ReadRequest>& reqs) {
  thread_local Ring r;
  int first_err = 0;
  auto fail = [&](ReadRequest& q, int err) {
    q.result = err;
    if (!first_err) first_err = err;
  };
  if (!r.ok) {  // no io_uring (old kernel, seccomp)
    for (ReadRequest& q : reqs) {
      const ssize_t n = transfer_all(fd, q);
      if (n < 0) fail(q, static_cast<int>(n));
      else q.result = n;
    }
    return first_err;
  }
  // Each request's progress: bytes done so far; resubmitted until full, end
  // of file (reads) or an error.
  std::vector<size_t> done(reqs.size(), 0);
  std::vector<size_t> todo;
  for (size_t i = 0; i < reqs.size(); ++i) todo.push_back(i);
  while (!todo.empty()) {
    std::vector<size_t> again;
    for (size_t start = 0; start < todo.size(); start += 64) {
      size_t end = std::min(todo.size(), start + 64);
      unsigned queued = 0;
      for (size_t k = start; k < end; ++k) {
        io_uring_sqe* sqe = io_uring_get_sqe(&r.ring);
        if (!sqe) break;
        prep_step(sqe, fd, reqs[todo[k]], done[todo[k]]);
        io_uring_sqe_set_data64(sqe, todo[k]);  // per-request context in user_data
        ++queued;
      }
      int rc = io_uring_submit(&r.ring);
      if (rc < 0) return rc;
      for (unsigned c = 0; c < queued; ++c) {
        io_uring_cqe* cqe = nullptr;
        if ((rc = io_uring_wait_cqe(&r.ring, &cqe)) < 0) return rc;
        size_t i = static_cast<size_t>(io_uring_cqe_get_data64(cqe));
        int res = cqe->res;
        io_uring_cqe_seen(&r.ring, cqe);
        ReadRequest& q = reqs[i];
        if (res == -EAGAIN || res == -EINTR) {
          again.push_back(i);
        } else if (res < 0) {
          fail(q, res);
        } else if (res == 0 || done[i] + static_cast<size_t>(res) >= q.len) {
          done[i] += static_cast<size_t>(res);
          q.result = static_cast<decltype(q.result)>(done[i]);  // full, or short at end of file
        } else {
          done[i] += static_cast<size_t>(res);  // short transfer: go on
          again.push_back(i);
        }
      }
    }
    todo = std::move(again);
  }
  return first_err;
}

// One write after the other, for every source. Writes to a file are
// buffered: they land in the page cache and never wait for the disk, so
// io_uring has no I/O to overlap. Worse, ext4 cannot do a buffered write
// without possibly blocking, so io_uring hands each one to an io-wq worker
// thread and pays a wakeup per write: 20,000 scattered 4 KiB writes of a
// sync took 88 ms that way, 41 ms with pwrite (tests/bench/sync_bench.py).
int Source::write_batch(std::vector<WriteRequest>& reqs) {
  for (WriteRequest& q : reqs) {
    q.result = write(q.buf, q.len, q.off);
    if (q.result < 0) return q.result;
    q.result = static_cast<int64_t>(q.len);
  }
  return 0;
}


int FdSource::read_batch(std::vector<ReadRequest>& reqs) { return read_batch_fd(fd_, reqs); }

// ------------------------------------------------------------ DirectReader

namespace {
constexpr uint64_t kDirectAlign = 4096;  // covers every logical block size up to 4 KiB
}  // namespace

DirectReader::~DirectReader() {
  if (int fd = direct_fd_.load(); fd >= 0) close(fd);
}

int DirectReader::open_direct(int fd) {
  int dfd = direct_fd_.load(std::memory_order_acquire);
  if (dfd >= 0) return dfd;
  // Reopen the very file `fd` is open on (it may have no name left).
  const std::string self = "/proc/self/fd/" + std::to_string(fd);
  dfd = open(self.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC | O_NOATIME);
  if (dfd < 0 && errno == EPERM) dfd = open(self.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (dfd < 0) {
    unsupported_.store(true, std::memory_order_relaxed);
    return -1;
  }
  int expected = -1;
  if (!direct_fd_.compare_exchange_strong(expected, dfd)) {
    close(dfd);  // another loader opened it first
    return expected;
  }
  return dfd;
}

ssize_t DirectReader::load(int fd, void* buf, size_t len, uint64_t off) {
  auto addr = reinterpret_cast<uintptr_t>(buf);
  if (unsupported_.load(std::memory_order_relaxed) || addr % kDirectAlign || off % kDirectAlign) {
    ReadRequest q{buf, len, off};
    return transfer_all(fd, q);
  }
  const int dfd = open_direct(fd);
  size_t done = 0;
  while (dfd >= 0 && done < len) {
    const size_t want = (len - done + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
    ssize_t n = pread(dfd, static_cast<char*>(buf) + done, want, static_cast<off_t>(off + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EINVAL) {
      unsupported_.store(true, std::memory_order_relaxed);  // the filesystem refuses O_DIRECT
      break;
    }
    if (n < 0) return -errno;
    if (n == 0) return static_cast<ssize_t>(done);  // end of file
    done += static_cast<size_t>(n);
    if (static_cast<size_t>(n) % kDirectAlign) break;  // short at the end of file
  }
  if (done >= len) return static_cast<ssize_t>(len);
  if (dfd >= 0 && done > 0 && done % kDirectAlign) return static_cast<ssize_t>(done);  // end of file
  // The rest buffered (O_DIRECT refused, or a short read we cannot follow).
  ReadRequest q{static_cast<char*>(buf) + done, len - done, off + done};
  const ssize_t n = transfer_all(fd, q);
  return n < 0 ? n : static_cast<ssize_t>(done) + n;
}

FdSource::FdSource(int fd, bool writable) : fd_(fd), writable_(writable) {}

FdSource::~FdSource() { close(fd_); }

ssize_t FdSource::read(void* buf, size_t len, uint64_t off) {
  ReadRequest q{buf, len, off};
  return transfer_all(fd_, q);
}

int FdSource::write(const void* buf, size_t len, uint64_t off) {
  WriteRequest q{buf, len, off};
  const ssize_t n = transfer_all(fd_, q);
  return n < 0 ? static_cast<int>(n) : 0;
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
  out.nlink = st.st_nlink;
  return 0;
}

void FdSource::forget_cached() { posix_fadvise(fd_, 0, 0, POSIX_FADV_DONTNEED); }

int FdSource::fresh_identity(SourceIdentity& out) {
  struct statx sx;
  if (statx(fd_, "", AT_EMPTY_PATH | AT_STATX_FORCE_SYNC, STATX_BASIC_STATS, &sx) < 0) return identity(out);
  out.dev = makedev(sx.stx_dev_major, sx.stx_dev_minor);
  out.ino = sx.stx_ino;
  out.size = sx.stx_size;
  out.mtime = {static_cast<time_t>(sx.stx_mtime.tv_sec), static_cast<long>(sx.stx_mtime.tv_nsec)};
  out.ctime = {static_cast<time_t>(sx.stx_ctime.tv_sec), static_cast<long>(sx.stx_ctime.tv_nsec)};
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
  // Costs time in proportion to the file's extents, not its bytes. The
  // source's identity is the same before and after the clone, or the clone
  // is taken again: whoever reads the identity next gets the clone's version.
  for (int attempt = 0;; ++attempt) {
    SourceIdentity before, after;
    if (source_.identity(before) < 0 || ioctl(fd, FICLONE, source_.fd()) < 0 || source_.identity(after) < 0) {
      int e = errno;
      close(fd);
      return -e;
    }
    if (before == after || attempt >= 5) break;
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

int CloneSource::read_batch(std::vector<ReadRequest>& reqs) { return read_batch_fd(clone_fd_, reqs); }

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
