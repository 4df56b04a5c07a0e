#include "deferfs/journal.h"

#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstring>
#include <functional>

namespace deferfs {

namespace {

constexpr char kMagic[4] = {'D', 'F', 'J', '1'};
// Version 2 sums the body with xxh3-64 (about twice as fast as xxh64 here);
// version 1, written before, with xxh64. Both are read.
constexpr uint32_t kVersion = 2;
constexpr size_t kHeaderBytes = 8;
constexpr size_t kTrailerBytes = 1 + 8 + 8;
constexpr size_t kBufBytes = 1 << 20;
constexpr uint64_t kMaxPath = 1 << 16;

int write_all(int fd, const char* p, size_t n, uint64_t off) {
  while (n) {
    ssize_t w = pwrite(fd, p, n, static_cast<off_t>(off));
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return -errno;
    if (w == 0) return -EIO;
    p += w;
    n -= static_cast<size_t>(w);
    off += static_cast<uint64_t>(w);
  }
  return 0;
}

int read_all(int fd, char* p, size_t n, uint64_t off) {
  while (n) {
    ssize_t r = pread(fd, p, n, static_cast<off_t>(off));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -errno;
    if (r == 0) return -EIO;  // truncated
    p += r;
    n -= static_cast<size_t>(r);
    off += static_cast<uint64_t>(r);
  }
  return 0;
}

// Sequential reader of the journal body with bounds checks. It reads a
// window of the file at a time (one pread for many small records) and hands
// out data in place: a pointer from view() stays valid until the window
// moves on, and before it moves the reader calls `on_move` (replay then lets
// its target write out what it still holds of the old window).
class Reader {
 public:
  // The window is no larger than the body: the sync of one page (an fsync
  // through the mount) does not pay for 16 MiB.
  Reader(int fd, uint64_t end, std::function<int()> on_move)
      : fd_(fd),
        end_(end),
        cap_(static_cast<size_t>(std::min<uint64_t>(kWindowBytes, end - std::min<uint64_t>(end, kHeaderBytes)))),
        buf_(new char[std::max<size_t>(cap_, 1)]),
        on_move_(std::move(on_move)) {}
  // The next `n` bytes (n <= kWindowBytes), in place.
  int view(uint64_t n, const char** out) {
    if (n > end_ - pos_ || n > cap_) return -EINVAL;
    if (pos_ < buf_off_ || pos_ + n > buf_off_ + buf_len_) {
      if (int rc = on_move_(); rc < 0) return rc;
      const size_t want = static_cast<size_t>(std::min<uint64_t>(cap_, end_ - pos_));
      if (int rc = read_all(fd_, buf_.get(), want, pos_); rc < 0) return rc;
      buf_off_ = pos_;
      buf_len_ = want;
    }
    *out = buf_.get() + (pos_ - buf_off_);
    pos_ += n;
    return 0;
  }
  // The next `n` bytes, copied out (small fields).
  int get(void* out, uint64_t n) {
    const char* p = nullptr;
    if (int rc = view(n, &p); rc < 0) return rc;
    std::memcpy(out, p, n);
    return 0;
  }
  uint64_t pos() const { return pos_; }
  uint64_t left() const { return end_ - pos_; }
  void seek(uint64_t p) { pos_ = p; }

