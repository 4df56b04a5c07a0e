// Staged data that outlives a daemon (spec 6.5): restoring what a previous
// daemon of this SOURCE left, and the named spill files of its Files.
#include "deferfs/daemon.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "deferfs/log.h"
#include "deferfs/persist.h"

namespace deferfs {

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
        MutexLock lk(inode->m);
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
      MutexLock lk(in->m);
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


}  // namespace deferfs
