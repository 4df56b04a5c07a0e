// Staged state that outlives the daemon (spec 6.5).
//
// A file's segment is a named shared-memory file
// (/dev/shm/deferfs.KEY.ID.DEV.INO.seg: KEY from the source root's path, ID
// the mount's instance id, instance.h) and beside it a metadata file (.meta)
// mapped into the daemon: a header (the source's path, identity, base size,
// size, cut mark, staged mtime; the file's and the source root's
// FileIdentity, file_identity.h) and one byte per page saying whether the
// page is staged, in the segment or in the spill file
// (<source>/.deferfs/spill.ID.DEV.INO). Every staged-state change
// updates it in place, so a daemon killed at any instant leaves the segment,
// the spill file and a metadata file that agrees with them. The next mount of
// the same SOURCE finds them (recover_persisted), checks that the file and
// the root are the very ones they were staged for (FileIdentity), renames
// them to its own instance id, shows the pages through the mount again,
// staged, and says so in the log and in `status`. Staged data whose file
// cannot be proven the same is kept aside (orphans.h), never applied.
//
// A daemon holds an exclusive flock on each of its metadata files: recovery
// never takes the files of a live daemon. The files are removed when their
// File ends with nothing staged; they stay when it ends with staged data (a
// failed sync at unmount).
#pragma once

#include <sys/types.h>
#include <time.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "deferfs/file_identity.h"

namespace deferfs {

// One byte per page in the metadata file.
enum class PersistedPage : uint8_t { None = 0, InSegment = 1, InSpill = 2 };

struct PersistedHeader {
  char magic[8];  // "DFSMETA1"
  uint32_t version;  // 2; a version 1 file (no identity) is kept aside, never restored
  uint32_t page_size;
  uint64_t dev, ino;
  uint64_t base_size, size, cut;
  uint64_t id_size;
  int64_t id_mtime_sec, id_mtime_nsec, id_ctime_sec, id_ctime_nsec;
  int64_t staged_mtime_sec, staged_mtime_nsec;
  uint32_t explicit_mtime;
  uint32_t path_len;
  char path[2048];         // relative to the source root, NUL-terminated
  char source_root[1504];  // the SOURCE of the mount, NUL-terminated
  // Version 2: what proves the file and the root are the ones staged for.
  char instance[32];       // the instance id that owns the files, NUL-terminated
  FileIdentity file_id;
  FileIdentity root_id;
  char reserved[40];
};
static_assert(sizeof(PersistedHeader) == 4096, "the header is one page");

class PersistMeta {
 public:
  // Creates (replacing) the metadata file `path`, locked. Throws std::system_error.
  static std::unique_ptr<PersistMeta> create(const std::string& path, uint64_t pages);
  // Opens and locks an existing one; nullptr if locked by a live daemon or
  // not valid (`why` says which).
  static std::unique_ptr<PersistMeta> open_existing(const std::string& path, std::string& why);
  // Reads the header of a metadata file without locking it (whoever holds
  // it); false if unreadable or not a deferfs metadata file.
  static bool peek_header(const std::string& path, PersistedHeader& out);
  ~PersistMeta();  // unlinks the file unless keep()
  PersistMeta(const PersistMeta&) = delete;
  PersistMeta& operator=(const PersistMeta&) = delete;

  PersistedHeader& header() { return *header_; }
  // Makes room for `pages` page bytes. 0 or -errno.
  int reserve(uint64_t pages);
  void set(uint64_t page, PersistedPage v) {
    if (page < pages_) bytes_[page] = static_cast<uint8_t>(v);
  }
  PersistedPage get(uint64_t page) const {
    return page < pages_ ? static_cast<PersistedPage>(bytes_[page]) : PersistedPage::None;
  }
  // Pages whose byte is not None, ascending (skips unallocated ranges).
  std::vector<uint64_t> staged_pages() const;
  // Keep the file when this object ends (staged data must outlive us).
  void keep(bool k) { keep_ = k; }
  const std::string& path() const { return path_; }
  // The file was renamed to `path` (its lock goes with it).
  void renamed(std::string path) { path_ = std::move(path); }
  // The fd of the metadata file (for reading the page bytes).
  int fd() const { return fd_; }

 private:
  PersistMeta(std::string path, int fd);
  int map(uint64_t pages);

  std::string path_;
  int fd_ = -1;
  PersistedHeader* header_ = nullptr;
  uint8_t* bytes_ = nullptr;
  uint64_t pages_ = 0;     // page bytes mapped
  size_t map_len_ = 0;
  bool keep_ = false;
};

// Where one source's persisted files live: /dev/shm/deferfs.KEY.* with KEY
// derived from the source root's path.
std::string persist_prefix(const std::string& source_root);
// The persisted files of `prefix` (metadata paths).
std::vector<std::string> list_persisted(const std::string& prefix);

// Counts the persisted files (metadata) of sources that no longer exist
// (read without taking their locks). They are never removed unasked (issue 16): the
// next mount of a directory at that path keeps them aside (orphans.h).
int count_homeless();

}  // namespace deferfs
