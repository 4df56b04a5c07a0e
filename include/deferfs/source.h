// The backing of a snapshot: where a file's pages are loaded from and
// committed to. FdSource is a source file opened by the daemon; tests
// substitute a fake whose loads complete when the test says.
//
// Thread safety: every method may be called concurrently (pread/pwrite
// semantics, no shared file offset).
#pragma once

#include <sys/types.h>
#include <time.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace deferfs {

// What identifies one version of a source file (spec 5.1). Two identities
// that differ mean the source changed since the snapshot.
struct SourceIdentity {
  dev_t dev = 0;
  ino_t ino = 0;
  uint64_t size = 0;
  struct timespec mtime = {};
  struct timespec ctime = {};
  uint64_t nlink = 0;  // names left; not part of the version (== ignores it)
  bool operator==(const SourceIdentity& o) const;
  bool operator!=(const SourceIdentity& o) const { return !(*this == o); }
};

// One read of a batch (Source::read_batch).
struct ReadRequest {
  void* buf;
  size_t len;
  uint64_t off;
  ssize_t result = 0;  // bytes read (short only at end of file) or -errno
};

// One write of a batch (Source::write_batch): all `len` bytes at `off`.
struct WriteRequest {
  const void* buf;
  size_t len;
  uint64_t off;
  int64_t result = 0;  // bytes written (all of them) or -errno
};

class Source {
 public:
  virtual ~Source() = default;
  // pread: bytes read (short only at end of file) or -errno.
  virtual ssize_t read(void* buf, size_t len, uint64_t off) = 0;
  // A read for the loader, into a segment: `buf` and `off` are aligned to
  // 4 KiB, and the bytes of buf up to the next 4 KiB boundary past len may
  // be written (they lie in the same page). Same result as read(). Sources
  // of files read it with O_DIRECT where the filesystem allows, straight
  // into the segment: no copy through the page cache.
  virtual ssize_t load(void* buf, size_t len, uint64_t off) { return read(buf, len, off); }
  // Reads every request, in any order and concurrently where the source can
  // (io_uring for files). Returns 0, or the first -errno also left in the
  // failing request's result. The default reads one after the other.
  virtual int read_batch(std::vector<ReadRequest>& reqs);
  // The same, and next_data, on the live source file even when reads are
  // served from a private copy: what a commit compares against.
  virtual int read_batch_live(std::vector<ReadRequest>& reqs) { return read_batch(reqs); }
  virtual int64_t next_data_live(uint64_t off) { return next_data(off); }
  // pwrite of all `len` bytes: 0 or -errno.
  virtual int write(const void* buf, size_t len, uint64_t off) = 0;
  // Writes every request (requests must not overlap), one after the other
  // with write() (source.cc says why not io_uring): 0 or the first -errno,
  // also left in the failing request's result. One call, so that a commit
  // can check the source once around many writes.
  virtual int write_batch(std::vector<WriteRequest>& reqs);
  virtual int truncate(uint64_t size) = 0;
  // Makes [off, off+len) read as zeros without changing the size (punches a
  // hole, or writes zeros where the filesystem cannot punch). 0 or -errno.
  virtual int zero(uint64_t off, uint64_t len) = 0;
  virtual int sync() = 0;  // fsync
  // Sets the modification time (a time set through the mount on a staged
  // file, applied after its data). 0 or -errno.
  virtual int set_mtime(const struct timespec& mtime) { (void)mtime; return 0; }
  virtual int identity(SourceIdentity& out) = 0;
  // The same, asking the filesystem rather than a cache of attributes
  // (statx AT_STATX_FORCE_SYNC: a FUSE or network client asks its server):
  // what a commit decides on, under its lock across mounts (issue 13.2).
  virtual int fresh_identity(SourceIdentity& out) { return identity(out); }
  // Offset of the first data byte at or after `off` (SEEK_DATA), the file size
  // if there is none, or -errno. Sources that do not know holes return `off`.
  virtual int64_t next_data(uint64_t off) = 0;
  // Offset of the first hole at or after `off` (SEEK_HOLE; end of file counts).
  virtual int64_t next_hole(uint64_t off) = 0;
  // True if write/truncate can work (the file was opened for writing).
  virtual bool writable() const = 0;
  // True if reads come from a private copy that outside changes cannot
  // reach (a reflink clone): loads need no identity guard.
  virtual bool stable() const { return false; }
  // Takes a new private copy of the source (after a commit, or a new
  // snapshot). 0 or -errno; a no-op for sources without one.
  virtual int refresh() { return 0; }
  // The fd of the live source file on which a commit takes its lock across
  // mounts (an OFD lock: closing other fds of the file does not drop it), or
  // -1 for a source without one.
  virtual int lock_fd() const { return -1; }
  // Drops the kernel's cached pages of the source file: after a change seen
  // from outside, a network client's cache (GlusterFS, NFS) may still hold
  // the old pages, and a new snapshot must not load them.
  virtual void forget_cached() {}
};