 private:
  // A window holds many records: sixteen 1 MiB writes, or 4 KiB pages
  // coming with their headers.
  static constexpr size_t kWindowBytes = size_t{16} << 20;
  int fd_;
  uint64_t end_;
  uint64_t pos_ = kHeaderBytes;
  size_t cap_;                    // the window's size
  std::unique_ptr<char[]> buf_;  // the window (not zeroed: every byte used is read first)
  uint64_t buf_off_ = 0;
  uint64_t buf_len_ = 0;
  std::function<int()> on_move_;
};

}  // namespace

struct JournalWriter::Hasher {
  XXH3_state_t* state = XXH3_createState();
  Hasher() { XXH3_64bits_reset(state); }
  ~Hasher() { XXH3_freeState(state); }
};

JournalWriter::JournalWriter(int dirfd, std::string name)
    : dirfd_(dirfd), name_(std::move(name)), hash_(std::make_unique<Hasher>()) {
  fd_ = openat(dirfd_, name_.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
  if (fd_ < 0) {
    err_ = -errno;
    return;
  }
  buf_.reserve(kBufBytes);
  char header[kHeaderBytes];
  std::memcpy(header, kMagic, 4);
  std::memcpy(header + 4, &kVersion, 4);
  err_ = write_all(fd_, header, sizeof header, 0);
  file_off_ = kHeaderBytes;
}

JournalWriter::~JournalWriter() {
  if (fd_ >= 0) close(fd_);
  if (!committed_) unlinkat(dirfd_, name_.c_str(), 0);
}

void JournalWriter::flush() {
  if (buf_.empty() || err_) return;
  err_ = write_all(fd_, buf_.data(), buf_.size(), file_off_);
  file_off_ += buf_.size();
  buf_.clear();
  start_writeback();
}

// The disk starts on what is written while the rest is being produced, so
// commit()'s fsync waits only for the tail. A hint: errors are left to fsync.
void JournalWriter::start_writeback() {
  if (file_off_ - writeback_off_ < kWritebackStep) return;
  (void)sync_file_range(fd_, static_cast<off_t>(writeback_off_), static_cast<off_t>(file_off_ - writeback_off_),
                        SYNC_FILE_RANGE_WRITE);
  writeback_off_ = file_off_;
}

void JournalWriter::put(const void* p, size_t n) {
  if (err_) return;
  XXH3_64bits_update(hash_->state, p, n);
  body_len_ += n;
  const char* c = static_cast<const char*>(p);
  if (buf_.size() + n > kBufBytes) flush();
  if (n >= kBufBytes) {  // large data goes straight to the file
    if (!err_) err_ = write_all(fd_, c, n, file_off_);
    file_off_ += n;
    start_writeback();
    return;
  }
  buf_.insert(buf_.end(), c, c + n);
}

void JournalWriter::begin_file(const std::string& path, dev_t dev, ino_t ino, uint64_t final_size) {
  const char tag = 'F';
  const uint32_t len = static_cast<uint32_t>(path.size());
  const uint64_t d = dev, i = ino;
  put(&tag, 1);
  put(&len, 4);
  put(path.data(), path.size());
  put(&d, 8);
  put(&i, 8);
  put(&final_size, 8);
}

void JournalWriter::zero(uint64_t off, uint64_t len) {
  const char tag = 'Z';
  put(&tag, 1);
  put(&off, 8);
  put(&len, 8);
}

void JournalWriter::write(uint64_t off, const char* data, uint64_t len) {
  const char tag = 'W';
  put(&tag, 1);
  put(&off, 8);
  put(&len, 8);
  put(data, len);
}

void JournalWriter::mtime(const struct timespec& ts) {
  const char tag = 'M';
  const uint64_t sec = static_cast<uint64_t>(ts.tv_sec), nsec = static_cast<uint64_t>(ts.tv_nsec);
  put(&tag, 1);
  put(&sec, 8);
  put(&nsec, 8);
}

void JournalWriter::end_file() {
  const char tag = 'E';
  put(&tag, 1);
}

int JournalWriter::commit() {
  flush();
  if (err_) return err_;
  char trailer[kTrailerBytes];
  trailer[0] = 'T';
  const uint64_t sum = XXH3_64bits_digest(hash_->state);
  std::memcpy(trailer + 1, &body_len_, 8);
  std::memcpy(trailer + 9, &sum, 8);
  if ((err_ = write_all(fd_, trailer, sizeof trailer, file_off_)) < 0) return err_;
  if (fsync(fd_) < 0) return err_ = -errno;
  // The journal's name must be durable too.
  if (fsync(dirfd_) < 0 && errno != EINVAL && errno != EBADF) return err_ = -errno;
  committed_ = true;
  return 0;
}

int JournalWriter::retire() {
  if (unlinkat(dirfd_, name_.c_str(), 0) < 0 && errno != ENOENT) return -errno;
  if (fsync(dirfd_) < 0 && errno != EINVAL && errno != EBADF) return -errno;
  return 0;
}

namespace {

// Opens and validates; returns the fd (caller closes) or -errno, with the
// body's end in *body_end.
int open_complete(int dirfd, const std::string& name, uint64_t* body_end, std::string& why, bool verify_sum = true) {
  int fd = openat(dirfd, name.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return -errno;
  struct stat st;
  if (fstat(fd, &st) < 0) {
    int e = -errno;
    close(fd);
    return e;
  }
  // Only a journal this user wrote is replayed (anyone who can write the
  // source root must not be able to plant one for a root daemon).
  if (st.st_uid != geteuid() || !S_ISREG(st.st_mode)) {
    why = "not a regular file owned by uid " + std::to_string(geteuid());
    close(fd);
    return -EPERM;
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  char header[kHeaderBytes], trailer[kTrailerBytes];
  if (size < kHeaderBytes + kTrailerBytes || read_all(fd, header, sizeof header, 0) < 0 ||
      std::memcmp(header, kMagic, 4) != 0) {
    why = "no valid header";
    close(fd);
    return -EINVAL;
  }
  uint32_t version;
  std::memcpy(&version, header + 4, 4);
  if (version != 1 && version != 2) {
    why = "unknown version " + std::to_string(version);
    close(fd);
    return -EINVAL;
  }
  if (read_all(fd, trailer, sizeof trailer, size - kTrailerBytes) < 0 || trailer[0] != 'T') {
    why = "no trailer (the sync never committed)";
    close(fd);
    return -EINVAL;
  }
  uint64_t body_len, sum;
  std::memcpy(&body_len, trailer + 1, 8);
  std::memcpy(&sum, trailer + 9, 8);
  if (body_len != size - kHeaderBytes - kTrailerBytes) {
    why = "its length does not match its trailer";
    close(fd);
    return -EINVAL;
  }
  if (!verify_sum) {
    *body_end = kHeaderBytes + body_len;
    return fd;
  }
  XXH64_state_t* st64 = XXH64_createState();
  XXH3_state_t* st3 = XXH3_createState();
  XXH64_reset(st64, 0);
  XXH3_64bits_reset(st3);
  std::vector<char> buf(kBufBytes);
  bool readable = true;
  for (uint64_t pos = kHeaderBytes; pos < kHeaderBytes + body_len && readable;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), kHeaderBytes + body_len - pos));
    readable = read_all(fd, buf.data(), n, pos) == 0;
    if (version == 1)
      XXH64_update(st64, buf.data(), n);
    else
      XXH3_64bits_update(st3, buf.data(), n);
    pos += n;
  }
  const uint64_t got = version == 1 ? XXH64_digest(st64) : XXH3_64bits_digest(st3);
  XXH64_freeState(st64);
  XXH3_freeState(st3);
  if (!readable) {
    why = "unreadable";
    close(fd);
    return -EIO;
  }
  if (got != sum) {
    why = "checksum mismatch";
    close(fd);
    return -EINVAL;
  }
  *body_end = kHeaderBytes + body_len;
  return fd;
}

}  // namespace

JournalCheck check_journal(int dirfd, const std::string& name, std::string& why) {
  uint64_t end;
  int fd = open_complete(dirfd, name, &end, why);
  if (fd >= 0) {
    close(fd);
    return JournalCheck::Complete;
  }
  if (fd == -ENOENT) return JournalCheck::Missing;
  if (why.empty()) why = std::strerror(-fd);
  return JournalCheck::Incomplete;
}

int replay_journal(int dirfd, const std::string& name, JournalTarget& target, uint64_t* files,
                   uint64_t* bytes, bool verify_sum) {
  std::string why;
  uint64_t end;
  int jfd = open_complete(dirfd, name, &end, why, verify_sum);
  if (jfd < 0) return jfd;
  Reader r(jfd, end, [&target] { return target.release(); });
  int rc = 0;
  bool skipping = true;  // until an 'F' record selects a file
  uint64_t final_size = 0;
  bool has_mtime = false;
  struct timespec mtime = {};
  std::string path;
  if (files) *files = 0;
  if (bytes) *bytes = 0;
  while (rc == 0 && r.left() > 0) {
    char tag;
    if ((rc = r.get(&tag, 1)) < 0) break;
    switch (tag) {
      case 'F': {
        uint32_t len;
        uint64_t dev, ino;
        if ((rc = r.get(&len, 4)) < 0) break;
        if (len > kMaxPath) { rc = -EINVAL; break; }
        path.resize(len);
        if ((rc = r.get(path.data(), len)) < 0 || (rc = r.get(&dev, 8)) < 0 || (rc = r.get(&ino, 8)) < 0 ||
            (rc = r.get(&final_size, 8)) < 0)
          break;
        has_mtime = false;
        int o = target.open(path, static_cast<dev_t>(dev), static_cast<ino_t>(ino));
        if (o < 0) rc = o;
        skipping = o != 0;
        break;
      }
      case 'Z': {
        uint64_t off, len;
        if ((rc = r.get(&off, 8)) < 0 || (rc = r.get(&len, 8)) < 0) break;
        if (!skipping) rc = target.zero(off, len);
        break;
      }
      case 'W': {
        uint64_t off, len;
        if ((rc = r.get(&off, 8)) < 0 || (rc = r.get(&len, 8)) < 0) break;
        if (len > r.left()) { rc = -EINVAL; break; }
        if (skipping) {
          r.seek(r.pos() + len);
          break;
        }
        for (uint64_t done = 0; done < len && rc == 0;) {
          size_t n = static_cast<size_t>(std::min<uint64_t>(kBufBytes, len - done));
          const char* data = nullptr;
          if ((rc = r.view(n, &data)) == 0) rc = target.write(off + done, data, n);
          if (rc == 0 && bytes) *bytes += n;
          done += n;
        }
        break;
      }
      case 'M': {
        uint64_t sec, nsec;
        if ((rc = r.get(&sec, 8)) < 0 || (rc = r.get(&nsec, 8)) < 0) break;
        if (nsec >= 1000000000) { rc = -EINVAL; break; }
        mtime.tv_sec = static_cast<time_t>(sec);
        mtime.tv_nsec = static_cast<long>(nsec);
        has_mtime = true;
        break;
      }
      case 'E': {
        if (!skipping) {
          rc = target.finish(final_size, has_mtime ? &mtime : nullptr);
          if (rc == 0 && files) ++*files;
        }
        skipping = true;
        break;
      }
      default:
        rc = -EINVAL;
    }
  }
  if (rc == 0) rc = target.release();
  close(jfd);
  return rc;
}

PathJournalTarget::~PathJournalTarget() {
  if (fd_ >= 0) close(fd_);
}

// A journal names files relative to the source root: no absolute path, no
// "..", "." or empty component (a journal is data, never trusted to leave
// the source).
static bool safe_relative(const std::string& path) {
  if (path.empty() || path[0] == '/') return false;
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    std::string part = path.substr(start, end - start);
    if (part.empty() || part == "." || part == "..") return false;
    start = end + 1;
  }
  return true;
}

