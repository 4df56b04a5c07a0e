// Snapshots kept after the kernel forgot their inode (spec 5.1).
//
// `echo 3 > drop_caches` or memory pressure makes the kernel evict a mount's
// inodes and send FORGET. A File with no open handle and nothing staged is
// then only a cache of the source: its segment and page map stay useful, so
// instead of dying with the Inode it is kept here, keyed by the source
// object's (dev, ino), and handed back at the next lookup and open of that
// object, where File::revalidate() checks the source's identity (size,
// mtime, ctime) before anything in it is served again, as at any open.
//
// Bounds: the kept Files stay registered with the Cache, so their clean pages
// are evicted within cache_size as any other's; their number is bounded
// (each holds the source's fd, and a reflink clone if it has one): beyond
// the bound the least recently kept is dropped. A kept File whose source
// lost its last name (unlinked through the mount, or found so at a sweep) is
// dropped, so a kept fd never holds a deleted file's blocks for long.
//
// Lock rule: mutex_ is a leaf; Files are destroyed after it is released
// (their destructors unlink segments and clones).
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "deferfs/file.h"
#include "deferfs/mutex.h"

namespace deferfs {

class SnapshotCache {
 public:
  explicit SnapshotCache(size_t max_files) : max_files_(max_files) {}
  SnapshotCache(const SnapshotCache&) = delete;
  SnapshotCache& operator=(const SnapshotCache&) = delete;

  // Keeps `file`, the snapshot of source object (dev, ino). The caller
  // checked that it has no handle and nothing staged.
  void keep(dev_t dev, ino_t ino, std::shared_ptr<File> file) EXCLUDES(mutex_);
  // The kept snapshot of (dev, ino), removed from the cache, or nullptr.
  std::shared_ptr<File> take(dev_t dev, ino_t ino) EXCLUDES(mutex_);
  // Forgets the kept snapshot of (dev, ino), if any (its source is gone).
  void drop(dev_t dev, ino_t ino) EXCLUDES(mutex_);
  size_t size() EXCLUDES(mutex_);
  // The kept snapshots (for stats).
  std::vector<std::shared_ptr<File>> files() EXCLUDES(mutex_);
  size_t max_files() const { return max_files_; }

  // A bound for the number of kept snapshots from the fds the daemon may
  // open: a quarter of RLIMIT_NOFILE, at most 1024, at least 16.
  static size_t default_max_files();

 private:
  using Key = std::pair<dev_t, ino_t>;
  struct Entry {
    std::shared_ptr<File> file;
    std::list<Key>::iterator age;  // position in order_
  };
  // Moves out the Files of sources with no name left (nlink 0). Locked.
  void sweep_locked(std::vector<std::shared_ptr<File>>& dead) REQUIRES(mutex_);

  const size_t max_files_;
  Mutex mutex_;
  std::map<Key, Entry> entries_ GUARDED_BY(mutex_);
  std::list<Key> order_ GUARDED_BY(mutex_);  // oldest kept first
  size_t keeps_since_sweep_ GUARDED_BY(mutex_) = 0;
};

}  // namespace deferfs
