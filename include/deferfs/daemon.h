// The mounted filesystem: owns the inode table, the committer, the control
// server and the FUSE session; implements the control operations.
#pragma once

#include <fuse_lowlevel.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "deferfs/cache.h"
#include "deferfs/snapshot_cache.h"
#include "deferfs/committer.h"
#include "deferfs/control.h"
#include "deferfs/file.h"
#include "deferfs/file_identity.h"
#include "deferfs/inode_table.h"
#include "deferfs/mutex.h"
#include "deferfs/options.h"
#include "deferfs/view_server.h"

namespace deferfs {

class Transport;

// Runs the mount described by `opts` until it is unmounted or signalled.
// Returns the process exit status (0, 1 on a runtime failure, 2 on bad usage
// found while setting up, before anything is mounted).
int run_daemon(const MountOptions& opts);

class Daemon final : public ControlHandler {
 public:
  // `state_dir_fd`: the source's hidden .deferfs directory (journal, spill
  // files), or -1 when it cannot exist (read-only source).
  // `reflink`: snapshots are reflink clones in the state directory.
  // `instance_id`: this mount's own id (instance.h): its journal, spill
  // files, clones and named segments are named by it.
  Daemon(const MountOptions& opts, int source_root_fd, int state_dir_fd, bool reflink,
         std::string instance_id = "");
  ~Daemon() override;
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  // ---- ControlHandler (control thread) ----
  SyncReport sync(const std::vector<std::string>& paths, bool force,
                  const Progress& progress) override;
  StatusReport status(const std::vector<std::string>& paths) override;
  DiscardReport discard(const std::vector<std::string>& paths) override;
  StatsReport stats() override;
  SyncReport umount(bool discard) override;
  // A view (spec 9): checks the peer may read `path`, then hands the
  // connection to the ViewServer (daemon_views.cc).
  void view(const std::string& path, const PeerCredentials& peer, int conn) override;

  // ---- used by the FUSE handlers (fuse_ops.cc) ----
  const MountOptions& options() const { return opts_; }
  // The largest file the source filesystem accepts (probed at start): a
  // truncate, fallocate or write beyond it fails with EFBIG (size_limit.h).
  uint64_t max_file_size() const { return max_file_size_; }
  InodeTable& inodes() { return inodes_; }
  Counters& counters() { return counters_; }
  Cache& cache() { return cache_; }
  // The File of a regular-file inode, created (snapshot taken) on first use.
  // `fresh` tells whether the kernel's cached pages of it may be kept.
  // Returns nullptr and sets `err` on failure. The File comes with one count
  // of `handles` taken under the inode's lock (so that no close parks it
  // meanwhile, see released()): the caller keeps it as its handle's, or
  // gives it back with `--file->handles` and released(inode).
  std::shared_ptr<File> file_of(Inode& inode, bool& keep_cache, int& err);
  // Commits one file (fsync=commit). 0 or -errno.
  int commit_one(Inode& inode);
  // A handle was released: a file unlinked on the source with no handle left
  // loses its staged data (spec 6.6); one with no handle and nothing staged
  // is parked in the snapshot cache (its segment, meta and source fds held
  // there, bounded by count), so that a tree of many files read once holds
  // one fd per inode the kernel knows, not four.
  void released(Inode& inode);
  // A name of source object (dev, ino) was removed (unlink, rename over it):
  // if that was its last link and no handle is open, its staged data goes.
  void unlinked(dev_t dev, ino_t ino);
  // A metadata operation through the mount changed the source object's
  // ctime (and its mtime when `times_set`): see File::adopt_metadata_change.
  void metadata_changed(dev_t dev, ino_t ino, bool times_set);
  void metadata_changed(Inode& inode, bool times_set);
  // Path of `inode` relative to the source root ("" for the root); empty
  // optional-like result "?" when unknown. " (deleted)" files keep that suffix.
  std::string rel_path(const Inode& inode);
  // Queues a kernel cache invalidation of `nodeid` (data and attributes),
  // done by the notifier thread: never from inside a FUSE request.
  void queue_invalidate(uint64_t nodeid);
  // Drops the kernel's cached attributes of `inode` now (safe inside a FUSE
  // request: no page locks).
  void invalidate_attributes(const Inode& inode);
  // Drops the kernel's cached pages and attributes of `inode` now, and
  // waits for it. Never from inside a FUSE request (control thread only).
  void invalidate_now(const Inode& inode);
  // Has the kernel write back the pages it holds dirty (writes through a
  // shared mapping) and waits for them: they are then staged. Control
  // thread only: the FUSE workers serve those WRITEs. The syncfs runs in a
  // child process (`sync -f`) that holds no /dev/fuse descriptor: a thread
  // of ours waiting in the kernel's writeback for our own WRITEs could not
  // be killed, and a SIGKILLed daemon would never exit (nor its mount end);
  // a child's wait ends when our connection does.
  void flush_kernel_writes();
  // invalidate_now, then a stat of the file through the mount, so that the
  // kernel takes the file's size now. The kernel keeps a cached size (i_size)
  // until it asks again and a read inside that size never asks: after the
  // daemon shrank a file behind it (discard, a new snapshot), a read would
  // otherwise see bytes past the new end. Control thread only.
  void refresh_kernel_view(const Inode& inode);
  const std::string& control_path() const { return control_path_; }
  void set_session(fuse_session* se) { se_ = se; }
  // Who serves requests, for stats(); set before the loop, cleared after.
  void set_transport(const Transport* t) { transport_ = t; }
  // Sync everything staged; used at exit (signal, fusermount3 -u). Logs.
  void final_sync();
  bool discard_on_exit() const { return discard_on_exit_; }
  bool reflink() const { return reflink_; }

