// The sync journal (spec 6.3): a redo log on the source filesystem that makes
// one sync atomic across every file it commits.
//
// A sync writes the changed pages of all its files into
// <source>/.deferfs/journal, ends it with a trailer holding the body's length
// and checksum, fsyncs it (and the directory), then replays it in place (the
// same code recovery uses), fsyncs every file, and removes the journal. A
// crash before the trailer is durable leaves every source file untouched (the
// incomplete journal is ignored at the next mount); after it, the next mount
// replays the journal and every file is new. Replay is idempotent. Cost:
// changed pages are written twice.
//
// Format (little-endian), a stream of records after an 8-byte header:
//   header  "DFJ1" u32 version (2; 1 is still read: its sum is xxh64)
//   'F' u32 path_len, path, u64 dev, u64 ino, u64 final_size  -- a file begins
//   'Z' u64 off, u64 len                                        -- must read as zeros
//   'W' u64 off, u64 len, data[len]                             -- write these bytes
//   'M' u64 sec, u64 nsec                                       -- the mtime to set after the data
//   'E'                                                         -- file ends: truncate to final_size, (mtime), fsync
//   'T' u64 body_len, u64 xxh3_64(body)                         -- trailer; body = all records before it
#pragma once

#include <sys/types.h>
#include <time.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace deferfs {

inline constexpr const char* kJournalName = "journal";

class JournalWriter {
 public:
  // Creates (replacing) `name` in `dirfd`. Throws nothing: check error().
  JournalWriter(int dirfd, std::string name);
  ~JournalWriter();  // an uncommitted journal is removed
  JournalWriter(const JournalWriter&) = delete;
  JournalWriter& operator=(const JournalWriter&) = delete;

  int error() const { return err_; }  // 0 or -errno of the first failure
  void begin_file(const std::string& path, dev_t dev, ino_t ino, uint64_t final_size);
  void zero(uint64_t off, uint64_t len);
  void write(uint64_t off, const char* data, uint64_t len);
  void mtime(const struct timespec& ts);
  void end_file();
  // Writes the trailer, fsyncs the journal and its directory: from here on
  // the sync is decided. Returns 0 or -errno.
  int commit();
  // Removes the journal file (after a successful replay). 0 or -errno.
  int retire();
  uint64_t bytes() const { return body_len_; }

 private:
  void put(const void* p, size_t n);
  void flush();
  void start_writeback();
  static constexpr uint64_t kWritebackStep = uint64_t{8} << 20;

  const int dirfd_;
  const std::string name_;
  int fd_ = -1;
  int err_ = 0;
  bool committed_ = false;
  std::vector<char> buf_;
  uint64_t file_off_ = 0;   // where buf_ goes in the file
  uint64_t writeback_off_ = 0;  // the disk was asked to write up to here
  uint64_t body_len_ = 0;
  struct Hasher;
  std::unique_ptr<Hasher> hash_;
};

// What replay does to the files a journal names. Every call returns 0 or
// -errno; an error stops the replay.
struct JournalTarget {
  virtual ~JournalTarget() = default;
  // Selects the file the 'F' record names. 1 = skip it (recovery: the file
  // is gone, or the name is another file now), 0 = go, -errno = stop.
  virtual int open(const std::string& path, dev_t dev, ino_t ino) = 0;
  virtual int zero(uint64_t off, uint64_t len) = 0;
  // `data` lies in the replay's window of the journal and stays valid until
  // the next release(): a target may gather writes and do them together.
  virtual int write(uint64_t off, const char* data, uint64_t len) = 0;
  // The window moves on (or the replay ends): write out every write still
  // held. Default: nothing is held.
  virtual int release() { return 0; }
  // The record ended: make the size `final_size`, set the mtime if one was
  // journaled, and fsync.
  virtual int finish(uint64_t final_size, const struct timespec* mtime) = 0;
};

// A JournalTarget that opens files by path below a directory (recovery at
// mount, before anything is served).
class PathJournalTarget : public JournalTarget {
 public:
  explicit PathJournalTarget(int root_fd) : root_fd_(root_fd) {}
  ~PathJournalTarget() override;
  int open(const std::string& path, dev_t dev, ino_t ino) override;
  int zero(uint64_t off, uint64_t len) override;
  int write(uint64_t off, const char* data, uint64_t len) override;
  int finish(uint64_t final_size, const struct timespec* mtime) override;
  std::vector<std::string> skipped;  // files named by the journal but not found

 private:
  const int root_fd_;
  int fd_ = -1;
};

enum class JournalCheck { Missing, Incomplete, Complete };

// Checks `name` in `dirfd`: Complete when its trailer and checksum are
// valid. `why` says what is wrong with an incomplete one.
JournalCheck check_journal(int dirfd, const std::string& name, std::string& why);

// Replays a complete journal: for each file, zero ranges, writes, truncate
// to the final size, fsync. Returns 0 or the first -errno (the journal stays
// valid: a replay can be repeated). `files` counts the files replayed.
// `bytes` counts the data bytes written. `verify_sum` false skips reading
// the whole journal once more to check its checksum (header, trailer and
// length are still checked): only for the journal this process has just
// written and fsynced itself.
int replay_journal(int dirfd, const std::string& name, JournalTarget& target, uint64_t* files = nullptr,
                   uint64_t* bytes = nullptr, bool verify_sum = true);

}  // namespace deferfs