// Reads of one file with O_DIRECT, for the loader (Source::load): a cold
// read then costs the daemon no copy from the page cache into the segment
// (a third of its CPU time in a profile of a cold sequential read). Opens
// its own fd on first use; falls back to buffered reads for good where the
// filesystem refuses O_DIRECT or an alignment does not fit.
class DirectReader {
 public:
  DirectReader() = default;
  ~DirectReader();
  DirectReader(const DirectReader&) = delete;
  DirectReader& operator=(const DirectReader&) = delete;
  // Reads [off, off+len) of the file `fd` is open on, as Source::load.
  ssize_t load(int fd, void* buf, size_t len, uint64_t off);

 private:
  int open_direct(int fd);
  std::atomic<int> direct_fd_{-1};       // -1: not opened yet
  std::atomic<bool> unsupported_{false};  // O_DIRECT refused: buffered reads only
};

// A source file of the mounted directory. Owns one fd.
class FdSource final : public Source {
 public:
  // Takes ownership of `fd` (a regular file opened O_RDWR or O_RDONLY).
  FdSource(int fd, bool writable);
  ~FdSource() override;
  FdSource(const FdSource&) = delete;
  FdSource& operator=(const FdSource&) = delete;

  ssize_t read(void* buf, size_t len, uint64_t off) override;
  ssize_t load(void* buf, size_t len, uint64_t off) override { return direct_.load(fd_, buf, len, off); }
  int read_batch(std::vector<ReadRequest>& reqs) override;
  int write(const void* buf, size_t len, uint64_t off) override;
  int truncate(uint64_t size) override;
  int zero(uint64_t off, uint64_t len) override;
  int sync() override;
  int set_mtime(const struct timespec& mtime) override;
  int identity(SourceIdentity& out) override;
  int fresh_identity(SourceIdentity& out) override;
  int64_t next_data(uint64_t off) override;
  int64_t next_hole(uint64_t off) override;
  bool writable() const override { return writable_; }
  int fd() const { return fd_; }
  int lock_fd() const override { return fd_; }
  void forget_cached() override;

 private:
  const int fd_;
  const bool writable_;
  DirectReader direct_;
};

// A snapshot kept as a reflink clone (spec 5.2, snapshot=reflink): reads and
// hole queries go to the clone, writes and the identity to the source.
class CloneSource final : public Source {
 public:
  // Clones `source_fd` (owned from now on) into `clone_name` in `dir_fd`
  // (the source's .deferfs). Throws std::system_error (EOPNOTSUPP, EXDEV
  // when the filesystem cannot clone).
  CloneSource(int source_fd, bool writable, int dir_fd, std::string clone_name);
  ~CloneSource() override;  // removes the clone
  CloneSource(const CloneSource&) = delete;
  CloneSource& operator=(const CloneSource&) = delete;

  ssize_t read(void* buf, size_t len, uint64_t off) override;
  ssize_t load(void* buf, size_t len, uint64_t off) override { return direct_.load(clone_fd_, buf, len, off); }
  int read_batch(std::vector<ReadRequest>& reqs) override;
  int read_batch_live(std::vector<ReadRequest>& reqs) override { return source_.read_batch(reqs); }
  int64_t next_data_live(uint64_t off) override { return source_.next_data(off); }
  int write(const void* buf, size_t len, uint64_t off) override;
  int truncate(uint64_t size) override;
  int zero(uint64_t off, uint64_t len) override;
  int sync() override;
  int set_mtime(const struct timespec& mtime) override;
  int identity(SourceIdentity& out) override;
  int fresh_identity(SourceIdentity& out) override { return source_.fresh_identity(out); }
  int64_t next_data(uint64_t off) override;
  int64_t next_hole(uint64_t off) override;
  bool writable() const override { return source_.writable(); }
  bool stable() const override { return true; }
  int lock_fd() const override { return source_.fd(); }
  int refresh() override;

 private:
  FdSource source_;
  const int dir_fd_;
  const std::string clone_name_;
  int clone_fd_ = -1;
  DirectReader direct_;
};

// Reads a batch from `fd` with io_uring (one submission per window of up
// to 64 reads; short reads and -EAGAIN resubmitted), falling back to pread
// when io_uring is not available. Same contract as Source::read_batch.
int read_batch_fd(int fd, std::vector<ReadRequest>& reqs);

// True if `dir_fd`'s filesystem can clone files (probes with two files).
bool reflink_supported(int dir_fd);

}  // namespace deferfs
