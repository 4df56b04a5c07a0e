// Staged state that outlives the daemon (spec 6.5).
//
// A file's segment is a named shared-memory file (/dev/shm/deferfs.KEY.DEV.INO.seg)
// and beside it a metadata file (.meta) mapped into the daemon: a header
// (the source's path, identity, base size, size, cut mark, staged mtime) and
// one byte per page saying whether the page is staged, in the segment or in
// the spill file (<source>/.deferfs/spill.DEV.INO). Every staged-state change
// updates it in place, so a daemon killed at any instant leaves the segment,
// the spill file and a metadata file that agrees with them. The next mount of
// the same SOURCE finds them (recover_persisted), shows the pages through the
// mount again, staged, and says so in the log and in `status`.
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

namespace deferfs {

// One byte per page in the metadata file.
enum class PersistedPage : uint8_t { None = 0, InSegment = 1, InSpill = 2 };

struct PersistedHeader {
  char magic[8];  // "DFSMETA1"
  uint32_t version;
  uint32_t page_size;
  uint64_t dev, ino;
  uint64_t base_size, size, cut;
  uint64_t id_size;
  int64_t id_mtime_sec, id_mtime_nsec, id_ctime_sec, id_ctime_nsec;
  int64_t staged_mtime_sec, staged_mtime_nsec;
  uint32_t explicit_mtime;
  uint32_t path_len;
  char path[2048];         // relative to the source root, NUL-terminated
  char source_root[1928];  // the SOURCE of the mount, NUL-terminated: a
                           // segment whose source is gone is reclaimed
};
static_assert(sizeof(PersistedHeader) == 4096, "the header is one page");

class PersistMeta {
 public:
  // Creates (replacing) the metadata file `path`, locked. Throws std::system_error.
  static std::unique_ptr<PersistMeta> create(const std::string& path, uint64_t pages);
  // Opens and locks an existing one; nullptr if locked by a live daemon or
  // not valid (`why` says which).
  static std::unique_ptr<PersistMeta> open_existing(const std::string& path, std::string& why);
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

 private:
  PersistMeta(std::string path, int fd);
  int map(uint64_t pages);

  const std::string path_;
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

// Removes the persisted files (metadata, segment) of any source that no
// longer exists, unless a live daemon holds them. Returns how many files
// were reclaimed. Called at every mount: staged data of a deleted source
// has nowhere to go and would hold shared memory forever.
int reclaim_orphans();

}  // namespace deferfs
