// The identity of one mount (issue 13): several deferfs mounts of one source
// (one machine or many, over a shared or distributed filesystem) never share
// a journal, spill file, clone or named segment.
//
// Every mount draws a random instance id at start. In the source's .deferfs
// directory it holds a POSIX (fcntl) write lock on `instance.ID` for its whole
// life; its journal is `journal.ID`, its spill files `spill.ID.DEV.INO`, its
// clones `snap.ID.DEV.INO`, and its named segments in /dev/shm carry the id
// too (persist.h). POSIX locks are what distributed filesystems keep
// coherent across clients (GlusterFS, NFS v4, CephFS), and the lock goes
// when the process dies, however it dies: an instance whose lock can be
// taken is proven dead, and only then are its files recovered (its journal
// finished, its clones removed, its spill files adopted or kept aside).
//
// Ownership: an Instance owns its lock file's fd (the lock) and removes the
// file when it ends cleanly. Not copyable.
#pragma once

#include <dirent.h>

#include <memory>
#include <string>
#include <vector>

namespace deferfs {

class Instance {
 public:
  // Draws a new id and takes its lock in `state_dir_fd`. The file is created
  // under a name no scanner looks at, locked, then renamed into place, so no
  // other mount ever sees it unlocked. Throws std::system_error.
  static std::unique_ptr<Instance> create(int state_dir_fd, const std::string& mountpoint);
  ~Instance();
  // Removes the lock file, unless the instance leaves spill files (staged
  // data kept for the next mount on this host, which retires it).
  Instance(const Instance&) = delete;
  Instance& operator=(const Instance&) = delete;

  const std::string& id() const { return id_; }
  // After fuse_daemonize's fork: POSIX locks are not inherited, so the child
  // takes the lock again, waiting for the parent's to go with its exit.
  // 0 or -errno.
  int relock_after_fork();

 private:
  Instance(int dir_fd, std::string id, int fd) : dir_fd_(dir_fd), id_(std::move(id)), fd_(fd) {}
  const int dir_fd_;  // owned (a dup of the daemon's)
  const std::string id_;
  int fd_;
};

// Names of an instance's files in .deferfs.
std::string journal_name(const std::string& id);
std::string spill_name(const std::string& id, unsigned long long dev, unsigned long long ino);
std::string clone_name(const std::string& id, unsigned long long dev, unsigned long long ino);

// Ids of other instances that have files in `state_dir_fd` (instance lock,
// journal, spill file or clone), excluding `own`.
std::vector<std::string> instances_in(int state_dir_fd, const std::string& own);

// A dead instance, held: while this object lives, the caller holds the dead
// instance's lock (or, for a file without one, nothing can hold it), so no
// other recovery works on the same files. release() removes its lock file.
class DeadInstance {
 public:
  // nullptr if `id` is alive (its lock is held by someone else).
  static std::unique_ptr<DeadInstance> claim(int state_dir_fd, const std::string& id);
  ~DeadInstance();
  DeadInstance(const DeadInstance&) = delete;
  DeadInstance& operator=(const DeadInstance&) = delete;
  // Removes the lock file (every other file of the instance handled).
  void retire();
  // The host it ran on, as its lock file says ("" if unknown): its staged
  // pages in shared memory are on that host only.
  const std::string& host() const { return host_; }

 private:
  DeadInstance(int dir_fd, std::string id, int fd) : dir_fd_(dir_fd), id_(std::move(id)), fd_(fd) {}
  std::string host_;
  const int dir_fd_;
  const std::string id_;
  int fd_;  // -1: no lock file was there
};

// True if `id` is a live instance (its lock is held by another process).
bool instance_alive(int state_dir_fd, const std::string& id);

// A directory stream of its own on `dir_fd` (a dup would share, and leave
// at its end, the read position of every other stream on it). Caller
// closedir()s; nullptr on failure.
DIR* reopen_dir(int dir_fd);

// This machine's host name, as lock files record it.
std::string this_host();

}  // namespace deferfs
