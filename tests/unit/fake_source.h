// A Source for unit tests of the core, without the kernel.
//
// FakeSource is an in-memory file (content + holes + an identity whose mtime
// the test can bump to play an outside change), which counts every call, can
// be told to fail the next read/write/truncate/zero/sync with an errno, and
// has a GATE: while the gate is on, reads that overlap the gated range block
// until the test releases them, so a test can hold a load in the middle and
// force an interleaving (the EdenFS testharness habit of loads that complete
// when the test says).
//
// Content helpers write each page's own number into it (the wendelin tests
// habit), so a wrong page shows up as a wrong number, not as garbage.
//
// Thread safety: every method may be called from any thread. A read blocked
// at the gate holds no lock of the fake: identity(), next_data() and other
// reads proceed meanwhile.
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "deferfs/file.h"
#include "deferfs/source.h"

namespace deferfs::testing {

inline constexpr uint64_t kPage = 4096;

// ---- the page-numbered pattern ----
// Every 8-byte little-endian word of page p (of `page_size` bytes) holds
// kPageTag | p: no page of the pattern is all zeros, and any word names its
// page.
inline constexpr uint64_t kPageTag = 0xD0D0'0000'0000'0000ULL;

// The pattern's bytes at file offset [off, off+len).
std::vector<char> pattern_bytes(uint64_t off, size_t len, uint64_t page_size = kPage);
// A whole file of `bytes` bytes of the pattern.
std::vector<char> page_numbered(uint64_t bytes, uint64_t page_size = kPage);
// The page number held by the 8-byte word at `p` (which must be a pattern word).
uint64_t page_number_at(const char* p);
// Bytes of one page filled with `byte`.
std::vector<char> filled(size_t len, char byte);

struct IoCall {
  uint64_t off = 0;
  uint64_t len = 0;
  bool operator==(const IoCall& o) const { return off == o.off && len == o.len; }
};

struct FakeStats {
  uint64_t reads = 0;          // read() calls, failed and gated ones included
  uint64_t bytes_read = 0;     // bytes returned by successful reads
  uint64_t writes = 0;         // write() calls, failed ones included
  uint64_t bytes_written = 0;  // bytes of successful writes
  uint64_t truncates = 0;
  uint64_t zeros = 0;
  uint64_t syncs = 0;
  uint64_t identities = 0;
};

class FakeSource final : public Source {
 public:
  explicit FakeSource(std::vector<char> content = {}, bool writable = true);
  // A source of `bytes` bytes of the page-numbered pattern.
  static std::unique_ptr<FakeSource> numbered(uint64_t bytes, uint64_t page_size = kPage);

  // ---- Source ----
  ssize_t read(void* buf, size_t len, uint64_t off) override;
  int write(const void* buf, size_t len, uint64_t off) override;
  int truncate(uint64_t size) override;
  int zero(uint64_t off, uint64_t len) override;
  int sync() override;
  int identity(SourceIdentity& out) override;
  int64_t next_data(uint64_t off) override;
  int64_t next_hole(uint64_t off) override;
  bool writable() const override { return writable_; }

  // ---- content (test side; these are not counted) ----
  std::vector<char> content() const;
  std::vector<char> bytes(uint64_t off, size_t len) const;  // zeros past the end
  uint64_t size() const;
  // Marks [off, off+len) a hole: zeros that next_data/next_hole report as a
  // hole (the range is clipped to the size). Setup only: the identity is kept.
  void add_hole(uint64_t off, uint64_t len);
  std::vector<std::pair<uint64_t, uint64_t>> holes() const;  // [start, end), sorted
  // If false, next_data returns off and next_hole the size (a source that
  // does not know holes).
  void set_knows_holes(bool on);

  // ---- changes from outside the mount: content and identity change ----
  void outside_write(uint64_t off, const std::vector<char>& data);
  void outside_truncate(uint64_t size);
  void bump_mtime();  // the identity changes, the bytes do not
  // Successful write/truncate/zero from the core also bump the mtime (as a
  // real filesystem does); failed ones change nothing.

