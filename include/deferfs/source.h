// The backing of a snapshot: where a file's pages are loaded from and
// committed to. FdSource is a source file opened by the daemon; tests
// substitute a fake whose loads complete when the test says.
//
// Thread safety: every method may be called concurrently (pread/pwrite
// semantics, no shared file offset).
#pragma once

#include <sys/types.h>
#include <time.h>

#include <cstdint>
#include <string>

namespace deferfs {

// What identifies one version of a source file (spec 5.1). Two identities
// that differ mean the source changed since the snapshot.
struct SourceIdentity {
  dev_t dev = 0;
  ino_t ino = 0;
  uint64_t size = 0;
  struct timespec mtime = {};
  struct timespec ctime = {};
  bool operator==(const SourceIdentity& o) const;
  bool operator!=(const SourceIdentity& o) const { return !(*this == o); }
};

class Source {
 public:
  virtual ~Source() = default;
  // pread: bytes read (short only at end of file) or -errno.
  virtual ssize_t read(void* buf, size_t len, uint64_t off) = 0;
  // pwrite of all `len` bytes: 0 or -errno.
  virtual int write(const void* buf, size_t len, uint64_t off) = 0;
  virtual int truncate(uint64_t size) = 0;
  // Makes [off, off+len) read as zeros without changing the size (punches a
  // hole, or writes zeros where the filesystem cannot punch). 0 or -errno.
  virtual int zero(uint64_t off, uint64_t len) = 0;
  virtual int sync() = 0;  // fsync
  // Sets the modification time (a time set through the mount on a staged
  // file, applied after its data). 0 or -errno.
  virtual int set_mtime(const struct timespec& mtime) { (void)mtime; return 0; }
  virtual int identity(SourceIdentity& out) = 0;
  // Offset of the first data byte at or after `off` (SEEK_DATA), the file size
  // if there is none, or -errno. Sources that do not know holes return `off`.
  virtual int64_t next_data(uint64_t off) = 0;
  // Offset of the first hole at or after `off` (SEEK_HOLE; end of file counts).
  virtual int64_t next_hole(uint64_t off) = 0;
  // True if write/truncate can work (the file was opened for writing).
  virtual bool writable() const = 0;
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
  int write(const void* buf, size_t len, uint64_t off) override;
  int truncate(uint64_t size) override;
  int zero(uint64_t off, uint64_t len) override;
  int sync() override;
  int set_mtime(const struct timespec& mtime) override;
  int identity(SourceIdentity& out) override;
  int64_t next_data(uint64_t off) override;
  int64_t next_hole(uint64_t off) override;
  bool writable() const override { return writable_; }
  int fd() const { return fd_; }

 private:
  const int fd_;
  const bool writable_;
};

}  // namespace deferfs
