// The shared-memory segment of one file: a memfd that holds the file's
// resident pages at their file offsets, mapped into the daemon.
//
// Ownership: a Segment owns its memfd and every mapping it ever made.
// Growth maps a larger view of the same memfd and keeps the old views until
// destruction, so a pointer obtained from data() stays valid (and coherent,
// it is the same memory) for the Segment's whole life: in-flight replies may
// keep reading through it without a lock. The memfd is never shrunk (a
// mapping past its end would SIGBUS); freed ranges are punched out instead.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace deferfs {

// pwrite of all of [buf, buf+len) at off, EINTR retried: 0 or -errno.
int pwrite_all(int fd, const void* buf, size_t len, uint64_t off);

class Segment {
 public:
  // Creates the memfd (named for /proc/PID/fd listings) with room for
  // `capacity` bytes. Throws std::system_error naming `name`.
  Segment(const std::string& name, uint64_t capacity);
  // A named segment: the shared-memory file `shm_path` (in /dev/shm), created
  // empty or, with `existing`, opened as a previous daemon left it. Throws
  // std::system_error naming the path.
  Segment(const std::string& shm_path, uint64_t capacity, bool existing);
  ~Segment();  // a named segment's file is removed unless keep()
  // Keep a named segment's file when this object ends (staged data in it).
  void keep(bool k) { keep_ = k; }
  const std::string& shm_path() const { return shm_path_; }
  // The named segment's file was renamed to `path`.
  void renamed(std::string path) { shm_path_ = std::move(path); }
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  // Makes bytes [0, bytes) addressable. Caller holds the owning File's lock.
  // Returns 0 or -errno (ENOMEM when no address space is left).
  int reserve(uint64_t bytes);

  char* data() const { return base_; }
  int fd() const { return fd_; }
  uint64_t capacity() const { return capacity_; }

  // Frees [off, off+len) (clipped to capacity): memory returns to the
  // system, the range reads as zeros. Returns 0 or -errno.
  int punch(uint64_t off, uint64_t len);

  // Allocates the memory of [off, off+len) (page-aligned, within capacity)
  // and maps it in the daemon's view in one call, instead of one page fault
  // per page when it is first written. A hint: failure is ignored (the
  // writes then fault as usual). Called with the range's pages Loading.
  void populate(uint64_t off, uint64_t len) const;

  // Writes [off, off+len) (within capacity) through the segment's fd, not
  // its mapping: a page written whole this way is allocated and filled in
  // one step, with no page fault and no zeroing first (profile of 1 MiB
  // writes of new pages: faults and zeroing were a third of the daemon's
  // time), and a view never sees it half written. Returns 0 or -errno
  // (ENOSPC when /dev/shm is full, where a write through the mapping would
  // raise SIGBUS).
  int write(uint64_t off, const void* buf, size_t len) const;

  // Bytes of memory the segment holds, as the kernel counts them.
  uint64_t resident_bytes() const;

 private:
  int fd_ = -1;
  std::string shm_path_;     // empty for a memfd
  bool keep_ = false;
  char* base_ = nullptr;     // the current (largest) mapping
  uint64_t capacity_ = 0;
  struct Mapping { char* addr; uint64_t len; };
  std::vector<Mapping> mappings_;  // all mappings, the current one last
};

}  // namespace deferfs