  // ---- counters ----
  FakeStats stats() const;
  std::vector<IoCall> read_log() const;   // every read() call, in order
  std::vector<IoCall> write_log() const;  // successful writes, in order
  std::vector<IoCall> zero_log() const;
  std::vector<uint64_t> truncate_log() const;  // sizes of successful truncates
  void reset_stats();

  // ---- error injection: after `after` more calls succeed, the next
  // `times` calls fail with -err (times < 0: until cleared). err is a
  // positive errno (EIO, ENOSPC). ----
  void fail_reads(int err, int times = 1, int after = 0);
  void fail_writes(int err, int times = 1, int after = 0);
  void fail_truncates(int err, int times = 1, int after = 0);
  void fail_zeros(int err, int times = 1, int after = 0);
  void fail_syncs(int err, int times = 1, int after = 0);
  void fail_identity(int err, int times = 1, int after = 0);
  void clear_failures();

  // ---- the gate ----
  // While on, every read overlapping [off, off+len) blocks until released.
  // after_copy: the read copies the bytes first and then blocks (so a change
  // made while it is blocked is one the reader did not see: a stale read).
  void gate_on(uint64_t off = 0, uint64_t len = std::numeric_limits<uint64_t>::max(),
               bool after_copy = false);
  // Turns the gate off and lets every blocked read through.
  void gate_off();
  // Lets `n` blocked (or future gated) reads through, leaving the gate on.
  void release(size_t n = 1);
  // Reads currently blocked at the gate.
  size_t blocked() const;
  // Waits until at least `n` reads are blocked; false on timeout.
  bool wait_blocked(size_t n, std::chrono::milliseconds timeout = std::chrono::seconds(10)) const;

 private:
  struct Failure {
    int err = 0;
    int times = 0;
    int after = 0;
  };
  // Consumes one failure if armed; returns -err or 0. mu_ held.
  static int take(Failure& f);
  void bump_locked();
  void clip_holes_locked(uint64_t off, uint64_t end);  // [off,end) is data now
  void add_hole_locked(uint64_t off, uint64_t end);
  bool in_gate_locked(uint64_t off, uint64_t len) const;

  const bool writable_;
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::vector<char> data_;                            // guarded by mu_
  std::vector<std::pair<uint64_t, uint64_t>> holes_;  // guarded; sorted, disjoint
  bool knows_holes_ = true;                           // guarded
  uint64_t version_ = 0;                              // guarded: mtime/ctime source
  FakeStats stats_;                                   // guarded
  std::vector<IoCall> read_log_, write_log_, zero_log_;  // guarded
  std::vector<uint64_t> truncate_log_;                // guarded
  Failure fail_read_, fail_write_, fail_truncate_, fail_zero_, fail_sync_, fail_identity_;
  // Blocks a gated read until released. mu_ held (released while waiting).
  void gate_wait_locked(std::unique_lock<std::mutex>& lk);

  bool gate_ = false;      // guarded
  bool gate_after_copy_ = false;  // guarded
  uint64_t gate_off_ = 0;  // guarded
  uint64_t gate_len_ = 0;  // guarded
  size_t tickets_ = 0;     // guarded: reads allowed through the gate
  size_t blocked_ = 0;     // guarded
};

// ---- helpers for tests of File ----

// File::read gathered into bytes. Returns File::read's result; `out` holds
// the bytes read (empty on error).
ssize_t read_bytes(File& f, uint64_t off, size_t len, std::vector<char>& out);
// The bytes of File f at [off, off+len), failing the test (ADD_FAILURE) if
// the read fails or is short.
std::vector<char> read_or_fail(File& f, uint64_t off, size_t len);

// A File over a FakeSource the test keeps a pointer to (the File owns it).
struct FileWithFake {
  FakeSource* fake = nullptr;
  std::shared_ptr<File> file;
};
FileWithFake make_file(std::unique_ptr<FakeSource> src, Counters& counters,
                       const std::string& name = "f", uint64_t page_size = kPage);

}  // namespace deferfs::testing