  void start_threads();
  void stop_threads();

  // Ownership of the handles given to the kernel (fi->fh): registered before
  // the open is replied to (a RELEASE may come at once, on another thread),
  // unregistered by RELEASE/RELEASEDIR. A mount that goes away with handles
  // open sends no RELEASE: those are freed with the Daemon.
  void keep_handle(void* h, std::function<void()> free);
  void drop_handle(void* h);

 private:
  std::vector<CommitTarget> targets(const std::vector<std::string>& paths, bool staged_only);
  std::string rel_path(const Inode& inode, int depth);
  // A name of `inode` below `dir_fd` (relative to it), at most `max_depth`
  // levels down, or "".
  std::string find_name(int dir_fd, const Inode& inode, int max_depth);
  static bool matches(const std::string& rel, const std::vector<std::string>& paths);
  void notifier_loop() EXCLUDES(notify_mutex_);
  int unmount_now();
  // Opens the spill file of source object (dev, ino) in the source's hidden
  // .deferfs directory (named, so a restarted daemon finds it).
  int open_spill_file(dev_t dev, ino_t ino);
  void remove_spill_file(dev_t dev, ino_t ino);
  // Opens the source file of `inode` for the loader and committer: read-write
  // unless the mount is read-only or the daemon may not write it. fd or -errno.
  int open_source(const Inode& inode, bool& writable);
  // Hooks a File into the daemon (invalidation, spill, cache).
  void attach(Inode& inode, const std::shared_ptr<File>& file);
  // The release hook of inodes_: an Inode left the table; its File, if it
  // has no handle and nothing staged, goes to kept_.
  // `parked`: the kernel still holds the inode (a close, not a forget).
  void keep_snapshot(Inode& inode, bool parked);
 public:
  // Restores the staged files a previous daemon of this SOURCE left (spec
  // 6.5). Before serving. Logs each file.
  // (daemon_recovery.cc: staged data proven to be the file's is restored, the
  // rest kept aside as orphans.)
  void recover_persisted();
 private:
  // Keeps the staged state of `meta` aside (orphans.h), then removes it;
  // false (and nothing removed) if it could not be kept aside.
  bool keep_aside(class PersistMeta& meta, const std::string& seg_path, const std::string& reason);
  // Orphans kept in .deferfs/orphans (for status).
  std::vector<std::string> orphans() const;

  // constant after construction
  const MountOptions opts_;
  const int source_root_fd_;  // the source root (O_PATH); owned by inodes_
  const int state_dir_fd_;    // <source>/.deferfs, or -1; owned by state_dir_owner_
  const std::string persist_prefix_;  // /dev/shm/deferfs.KEY. (persist.h)
  const bool reflink_;                // snapshots are reflink clones (spec 5.2)
  const uint64_t max_file_size_;      // of the source filesystem (size_limit.h)
  const std::string instance_id_;     // this mount's (instance.h)
  FileIdentity root_id_;              // the source root's, set at construction
  std::string control_path_;  // set by start_threads (after the daemon forked: it holds the pid)

  // Owns state_dir_fd_; declared before inodes_ so it closes after the Files
  // (which remove their spill files through it) are gone.
  struct OwnedFd {
    int fd;
    ~OwnedFd();
  } state_dir_owner_;
  Counters counters_;
  Cache cache_;  // before inodes_: it outlives the Files the Inodes own
  InodeTable inodes_;
  // Snapshots of files the kernel forgot, kept for their next open (spec
  // 5.1). Declared after inodes_ and cache_: destroyed before them.
  SnapshotCache kept_;
  Committer committer_;
  fuse_session* se_ = nullptr;  // set before the loop runs
  std::atomic<const Transport*> transport_{nullptr};
  std::unique_ptr<ControlServer> control_;
  std::unique_ptr<ViewServer> views_;  // created before control_, ended after it
  std::atomic<bool> discard_on_exit_{false};  // set by umount --discard (control thread), read at exit

  // Readahead jobs, loaded by the prefetch thread (bounded: extra jobs are
  // dropped, readahead is a hint).
  struct PrefetchJob {
    std::weak_ptr<File> file;
    uint64_t first, last;
  };
  void prefetch_loop() EXCLUDES(notify_mutex_);
  std::deque<PrefetchJob> prefetch_queue_ GUARDED_BY(notify_mutex_);
  CondVar prefetch_cv_;
  std::thread prefetcher_;

  Mutex handles_mutex_;
  std::unordered_map<void*, std::function<void()>> handles_ GUARDED_BY(handles_mutex_);

  Mutex notify_mutex_;
  CondVar notify_cv_;
  std::deque<uint64_t> notify_queue_ GUARDED_BY(notify_mutex_);
  bool notify_stop_ GUARDED_BY(notify_mutex_) = false;
  std::thread notifier_;
};

}  // namespace deferfs
