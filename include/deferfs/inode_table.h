// nodeid -> Inode, like passthrough_hp's inode map: every object the kernel
// knows is an Inode holding an O_PATH fd on the source object, keyed by the
// source's (dev, ino) so renames and hard links map to one Inode. The nodeid
// given to the kernel is the Inode's address (FUSE_ROOT_ID for the root).
//
// Lifetime: the table owns Inodes through shared_ptr. An Inode leaves the
// table when the kernel has forgotten it (nlookup 0) and it holds no File
// with staged data; users that looked it up (sync, status) keep their
// shared_ptr and may finish with it.
#pragma once

#include <sys/stat.h>
#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "deferfs/file.h"

namespace deferfs {

struct Inode {
  Inode(int fd, const struct stat& st) : fd(fd), dev(st.st_dev), ino(st.st_ino), type(st.st_mode & S_IFMT) {}
  ~Inode();
  Inode(const Inode&) = delete;
  Inode& operator=(const Inode&) = delete;

  const int fd;      // O_PATH|O_NOFOLLOW on the source object; owned
  const dev_t dev;
  const ino_t ino;
  const mode_t type;  // S_IFMT bits
  std::atomic<uint64_t> nlookup{0};  // kernel references (lookup minus forget)

  std::mutex m;                 // guards file, parent, name
  std::shared_ptr<File> file;   // regular files, from the first open on
  // The last name the kernel looked this object up by (parent's source
  // identity and entry name): how a file is named in reports once the name
  // its O_PATH fd was opened by is gone (another hard link remains).
  std::pair<dev_t, ino_t> parent{0, 0};
  std::string name;
};

class InodeTable {
 public:
  // `root_fd`: O_PATH fd of the source root, owned from now on.
  explicit InodeTable(int root_fd);
  InodeTable(const InodeTable&) = delete;
  InodeTable& operator=(const InodeTable&) = delete;

  // The Inode of `nodeid` (the kernel guarantees it was not forgotten).
  Inode& get(uint64_t nodeid);
  uint64_t nodeid(const Inode& inode) const;
  Inode& root() { return *root_; }

  // Finds the Inode of (st.st_dev, st.st_ino) or adds one owning `fd`; if
  // found, `fd` is closed. Counts one kernel lookup.
  std::shared_ptr<Inode> lookup(int fd, const struct stat& st);
  // Remembers that `inode` is called `name` in the directory `parent`.
  static void named(Inode& inode, const Inode& parent, const std::string& name);

  // Drops `n` kernel references; the Inode leaves the table at 0 unless it
  // holds staged data.
  void forget(uint64_t nodeid, uint64_t n);

  // The Inode of a source object if the table holds it, else nullptr.
  std::shared_ptr<Inode> find(dev_t dev, ino_t ino);

  // Every Inode with a File (for sync, status, stats, unmount).
  std::vector<std::shared_ptr<Inode>> with_files();

  // Removes `inode` if nobody references it any more (after a sync or
  // discard left it with nothing staged).
  void prune(const Inode& inode);

  // Called with each Inode that leaves the table (forget, prune), with no
  // table lock held, before the table drops its reference: the daemon keeps
  // its File as a cached snapshot (snapshot_cache.h). Set before serving.
  void set_release_hook(std::function<void(Inode&)> hook) { release_hook_ = std::move(hook); }

 private:
  bool removable(Inode& inode);

  // Hands an Inode that left the table to the release hook (no lock held).
  void released(std::shared_ptr<Inode> inode);

  std::function<void(Inode&)> release_hook_;  // constant while serving
  std::shared_ptr<Inode> root_;
  std::mutex m_;  // guards inodes_
  std::map<std::pair<dev_t, ino_t>, std::shared_ptr<Inode>> inodes_;
};

}  // namespace deferfs
