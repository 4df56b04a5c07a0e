// The Daemon: its threads (prefetch, kernel notifications), the handles it
// owns, and the Files it hands the FUSE layer (snapshot on first use,
// commit of one file, unlink and metadata hooks).
#include "deferfs/daemon.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "deferfs/instance.h"
#include "deferfs/log.h"
#include "deferfs/size_limit.h"

namespace deferfs {

namespace {

std::string make_control_path(const MountOptions& opts) {
  return opts.state_dir + "/ctl." + std::to_string(getpid());
}

}  // namespace

Daemon::Daemon(const MountOptions& opts, int source_root_fd, int state_dir_fd, bool reflink,
               std::string instance_id)
    : opts_(opts),
      source_root_fd_(source_root_fd),
      state_dir_fd_(state_dir_fd),
      persist_prefix_(persist_prefix(opts.source)),
      reflink_(reflink),
      max_file_size_(probe_max_file_size(state_dir_fd)),
      instance_id_(std::move(instance_id)),
      state_dir_owner_{state_dir_fd},
      cache_(counters_, opts.cache_size, opts.dirty_limit),
      inodes_(source_root_fd),
      kept_(SnapshotCache::default_max_files()),
      committer_(counters_, source_root_fd, state_dir_fd,
                 instance_id_.empty() ? std::string(kJournalName) : journal_name(instance_id_)) {
  inodes_.set_release_hook([this](Inode& inode) { keep_snapshot(inode, false); });
  take_identity(source_root_fd, root_id_);
}

Daemon::~Daemon() {
  stop_threads();
  // No request runs any more: what is left here got no RELEASE.
  for (auto& [h, free] : handles_) free();
}

void Daemon::keep_handle(void* h, std::function<void()> free) {
  MutexLock lk(handles_mutex_);
  handles_.emplace(h, std::move(free));
}

void Daemon::drop_handle(void* h) {
  MutexLock lk(handles_mutex_);
  handles_.erase(h);
}

Daemon::OwnedFd::~OwnedFd() {
  if (fd >= 0) close(fd);
}

// Control sockets of daemons that died without cleaning up (SIGKILL).
static void remove_stale_sockets(const std::string& dir) {
  DIR* d = opendir(dir.c_str());
  if (!d) return;
  while (dirent* e = readdir(d)) {
    if (std::strncmp(e->d_name, "ctl.", 4) != 0) continue;
    char* end = nullptr;
    long pid = std::strtol(e->d_name + 4, &end, 10);
    if (!end || *end || pid <= 0) continue;
    if (kill(static_cast<pid_t>(pid), 0) < 0 && errno == ESRCH) unlinkat(dirfd(d), e->d_name, 0);
  }
  closedir(d);
}

void Daemon::start_threads() {
  remove_stale_sockets(opts_.state_dir);
  control_path_ = make_control_path(opts_);
  views_ = std::make_unique<ViewServer>();
  control_ = std::make_unique<ControlServer>(control_path_, getuid(), *this);
  control_->start();
  notifier_ = std::thread([this] { notifier_loop(); });
  prefetcher_ = std::thread([this] { prefetch_loop(); });
}

void Daemon::prefetch_loop() {
  MutexLock lk(notify_mutex_);
  for (;;) {
    while (!notify_stop_ && prefetch_queue_.empty()) prefetch_cv_.wait(notify_mutex_);
    if (notify_stop_) return;
    PrefetchJob job = std::move(prefetch_queue_.front());
    prefetch_queue_.pop_front();
    MutexUnlock unlocked(notify_mutex_);
    if (std::shared_ptr<File> file = job.file.lock()) {
      file->prefetch(job.first, job.last);
      cache_.balance(file.get());
    }
  }
}

void Daemon::stop_threads() {
  control_.reset();
  views_.reset();
  {
    MutexLock lk(notify_mutex_);
    notify_stop_ = true;
  }
  notify_cv_.notify_all();
  prefetch_cv_.notify_all();
  if (notifier_.joinable()) notifier_.join();
  if (prefetcher_.joinable()) prefetcher_.join();
}

void Daemon::queue_invalidate(uint64_t nodeid) {
  {
    MutexLock lk(notify_mutex_);
    notify_queue_.push_back(nodeid);
  }
  notify_cv_.notify_one();
}

void Daemon::invalidate_attributes(const Inode& inode) {
  if (se_) fuse_lowlevel_notify_inval_inode(se_, inodes_.nodeid(inode), -1, 0);
}

void Daemon::invalidate_now(const Inode& inode) {
  if (se_) fuse_lowlevel_notify_inval_inode(se_, inodes_.nodeid(inode), 0, 0);
}

void Daemon::flush_kernel_writes() {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addclosefrom_np(&actions, 3);  // no /dev/fuse fd in the child
  const char* argv[] = {"sync", "-f", opts_.mountpoint.c_str(), nullptr};
  char* const envp[] = {nullptr};
  pid_t pid = -1;
  int rc = ENOENT;
  for (const char* prog : {"/usr/bin/sync", "/bin/sync"}) {
    rc = posix_spawn(&pid, prog, &actions, nullptr, const_cast<char* const*>(argv), envp);
    if (rc == 0) break;
  }
  posix_spawn_file_actions_destroy(&actions);
  if (rc == 0) {
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return;
    log_error("%s: sync -f of the mount exited with status %d; pages written through shared mappings "
              "may not be staged yet", opts_.mountpoint.c_str(), status);
    return;
  }
  // No sync(1) to run: ask ourselves (a SIGKILL meanwhile may then hang).
  log_error("%s: cannot run sync -f (%s); flushing the mount's dirty pages from the daemon itself",
            opts_.mountpoint.c_str(), std::strerror(rc));
  if (int mfd = open(opts_.mountpoint.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); mfd >= 0) {
    syncfs(mfd);
    close(mfd);
  }
}

void Daemon::refresh_kernel_view(const Inode& inode) {
  invalidate_now(inode);
  const std::string rel = rel_path(inode);
  if (rel.empty() || rel == "?") return;  // unlinked: no path to ask by
  // The attributes were just invalidated: this stat is a GETATTR, answered
  // by the FUSE workers (this is not one of them).
  struct stat st;
  (void)stat((opts_.mountpoint + "/" + rel).c_str(), &st);
}

void Daemon::notifier_loop() {
  MutexLock lk(notify_mutex_);
  for (;;) {
    while (!notify_stop_ && notify_queue_.empty()) notify_cv_.wait(notify_mutex_);
    if (notify_stop_) return;
    uint64_t nodeid = notify_queue_.front();
    notify_queue_.pop_front();
    MutexUnlock unlocked(notify_mutex_);
    // -ENOENT: the kernel no longer knows the inode; nothing cached then.
    if (se_) fuse_lowlevel_notify_inval_inode(se_, nodeid, 0, 0);
  }
}

int Daemon::open_source(const Inode& inode, bool& writable) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/self/fd/%d", inode.fd);
  writable = !opts_.read_only;
  int fd = writable ? open(path, O_RDWR | O_CLOEXEC | O_NOATIME) : -1;
  if (fd < 0 && writable && errno == EPERM) fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    writable = false;
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOATIME);
    if (fd < 0 && errno == EPERM) fd = open(path, O_RDONLY | O_CLOEXEC);
  }
  return fd < 0 ? -errno : fd;
}

