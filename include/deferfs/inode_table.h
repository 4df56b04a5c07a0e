// nodeid -> Inode, like passthrough_hp's inode map: every object the kernel
// knows is an Inode holding an O_PATH fd on the source object, keyed by the
// source's (dev, ino) so renames and hard links map to one Inode. The nodeid
// given to the kernel is the Inode's address (FUSE_ROOT_ID for the root).
//
// The table is a Boost.Intrusive set keyed by (dev, ino) whose hook lives
// inside the Inode: no allocation per entry beyond the Inode itself.
//
// Lifetime: the table owns Inodes through shared_ptr (Inode::table_ref, the
// table's reference, set while the Inode is in the set). An Inode leaves the
// table when the kernel has forgotten it (nlookup 0) and it holds no File
// with staged data; users that looked it up (sync, status) keep their
// shared_ptr and may finish with it.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <boost/intrusive/set.hpp>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "deferfs/file.h"
#include "deferfs/mutex.h"

namespace deferfs {

struct Inode : boost::intrusive::set_base_hook<> {
  Inode(int fd, const struct stat& st) : fd(fd), dev(st.st_dev), ino(st.st_ino), type(st.st_mode & S_IFMT) {}
  ~Inode();
  Inode(const Inode&) = delete;
  Inode& operator=(const Inode&) = delete;

  const int fd;      // O_PATH|O_NOFOLLOW on the source object; owned
  const dev_t dev;
  const ino_t ino;
  const mode_t type;  // S_IFMT bits
  std::atomic<uint64_t> nlookup{0};  // kernel references (lookup minus forget)

  mutable Mutex m;  // taken after the table's m_, before the File's locks
  std::shared_ptr<File> file GUARDED_BY(m);  // regular files, from the first open on
  // The File was parked in the snapshot cache at its last close while the
  // kernel kept this inode (and maybe its pages): taken back at the next
  // open, the kernel's cache may be kept if the snapshot is unchanged.
  bool file_parked GUARDED_BY(m) = false;
  // The last name the kernel looked this object up by (parent's source
  // identity and entry name): how a file is named in reports once the name
  // its O_PATH fd was opened by is gone (another hard link remains).
  std::pair<dev_t, ino_t> parent GUARDED_BY(m){0, 0};
  std::string name GUARDED_BY(m);

  // The table's reference while the Inode is in its set (the table's m_
  // guards it and the hook; not annotated: the table is not known here).
  std::shared_ptr<Inode> table_ref;
};

class InodeTable {
 public:
  // `root_fd`: O_PATH fd of the source root, owned from now on.
  explicit InodeTable(int root_fd);
  ~InodeTable();
  InodeTable(const InodeTable&) = delete;
  InodeTable& operator=(const InodeTable&) = delete;

  // The Inode of `nodeid` (the kernel guarantees it was not forgotten).
  Inode& get(uint64_t nodeid);
  uint64_t nodeid(const Inode& inode) const;
  Inode& root() { return *root_; }

  // Finds the Inode of (st.st_dev, st.st_ino) or adds one owning `fd`; if
  // found, `fd` is closed. Counts one kernel lookup.
  std::shared_ptr<Inode> lookup(int fd, const struct stat& st) EXCLUDES(m_);
  // Remembers that `inode` is called `name` in the directory `parent`.
  static void named(Inode& inode, const Inode& parent, const std::string& name);

  // Drops `n` kernel references; the Inode leaves the table at 0 unless it
  // holds staged data.
  void forget(uint64_t nodeid, uint64_t n) EXCLUDES(m_);

  // The Inode of a source object if the table holds it, else nullptr.
  std::shared_ptr<Inode> find(dev_t dev, ino_t ino) EXCLUDES(m_);

  // Every Inode with a File (for sync, status, stats, unmount).
  std::vector<std::shared_ptr<Inode>> with_files() EXCLUDES(m_);

  // Removes `inode` if nobody references it any more (after a sync or
  // discard left it with nothing staged).
  void prune(const Inode& inode) EXCLUDES(m_);

  // Called with each Inode that leaves the table (forget, prune), with no
  // table lock held, before the table drops its reference: the daemon keeps
  // its File as a cached snapshot (snapshot_cache.h). Set before serving.
  void set_release_hook(std::function<void(Inode&)> hook) { release_hook_ = std::move(hook); }

 private:
  // Hands an Inode that left the table to the release hook (no lock held).
  void released(std::shared_ptr<Inode> inode) EXCLUDES(m_);
  std::function<void(Inode&)> release_hook_;  // constant while serving

  bool removable(Inode& inode) REQUIRES(m_);

  std::shared_ptr<Inode> root_;
  Mutex m_;
  struct Key {
    using type = std::pair<dev_t, ino_t>;
    type operator()(const Inode& i) const { return {i.dev, i.ino}; }
  };
  using Set = boost::intrusive::set<Inode, boost::intrusive::key_of_value<Key>>;
  // Takes `inode` out of the set; returns the table's reference to it.
  std::shared_ptr<Inode> unlink(Inode& inode) REQUIRES(m_);
  Set inodes_ GUARDED_BY(m_);
};

}  // namespace deferfs
