#include "deferfs/daemon.h"

#include <dirent.h>
#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <unordered_set>

#include "deferfs/fuse_ops.h"
#include "deferfs/log.h"
#include "deferfs/persist.h"

extern char** environ;

namespace deferfs {

namespace {

std::string make_control_path(const MountOptions& opts) {
  return opts.state_dir + "/ctl." + std::to_string(getpid());
}

uint64_t rss_bytes() {
  std::ifstream statm("/proc/self/statm");
  uint64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

}  // namespace

Daemon::Daemon(const MountOptions& opts, int source_root_fd, int state_dir_fd, bool reflink)
    : opts_(opts),
      source_root_fd_(source_root_fd),
      state_dir_fd_(state_dir_fd),
      persist_prefix_(persist_prefix(opts.source)),
      reflink_(reflink),
      state_dir_owner_{state_dir_fd},
      inodes_(source_root_fd),
      cache_(counters_, opts.cache_size, opts.dirty_limit),
      kept_(SnapshotCache::default_max_files()),
      committer_(counters_, source_root_fd, state_dir_fd) {
  inodes_.set_release_hook([this](Inode& inode) { keep_snapshot(inode); });
}

Daemon::~Daemon() {
  stop_threads();
  // No request runs any more: what is left here got no RELEASE.
  for (auto& [h, free] : handles_) free();
}

void Daemon::keep_handle(void* h, std::function<void()> free) {
  std::lock_guard lk(handles_mutex_);
  handles_.emplace(h, std::move(free));
}

void Daemon::drop_handle(void* h) {
  std::lock_guard lk(handles_mutex_);
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
  control_ = std::make_unique<ControlServer>(control_path_, getuid(), *this);
  control_->start();
  notifier_ = std::thread([this] { notifier_loop(); });
  prefetcher_ = std::thread([this] { prefetch_loop(); });
}

void Daemon::prefetch_loop() {
  std::unique_lock lk(notify_mutex_);
  for (;;) {
    prefetch_cv_.wait(lk, [this] { return notify_stop_ || !prefetch_queue_.empty(); });
    if (notify_stop_) return;
    PrefetchJob job = std::move(prefetch_queue_.front());
    prefetch_queue_.pop_front();
    lk.unlock();
    if (std::shared_ptr<File> file = job.file.lock()) {
      file->prefetch(job.first, job.last);
      cache_.balance(file.get());
    }
    lk.lock();
  }
}

void Daemon::stop_threads() {
  control_.reset();
  {
    std::lock_guard lk(notify_mutex_);
    notify_stop_ = true;
  }
  notify_cv_.notify_all();
  prefetch_cv_.notify_all();
  if (notifier_.joinable()) notifier_.join();
  if (prefetcher_.joinable()) prefetcher_.join();
}

void Daemon::queue_invalidate(uint64_t nodeid) {
  {
    std::lock_guard lk(notify_mutex_);
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
  std::unique_lock lk(notify_mutex_);
  for (;;) {
    notify_cv_.wait(lk, [this] { return notify_stop_ || !notify_queue_.empty(); });
    if (notify_stop_) return;
    uint64_t nodeid = notify_queue_.front();
    notify_queue_.pop_front();
    lk.unlock();
    // -ENOENT: the kernel no longer knows the inode; nothing cached then.
    if (se_) fuse_lowlevel_notify_inval_inode(se_, nodeid, 0, 0);
    lk.lock();
  }
}

std::string Daemon::rel_path(const Inode& inode) { return rel_path(inode, 0); }

std::string Daemon::rel_path(const Inode& inode, int depth) {
  if (&inode == &inodes_.root()) return "";
  char link[64];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", inode.fd);
  std::string buf(PATH_MAX, '\0');
  ssize_t n = readlink(link, buf.data(), buf.size());
  if (n < 0) return "?";
  buf.resize(static_cast<size_t>(n));
  static const std::string kDeleted = " (deleted)";
  if (buf.size() > kDeleted.size() && buf.compare(buf.size() - kDeleted.size(), kDeleted.size(), kDeleted) == 0 &&
      depth < 64) {
    // The name the fd was opened by is gone; another hard link may remain:
    // the last name the kernel looked it up by, checked against the source.
    std::pair<dev_t, ino_t> parent;
    std::string name;
    {
      std::lock_guard lk(const_cast<Inode&>(inode).m);
      parent = inode.parent;
      name = inode.name;
    }
    std::shared_ptr<Inode> dir = parent == std::make_pair(inodes_.root().dev, inodes_.root().ino)
                                     ? nullptr
                                     : inodes_.find(parent.first, parent.second);
    const Inode* d = dir ? dir.get() : (parent.first || parent.second ? &inodes_.root() : nullptr);
    struct stat st;
    if (d && !name.empty() && fstatat(d->fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) == 0 &&
        st.st_dev == inode.dev && st.st_ino == inode.ino) {
      std::string base = rel_path(*d, depth + 1);
      return base.empty() ? name : base + "/" + name;
    }
    // A name made outside the mount: look for it, in the last directory first.
    std::string base = d ? rel_path(*d, depth + 1) : "";
    std::string found = find_name(d ? d->fd : inodes_.root().fd, inode, 1);
    if (!found.empty()) return base.empty() ? found : base + "/" + found;
    found = find_name(inodes_.root().fd, inode, 8);
    if (!found.empty()) return found;
  }
  const std::string& root = opts_.source;
  if (root == "/") return buf.substr(1);
  if (buf.compare(0, root.size(), root) == 0 && buf.size() > root.size() && buf[root.size()] == '/')
    return buf.substr(root.size() + 1);
  return buf;  // outside the source (should not happen); shown as is
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
      std::lock_guard lk(notify_mutex_);
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

void Daemon::keep_snapshot(Inode& inode) {
  std::shared_ptr<File> file;
  {
    std::lock_guard lk(inode.m);
    if (!inode.file || inode.file->handles.load() != 0 || inode.file->has_staged()) return;
    file = std::move(inode.file);
  }
  // Until it is attached to an Inode again, nothing in the kernel is its.
  file->set_invalidate_hook([] {});
  kept_.keep(inode.dev, inode.ino, std::move(file));
}

std::shared_ptr<File> Daemon::file_of(Inode& inode, bool& keep_cache, int& err) {
  // The name first: rel_path may take inode.m itself.
  const std::string name = rel_path(inode);
  std::lock_guard lk(inode.m);
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
      inode.file->revalidate();
      return inode.file;
    }
  }
  if (inode.file) {
    File::Validity v = inode.file->revalidate();
    keep_cache = v == File::Validity::Unchanged;
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
    PersistConfig persist{persist_prefix_ + std::to_string(inode.dev) + "." + std::to_string(inode.ino),
                          opts_.source};
    std::unique_ptr<Source> source;
    if (reflink_) {
      // The snapshot is a clone: outside changes cannot reach it (spec 5.2).
      // Taken now, before any page is served, so no window is left open.
      try {
        source = std::make_unique<CloneSource>(fd, writable, state_dir_fd_,
                                               "snap." + std::to_string(inode.dev) + "." + std::to_string(inode.ino));
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
    return file;
  } catch (const std::exception& e) {
    log_error("%s", e.what());
    err = EIO;
    return nullptr;
  }
}

void Daemon::recover_persisted() {
  if (int n = reclaim_orphans(); n > 0)
    log_info("reclaimed %d shared-memory files of staged data whose source directory no longer exists", n);
  for (const std::string& meta_path : list_persisted(persist_prefix_)) {
    std::string why;
    std::unique_ptr<PersistMeta> meta = PersistMeta::open_existing(meta_path, why);
    if (!meta) {
      if (why != "in use by a running daemon")
        log_error("%s: cannot restore staged pages from it: %s", meta_path.c_str(), why.c_str());
      continue;
    }
    const PersistedHeader& h = meta->header();
    const std::string rel(h.path, h.path_len);
    const std::string seg_path = meta_path.substr(0, meta_path.size() - 5) + ".seg";
    int pfd = openat(source_root_fd_, rel.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC);
    struct stat st;
    if (pfd < 0 || fstat(pfd, &st) < 0 || st.st_dev != h.dev || st.st_ino != h.ino || !S_ISREG(st.st_mode)) {
      log_error("%s: staged changes left by a previous daemon cannot be restored: the file is gone "
                "or replaced; they are dropped", rel.c_str());
      if (pfd >= 0) close(pfd);
      meta->keep(false);
      unlink(seg_path.c_str());
      remove_spill_file(static_cast<dev_t>(h.dev), static_cast<ino_t>(h.ino));
      continue;
    }
    std::shared_ptr<Inode> inode = inodes_.lookup(pfd, st);
    bool writable = false;
    int fd = open_source(*inode, writable);
    try {
      if (fd < 0) throw std::system_error(-fd, std::generic_category(), "open " + rel);
      uint64_t restored = 0;
      auto file = std::make_shared<File>(std::make_unique<FdSource>(fd, writable), counters_, rel,
                                         std::move(meta), seg_path, restored);
      {
        std::lock_guard lk(inode->m);
        inode->file = file;
      }
      attach(*inode, file);
      bool conflict = file->revalidate() == File::Validity::Conflict;
      log_info("%s: restored %llu staged pages left by a previous daemon%s", rel.c_str(),
               static_cast<unsigned long long>(restored),
               conflict ? " (the source changed since: conflict)" : "");
    } catch (const std::exception& e) {
      log_error("%s: cannot restore its staged pages: %s (they stay in %s)", rel.c_str(), e.what(),
                seg_path.c_str());
    }
    // No kernel reference: the Inode stays in the table while it has staged data.
    inodes_.forget(inodes_.nodeid(*inode), 1);
  }
  // Spill files and reflink clones no restored file uses: left by a daemon
  // whose shared memory did not survive (a reboot). Another live daemon of
  // this source holds its metadata locked, and its files are kept.
  if (state_dir_fd_ < 0) return;
  DIR* d = fdopendir(dup(state_dir_fd_));
  if (!d) return;
  std::vector<std::string> stale;
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    bool spill = n.rfind("spill.", 0) == 0, snap = n.rfind("snap.", 0) == 0;
    if (!spill && !snap) continue;
    unsigned long long dev = 0, ino = 0;
    if (std::sscanf(n.c_str() + (spill ? 6 : 5), "%llu.%llu", &dev, &ino) != 2) continue;
    std::shared_ptr<Inode> in = inodes_.find(static_cast<dev_t>(dev), static_cast<ino_t>(ino));
    bool used = in && [&] {
      std::lock_guard lk(in->m);
      return in->file != nullptr;
    }();
    // Staged state that still names it (a live daemon of the same source,
    // or a restore that failed and was kept) keeps it too.
    std::string meta = persist_prefix_ + std::to_string(dev) + "." + std::to_string(ino) + ".meta";
    if (!used && access(meta.c_str(), F_OK) != 0) stale.push_back(n);
  }
  closedir(d);
  for (const std::string& n : stale) {
    unlinkat(state_dir_fd_, n.c_str(), 0);
    log_info("%s/.deferfs/%s: removed (left by an earlier daemon, nothing refers to it)", opts_.source.c_str(),
             n.c_str());
  }
}

static std::string spill_name(dev_t dev, ino_t ino) {
  return "spill." + std::to_string(dev) + "." + std::to_string(ino);
}

void Daemon::remove_spill_file(dev_t dev, ino_t ino) {
  if (state_dir_fd_ >= 0) unlinkat(state_dir_fd_, spill_name(dev, ino).c_str(), 0);
}

int Daemon::open_spill_file(dev_t dev, ino_t ino) {
  // .deferfs at the source root: hidden from the mount, on the source's own
  // filesystem (spec 3, state_dir). Named per source object, so staged pages
  // spilled there outlive the daemon like those in shared memory (spec 6.5).
  if (state_dir_fd_ < 0) {
    log_error("%s/.deferfs: not available; staged pages cannot spill to disk", opts_.source.c_str());
    return -EROFS;
  }
  const std::string name = spill_name(dev, ino);
  int fd = openat(state_dir_fd_, name.c_str(), O_CREAT | O_RDWR | O_CLOEXEC | O_NOFOLLOW, 0600);
  struct stat st;
  if (fd >= 0 && (fstat(fd, &st) < 0 || st.st_uid != geteuid() || !S_ISREG(st.st_mode) || st.st_nlink != 1)) {
    // Not ours (planted): never write staged data into it. Replace it.
    close(fd);
    unlinkat(state_dir_fd_, name.c_str(), 0);
    fd = openat(state_dir_fd_, name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC | O_NOFOLLOW, 0600);
  }
  int err = errno;
  if (fd < 0) {
    log_error("%s/.deferfs: cannot create a spill file: %s", opts_.source.c_str(), std::strerror(err));
    return -err;
  }
  return fd;
}

int Daemon::commit_one(Inode& inode) {
  std::shared_ptr<File> file;
  {
    std::lock_guard lk(inode.m);
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
    std::lock_guard lk(inode.m);
    file = inode.file;
  }
  if (!file || file->handles.load() != 0) return;
  struct stat st;
  if (fstat(inode.fd, &st) == 0 && st.st_nlink == 0) {
    // Unlinked on the source and closed everywhere: the data has no name
    // left to be committed to (spec 6.6).
    file->discard();
    std::lock_guard lk(inode.m);
    if (file->handles.load() == 0) inode.file.reset();
  }
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
    std::lock_guard lk(inode.m);
    file = inode.file;
  }
  if (file) file->adopt_metadata_change(times_set);
}

std::string Daemon::find_name(int dir_fd, const Inode& inode, int max_depth) {
  // Breadth-first, bounded: this runs only for a file whose known name is
  // gone while it still has links (rare), and must stay cheap.
  struct Dir { int fd; std::string rel; int depth; };
  std::deque<Dir> todo;
  int fd0 = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd0 < 0) return "";
  todo.push_back({fd0, "", 1});
  std::string result;
  size_t visited = 0;
  while (!todo.empty() && result.empty() && visited < 20000) {
    Dir cur = todo.front();
    todo.pop_front();
    DIR* dp = fdopendir(cur.fd);
    if (!dp) {
      close(cur.fd);
      continue;
    }
    while (dirent* e = readdir(dp)) {
      ++visited;
      if (!std::strcmp(e->d_name, ".") || !std::strcmp(e->d_name, "..") || !std::strcmp(e->d_name, ".deferfs"))
        continue;
      std::string rel = cur.rel.empty() ? e->d_name : cur.rel + "/" + e->d_name;
      if (e->d_ino == inode.ino) {
        struct stat st;
        if (fstatat(dirfd(dp), e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && st.st_dev == inode.dev &&
            st.st_ino == inode.ino) {
          result = rel;
          break;
        }
      }
      if (e->d_type == DT_DIR && cur.depth < max_depth) {
        int sub = openat(dirfd(dp), e->d_name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (sub >= 0) todo.push_back({sub, rel, cur.depth + 1});
      }
    }
    closedir(dp);
  }
  for (Dir& rest : todo) close(rest.fd);
  return result;
}

bool Daemon::matches(const std::string& rel, const std::vector<std::string>& paths) {
  if (paths.empty()) return true;
  for (const std::string& p : paths) {
    if (p.empty() || p == "." || rel == p) return true;
    if (rel.size() > p.size() && rel.compare(0, p.size(), p) == 0 && rel[p.size()] == '/') return true;
  }
  return false;
}

std::vector<CommitTarget> Daemon::targets(const std::vector<std::string>& paths, bool staged_only) {
  std::vector<CommitTarget> out;
  for (const auto& inode : inodes_.with_files()) {
    std::shared_ptr<File> file;
    {
      std::lock_guard lk(inode->m);
      file = inode->file;
    }
    if (!file || (staged_only && !file->has_staged())) continue;
    std::string rel = rel_path(*inode);
    if (!matches(rel, paths)) continue;
    file->set_name(rel);
    out.push_back({file, rel});
  }
  std::sort(out.begin(), out.end(),
            [](const CommitTarget& a, const CommitTarget& b) { return a.path < b.path; });
  return out;
}

SyncReport Daemon::sync(const std::vector<std::string>& paths, bool force, const Progress& progress) {
  flush_kernel_writes();  // what was written through a mapping is committed too
  std::vector<CommitTarget> committed = targets(paths, true);
  std::unordered_set<const File*> touched;
  for (const CommitTarget& t : committed) touched.insert(t.file.get());
  SyncReport r = committer_.commit(committed, force, progress);
  for (const auto& inode : inodes_.with_files()) {
    std::shared_ptr<File> file;
    {
      std::lock_guard lk(inode->m);
      file = inode->file;
    }
    if (!file) continue;
    if (file->take_stale_kernel_cache()) {
      // Its base changed under the kernel's cache (committed over an outside
      // change, or re-snapshotted): drop its pages before returning.
      refresh_kernel_view(*inode);
    } else if (touched.count(file.get())) {
      // Committed: stat now shows the source's own times, which the kernel
      // may hold cached from the staged view (regular files' attributes are
      // cached for a second).
      invalidate_attributes(*inode);
    }
  }
  for (const auto& inode : inodes_.with_files()) inodes_.prune(*inode);
  return r;
}

StatusReport Daemon::status(const std::vector<std::string>& paths) {
  flush_kernel_writes();  // pages written through a mapping are staged too
  StatusReport r;
  const uint64_t ps = opts_.page_size;
  for (const CommitTarget& t : targets(paths, true)) {
    t.file->revalidate();  // status says what conflicts now (spec 2)
    File::Info i = t.file->info();
    StatusEntry e;
    e.path = t.path;
    e.size = i.size;
    e.dirty_pages = i.dirty_pages;
    e.dirty_bytes = i.dirty_pages * ps;
    e.state = i.conflict ? FileState::Conflict : FileState::Staged;
    r.dirty_pages += e.dirty_pages;
    r.dirty_bytes += e.dirty_bytes;
    r.files.push_back(std::move(e));
  }
  return r;
}

DiscardReport Daemon::discard(const std::vector<std::string>& paths) {
  DiscardReport r;
  // One still in flight would stage its page again after the discard.
  flush_kernel_writes();
  for (const auto& inode : inodes_.with_files()) {
    std::shared_ptr<File> file;
    {
      std::lock_guard lk(inode->m);
      file = inode->file;
    }
    if (!file || !file->has_staged()) continue;
    if (!matches(rel_path(*inode), paths)) continue;
    // Dirty pages the kernel still holds (mmap writes) are written back when
    // its cache is invalidated: let that happen first, so they are dropped
    // with the rest instead of staged again after the discard.
    invalidate_now(*inode);
    r.pages_dropped += file->discard();
    ++r.files;
    // The kernel's cached pages and size show staged bytes: drop them before
    // the command returns (this is the control thread, not a FUSE request).
    refresh_kernel_view(*inode);
    file->take_stale_kernel_cache();
    inodes_.prune(*inode);
  }
  return r;
}

StatsReport Daemon::stats() {
  StatsReport s;
  s.page_size = opts_.page_size;
  for (const auto& inode : inodes_.with_files()) {
    std::shared_ptr<File> file;
    {
      std::lock_guard lk(inode->m);
      file = inode->file;
    }
    if (!file) continue;
    File::Info i = file->info();
    ++s.snapshots;
    s.files_open += static_cast<uint64_t>(std::max(0, file->handles.load()));
    s.materialized_bytes += i.resident_bytes;
    s.dirty_pages += i.dirty_pages;
    s.dirty_bytes += i.dirty_pages * opts_.page_size;
  }
  for (const auto& file : kept_.files()) {
    ++s.snapshots;
    ++s.snapshots_kept;
    s.materialized_bytes += file->info().resident_bytes;
  }
  s.loaded_bytes = counters_.loaded_bytes.load();
  s.skipped_pages = counters_.skipped_pages.load();
  s.synced_bytes = counters_.synced_bytes.load();
  s.evicted_bytes = counters_.evicted_bytes.load();
  s.cache_limit_bytes = cache_.cache_limit();
  s.dirty_limit_bytes = cache_.dirty_limit();
  s.spilled_bytes = static_cast<uint64_t>(std::max<int64_t>(0, counters_.spilled_bytes.load()));
  s.spilled_total_bytes = counters_.spilled_total_bytes.load();
  s.daemon_rss_bytes = rss_bytes();
  s.pid = getpid();
  s.source = opts_.source;
  s.mountpoint = opts_.mountpoint;
  return s;
}

int Daemon::unmount_now() {
  if (umount2(opts_.mountpoint.c_str(), 0) == 0) return 0;
  if (errno != EPERM) return -errno;
  // Not root: the setuid helper does it.
  pid_t pid;
  const char* argv[] = {"fusermount3", "-u", "-q", opts_.mountpoint.c_str(), nullptr};
  int rc = posix_spawnp(&pid, "fusermount3", nullptr, nullptr, const_cast<char**>(argv), environ);
  if (rc != 0) return -rc;
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -EBUSY;
}

SyncReport Daemon::umount(bool discard_staged) {
  SyncReport r;
  if (discard_staged) {
    discard({});
    discard_on_exit_ = true;
  } else {
    r = sync({}, false, {});
    if (!r.ok()) return r;  // nothing is lost: the mount stays
  }
  if (int rc = unmount_now(); rc < 0) {
    r.failed.push_back({"", std::string("cannot unmount ") + opts_.mountpoint + ": " + std::strerror(-rc)});
    discard_on_exit_ = false;
  }
  return r;
}

void Daemon::final_sync() {
  if (discard_on_exit_) return;
  SyncReport r = committer_.commit(targets({}, true), false, {});
  if (r.files) log_info("synced %llu files at exit", static_cast<unsigned long long>(r.files));
  for (const auto& c : r.conflicts)
    log_error("%s: staged changes NOT committed at exit: conflict with an outside change", c.c_str());
  for (const auto& f : r.failed)
    log_error("%s: staged changes NOT committed at exit: %s; they are kept for the next mount of %s",
              f.path.c_str(), f.error.c_str(), opts_.source.c_str());
}

// ------------------------------------------------------------------ run

namespace {

// The mount's readahead: the kernel offers FUSE 128 KiB; root may raise the
// mount's bdi to 1 MiB, which makes sequential READs 1 MiB long (8x fewer
// requests). Found through mountinfo (a stat of the mount point would be a
// request to ourselves). Best effort: not root, no change.
void raise_readahead(const std::string& mountpoint) {
  std::FILE* f = std::fopen("/proc/self/mountinfo", "r");
  if (!f) return;
  char line[4096];
  std::string dev;
  while (std::fgets(line, sizeof line, f)) {
    char id[32], parent[32], majmin[64], root[2048], mp[2048];
    if (std::sscanf(line, "%31s %31s %63s %2047s %2047s", id, parent, majmin, root, mp) == 5 && mountpoint == mp)
      dev = majmin;  // the last one is the topmost mount
  }
  std::fclose(f);
  if (dev.empty()) return;
  std::FILE* ra = std::fopen(("/sys/class/bdi/" + dev + "/read_ahead_kb").c_str(), "w");
  if (!ra) return;
  std::fputs("1024\n", ra);
  std::fclose(ra);
}

std::string escape_opt(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == ',' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

int make_state_dir(const std::string& dir) {
  std::string partial;
  for (size_t i = 1; i <= dir.size(); ++i) {
    if (i == dir.size() || dir[i] == '/') {
      partial = dir.substr(0, i);
      if (mkdir(partial.c_str(), 0755) < 0 && errno != EEXIST) return -errno;
    }
  }
  struct stat st;
  if (stat(dir.c_str(), &st) < 0) return -errno;
  return S_ISDIR(st.st_mode) ? 0 : -ENOTDIR;
}

}  // namespace

int run_daemon(const MountOptions& given) {
  MountOptions opts = given;
  resolve_memory_defaults(opts);
  // Page-map tables come and go in sizes of megabytes: keep them in mmap'd
  // chunks that return to the system when freed (glibc's adaptive threshold
  // would move them into arenas that never shrink), and few arenas.
  mallopt(M_MMAP_THRESHOLD, 256 * 1024);
  mallopt(M_ARENA_MAX, 4);
  // Modes of created objects arrive with the caller's umask applied by the
  // kernel: the daemon's own must not mask them a second time.
  umask(0);
  // Open the source before the mount can hide it (deferfs DIR DIR).
  int root_fd = open(opts.source.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (root_fd < 0) {
    std::fprintf(stderr, "deferfs: %s: %s\n", opts.source.c_str(), std::strerror(errno));
    return 2;
  }
  if (int rc = make_state_dir(opts.state_dir); rc < 0) {
    std::fprintf(stderr, "deferfs: state_dir %s: %s\n", opts.state_dir.c_str(), std::strerror(-rc));
    close(root_fd);
    return 2;
  }

  std::vector<std::string> argv_s = {"deferfs"};
  // default_permissions always: the kernel enforces the source's modes and
  // owners (spec 8.1), also for other users under allow_other.
  std::string o = "fsname=" + escape_opt(opts.source) + ",subtype=deferfs,default_permissions";
  if (opts.read_only) o += ",ro";
  for (const std::string& f : opts.fuse_options) o += "," + f;
  argv_s.push_back("-o");
  argv_s.push_back(o);
  if (opts.debug) argv_s.push_back("-d");
  std::vector<char*> argv;
  for (auto& s : argv_s) argv.push_back(s.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());

  // The hidden state directory on the source (journal, spill files), and
  // whatever an interrupted sync left there: finished or dropped before
  // anything is served (spec 6.3).
  int state_fd = -1;
  if (!opts.read_only) {
    if (mkdirat(root_fd, ".deferfs", 0700) < 0 && errno != EEXIST)
      std::fprintf(stderr, "deferfs: %s/.deferfs: %s; sync will not be possible\n", opts.source.c_str(),
                   std::strerror(errno));
    state_fd = openat(root_fd, ".deferfs", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    // Trusted only if it is ours and nobody else can write in it: the
    // journal replayed at mount and the spill files live there.
    // Ours but open to others: close it to them (what others may have put
    // in it is checked file by file: journal and spill files must be ours).
    struct stat sst;
    if (state_fd >= 0 && fstat(state_fd, &sst) == 0 && sst.st_uid == geteuid() && (sst.st_mode & 077) != 0)
      fchmod(state_fd, 0700);
    if (state_fd >= 0 && (fstat(state_fd, &sst) < 0 || sst.st_uid != geteuid() || (sst.st_mode & 077) != 0)) {
      std::fprintf(stderr, "deferfs: %s/.deferfs: not owned by uid %u with mode 0700; not used "
                           "(sync and spill need it: remove it or fix its owner and mode)\n",
                   opts.source.c_str(), static_cast<unsigned>(geteuid()));
      close(state_fd);
      state_fd = -1;
    }
    if (state_fd >= 0 && Committer::recover(root_fd, state_fd) < 0)
      std::fprintf(stderr, "deferfs: %s: an interrupted sync could not be finished (see above)\n",
                   opts.source.c_str());
  }
  // snapshot=auto picks reflink where the source filesystem can clone.
  bool reflink = false;
  if (opts.snapshot != SnapshotMode::Guard && state_fd >= 0) reflink = reflink_supported(state_fd);
  if (opts.snapshot == SnapshotMode::Reflink && !reflink) {
    if (opts.read_only)
      std::fprintf(stderr, "deferfs: snapshot=reflink: not with ro (the clones live in %s/.deferfs, "
                           "which a read-only mount does not write)\n", opts.source.c_str());
    else
      std::fprintf(stderr, "deferfs: snapshot=reflink: %s cannot clone files (FICLONE): use snapshot=guard or auto\n",
                   opts.source.c_str());
    if (state_fd >= 0) close(state_fd);
    close(root_fd);
    return 2;
  }
  Daemon daemon(opts, root_fd, state_fd, reflink);
  if (!opts.read_only) daemon.recover_persisted();
  const fuse_lowlevel_ops ops = make_fuse_ops();
  fuse_session* se = fuse_session_new(&args, &ops, sizeof ops, &daemon);
  if (!se) {
    std::fprintf(stderr, "deferfs: the FUSE options were refused (see the message above)\n");
    return 2;
  }
  daemon.set_session(se);
  int status = 1;
  if (fuse_set_signal_handlers(se) != 0) {
    fuse_session_destroy(se);
    return 1;
  }
  if (fuse_session_mount(se, opts.mountpoint.c_str()) != 0) {
    std::fprintf(stderr, "deferfs: cannot mount on %s\n", opts.mountpoint.c_str());
    fuse_remove_signal_handlers(se);
    fuse_session_destroy(se);
    return 1;
  }
  raise_readahead(opts.mountpoint);
  if (fuse_daemonize(opts.foreground || opts.debug) != 0) {
    fuse_session_unmount(se);
    fuse_remove_signal_handlers(se);
    fuse_session_destroy(se);
    return 1;
  }
  log_to_syslog(!(opts.foreground || opts.debug));
  log_set_debug(opts.debug);
  try {
    daemon.start_threads();
    log_info("serving %s on %s (page size %llu, %s snapshots)", opts.source.c_str(), opts.mountpoint.c_str(),
             static_cast<unsigned long long>(opts.page_size), reflink ? "reflink" : "guarded");
    fuse_loop_config* cfg = fuse_loop_cfg_create();
    fuse_loop_cfg_set_clone_fd(cfg, 1);
    fuse_loop_cfg_set_max_threads(cfg, 16);
    fuse_loop_cfg_set_idle_threads(cfg, 8);
    status = fuse_session_loop_mt(se, cfg) == 0 ? 0 : 1;
    fuse_loop_cfg_destroy(cfg);
    // Unmounted (umount, fusermount3 -u) or signalled: commit what is staged.
    daemon.final_sync();
  } catch (const std::exception& e) {
    log_error("%s", e.what());
    status = 1;
  }
  daemon.stop_threads();
  fuse_session_unmount(se);
  fuse_remove_signal_handlers(se);
  daemon.set_session(nullptr);
  fuse_session_destroy(se);
  fuse_opt_free_args(&args);
  return status;
}

}  // namespace deferfs