void Daemon::attach(Inode& inode, const std::shared_ptr<File>& file) {
  uint64_t nodeid = inodes_.nodeid(inode);
  file->set_readahead(opts_.readahead, [this](std::weak_ptr<File> f, uint64_t first, uint64_t last) {
    {
      MutexLock lk(notify_mutex_);
      if (prefetch_queue_.size() >= 64) return;  // a hint: drop when busy
      prefetch_queue_.push_back({std::move(f), first, last});
    }
    prefetch_cv_.notify_one();
  });
  dev_t dev = inode.dev;
  ino_t ino = inode.ino;
  file->set_invalidate_hook([this, nodeid] { queue_invalidate(nodeid); });
  file->set_spill_opener([this, dev, ino] { return open_spill_file(dev, ino); },
                         [this, dev, ino] { remove_spill_file(dev, ino); });
  cache_.add(file);
}

void Daemon::keep_snapshot(Inode& inode, bool parked) {
  std::shared_ptr<File> file;
  {
    // Under the inode's lock: file_of counts a handle under it too, so a
    // File is never parked while someone is about to use it.
    MutexLock lk(inode.m);
    if (!inode.file || inode.file->handles.load() != 0 || inode.file->views.load() != 0 ||
        inode.file->has_staged_now())
      return;
    file = std::move(inode.file);
    inode.file_parked = parked;
  }
  // Until it is attached to an Inode again, nothing in the kernel is its.
  file->set_invalidate_hook([] {});
  kept_.keep(inode.dev, inode.ino, std::move(file));
}