int PathJournalTarget::open(const std::string& path, dev_t dev, ino_t ino) {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
  if (!safe_relative(path)) {
    skipped.push_back(path);
    return 1;
  }
  // Resolved beneath the source root, no symlink followed on the way.
  struct open_how how = {};
  how.flags = O_WRONLY | O_CLOEXEC | O_NOFOLLOW;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
  fd_ = static_cast<int>(syscall(SYS_openat2, root_fd_, path.c_str(), &how, sizeof how));
  struct stat st;
  // The device number is not compared: the clients of a distributed
  // filesystem show one file under different ones (another mount's journal
  // is finished by this one, issue 13); the path and inode number are.
  (void)dev;
  if (fd_ < 0 || fstat(fd_, &st) < 0 || st.st_ino != ino) {
    skipped.push_back(path);
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
    return 1;
  }
  // Serialized with another mount's apply of the same file (committer.h):
  // the lock goes when fd_ is closed.
  struct flock fl = {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  while (fcntl(fd_, F_OFD_SETLKW, &fl) < 0 && errno == EINTR) {
  }
  return 0;
}

int PathJournalTarget::zero(uint64_t off, uint64_t len) {
  if (fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                static_cast<off_t>(len)) == 0)
    return 0;
  if (errno != EOPNOTSUPP) return -errno;
  std::vector<char> zeros(std::min<uint64_t>(len, kBufBytes), 0);
  for (uint64_t done = 0; done < len;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(zeros.size(), len - done));
    if (int rc = write_all(fd_, zeros.data(), n, off + done); rc < 0) return rc;
    done += n;
  }
  return 0;
}

int PathJournalTarget::write(uint64_t off, const char* data, uint64_t len) {
  return write_all(fd_, data, len, off);
}

int PathJournalTarget::finish(uint64_t final_size, const struct timespec* mtime) {
  struct stat st;
  if (fstat(fd_, &st) < 0) return -errno;
  if (static_cast<uint64_t>(st.st_size) != final_size && ftruncate(fd_, static_cast<off_t>(final_size)) < 0)
    return -errno;
  if (mtime) {
    struct timespec ts[2] = {{0, UTIME_OMIT}, *mtime};
    if (futimens(fd_, ts) < 0) return -errno;
  }
  return fsync(fd_) < 0 ? -errno : 0;
}

}  // namespace deferfs