std::shared_ptr<File> Daemon::file_of(Inode& inode, bool& keep_cache, int& err) {
  // The name first: rel_path may take inode.m itself.
  const std::string name = rel_path(inode);
  MutexLock lk(inode.m);
  keep_cache = false;
  if (!inode.file) {
    if (std::shared_ptr<File> kept = kept_.take(inode.dev, inode.ino)) {
      // A snapshot kept after the kernel forgot this object: revalidated
      // below like any other at open. The kernel's inode is new, so it
      // holds no pages of it (keep_cache is false).
      const uint64_t nodeid = inodes_.nodeid(inode);
      kept->set_invalidate_hook([this, nodeid] { queue_invalidate(nodeid); });
      kept->set_name(name);
      inode.file = std::move(kept);
      const File::Validity v = inode.file->revalidate();
      // Parked at a close, the kernel's inode (and its pages) stayed.
      keep_cache = inode.file_parked && v == File::Validity::Unchanged;
      inode.file_parked = false;
      ++inode.file->handles;
      return inode.file;
    }
  }
  inode.file_parked = false;
  if (inode.file) {
    File::Validity v = inode.file->revalidate();
    keep_cache = v == File::Validity::Unchanged;
    ++inode.file->handles;
    return inode.file;
  }
  bool writable = false;
  int fd = open_source(inode, writable);
  if (fd < 0) {
    err = -fd;
    return nullptr;
  }
  try {
    // Staged pages of a writable file must outlive the daemon (spec 6.5).
    // Named by this mount's instance id, and stamped with the identity of
    // the very file and root they are staged for (issue 16).
    PersistConfig persist{persist_prefix_ + instance_id_ + "." + std::to_string(inode.dev) + "." +
                              std::to_string(inode.ino),
                          opts_.source, instance_id_, {}, root_id_};
    if (writable) take_identity(fd, persist.file_id);
    std::unique_ptr<Source> source;
    if (reflink_) {
      // The snapshot is a clone: outside changes cannot reach it (spec 5.2).
      // Taken now, before any page is served, so no window is left open.
      try {
        source = std::make_unique<CloneSource>(fd, writable, state_dir_fd_,
                                               clone_name(instance_id_, inode.dev, inode.ino));
      } catch (const std::system_error& e) {
        // Another filesystem below the source (a mount inside it): guard.
        log_info("%s: no reflink snapshot (%s); guarding it instead", name.c_str(),
                 e.code().message().c_str());
        fd = open_source(inode, writable);
        if (fd < 0) {
          err = -fd;
          return nullptr;
        }
      }
    }
    if (!source) source = std::make_unique<FdSource>(fd, writable);
    auto file = std::make_shared<File>(std::move(source), opts_.page_size, counters_, name,
                                       writable ? &persist : nullptr);
    attach(inode, file);
    inode.file = file;
    ++file->handles;
    return file;
  } catch (const std::exception& e) {
    log_error("%s", e.what());
    err = EIO;
    return nullptr;
  }
}
int Daemon::commit_one(Inode& inode) {
  std::shared_ptr<File> file;
  {
    MutexLock lk(inode.m);
    file = inode.file;
  }
  if (!file) return 0;
  std::string path = rel_path(inode);
  SyncReport r = committer_.commit({{file, path}}, false);
  // stat now shows the source's times (attributes only: safe in a request).
  invalidate_attributes(inode);
  if (!r.conflicts.empty()) return -EIO;
  // The matching errno for the client (spec 8.3): ENOSPC stays ENOSPC.
  if (!r.failed.empty()) return -(r.failed.front().code ? r.failed.front().code : EIO);
  return 0;
}

void Daemon::released(Inode& inode) {
  std::shared_ptr<File> file;
  {
    MutexLock lk(inode.m);
    file = inode.file;
  }
  if (!file || file->handles.load() != 0) return;
  struct stat st;
  if (fstat(inode.fd, &st) == 0 && st.st_nlink == 0) {
    // Unlinked on the source and closed everywhere: the data has no name
    // left to be committed to (spec 6.6).
    file->discard();
    MutexLock lk(inode.m);
    if (file->handles.load() == 0) inode.file.reset();
  }
  file.reset();  // ours is no reference to keep
  keep_snapshot(inode, true);
  inodes_.prune(inode);
}

void Daemon::unlinked(dev_t dev, ino_t ino) {
  kept_.drop(dev, ino);
  if (std::shared_ptr<Inode> inode = inodes_.find(dev, ino)) {
    metadata_changed(*inode, false);  // another name may remain: ctime changed
    released(*inode);
  }
}

void Daemon::metadata_changed(dev_t dev, ino_t ino, bool times_set) {
  if (std::shared_ptr<Inode> inode = inodes_.find(dev, ino)) metadata_changed(*inode, times_set);
}

void Daemon::metadata_changed(Inode& inode, bool times_set) {
  std::shared_ptr<File> file;
  {
    MutexLock lk(inode.m);
    file = inode.file;
  }
  if (file) file->adopt_metadata_change(times_set);
}

}  // namespace deferfs
