// Staged data that outlives a daemon (spec 6.5, issues 13 and 16):
// restoring what an earlier daemon of this SOURCE left
// (Daemon::recover_persisted), and the named spill files of its Files.
//
// Rules, in order:
//   - Files a live daemon holds (its flock on the metadata, its instance
//     lock in .deferfs) are never touched.
//   - Staged data is restored only onto the very file it was staged for:
//     the source root must be the same directory (FileIdentity of the root,
//     not its path) and the file the same inode (number plus generation or
//     birth time). A file renamed while no daemon ran is followed by its
//     handle when the handle proves it is the same file.
//   - Anything else is kept aside as an orphan (orphans.h) and reported;
//     never applied to another file, never dropped.
//   - Restored state is renamed to this mount's instance id: it is ours now.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <set>

#include "deferfs/daemon.h"
#include "deferfs/instance.h"
#include "deferfs/log.h"
#include "deferfs/orphans.h"
#include "deferfs/persist.h"

namespace deferfs {

namespace {

std::string real_path(const std::string& p) {
  char* r = realpath(p.c_str(), nullptr);
  if (!r) return p;
  std::string out = r;
  std::free(r);
  return out;
}

// The spill file a metadata file's pages in the spill refer to.
std::string spill_of(const PersistedHeader& h) {
  if (h.version < 2 || h.instance[0] == 0) return "spill." + std::to_string(h.dev) + "." + std::to_string(h.ino);
  return spill_name(std::string(h.instance, strnlen(h.instance, sizeof h.instance)), h.dev, h.ino);
}

// Parses "spill.ID.DEV.INO" or the older "spill.DEV.INO": the id ("" for
// the older form). False if it is neither.
bool parse_spill(const std::string& n, std::string& id) {
  if (n.rfind("spill.", 0) != 0) return false;
  unsigned long long dev, ino;
  char rest[64];
  if (std::sscanf(n.c_str() + 6, "%llu.%llu%63s", &dev, &ino, rest) == 2) {
    id.clear();
    return true;
  }
  const size_t dot = n.find('.', 6);
  if (dot == std::string::npos || dot - 6 != 16) return false;
  id = n.substr(6, 16);
  return std::sscanf(n.c_str() + dot + 1, "%llu.%llu%63s", &dev, &ino, rest) == 2;
}

}  // namespace

std::vector<std::string> Daemon::orphans() const {
  return state_dir_fd_ < 0 ? std::vector<std::string>{} : list_orphans(state_dir_fd_);
}

bool Daemon::keep_aside(PersistMeta& meta, const std::string& seg_path, const std::string& reason) {
  const PersistedHeader& h = meta.header();
  const std::string rel(h.path, strnlen(h.path, sizeof h.path));
  const std::string spill = spill_of(h);
  if (state_dir_fd_ < 0) {
    log_error("%s: staged changes left by an earlier daemon are not this file's (%s); they stay in %s "
              "(no %s/.deferfs to keep them aside in)",
              rel.c_str(), reason.c_str(), seg_path.c_str(), opts_.source.c_str());
    meta.keep(true);
    return false;
  }
  OrphanInput in;
  in.path = rel;
  in.reason = reason;
  if (h.version >= 2) {
    in.identity = h.file_id;
  } else {
    in.identity.dev = h.dev;
    in.identity.ino = h.ino;
  }
  in.page_size = h.page_size;
  in.base_size = h.base_size;
  in.size = h.size;
  int seg_fd = open(seg_path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  int spill_fd = openat(state_dir_fd_, spill.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  for (uint64_t p : meta.staged_pages()) {
    if (h.page_size && p * h.page_size >= h.size) continue;
    const int fd = meta.get(p) == PersistedPage::InSegment ? seg_fd : spill_fd;
    if (fd >= 0) in.pages.push_back({p, fd});
  }
  std::string error;
  const std::string name = keep_orphan(state_dir_fd_, in, error);
  if (seg_fd >= 0) close(seg_fd);
  if (spill_fd >= 0) close(spill_fd);
  if (name.empty()) {
    log_error("%s: staged changes left by an earlier daemon are not this file's (%s), and cannot be kept "
              "aside (%s): they stay in %s",
              rel.c_str(), reason.c_str(), error.c_str(), seg_path.c_str());
    meta.keep(true);
    return false;
  }
  log_error("%s: %zu staged pages left by an earlier daemon were not applied (%s); kept aside in "
            "%s/.deferfs/orphans/%s (see `deferfs orphans`)",
            rel.c_str(), in.pages.size(), reason.c_str(), opts_.source.c_str(), name.c_str());
  meta.keep(false);
  unlink(seg_path.c_str());
  unlinkat(state_dir_fd_, spill.c_str(), 0);
  return true;
}

void Daemon::recover_persisted() {
  if (int n = count_homeless(); n > 0)
    log_info("%d sets of staged data in /dev/shm belong to source directories that no longer exist; kept "
             "(a mount of a directory made again at that path keeps them aside in its .deferfs/orphans)", n);
  const std::string root_path = real_path(opts_.source);
  const std::string host = this_host();
  std::set<std::string> spills_in_use;  // spill files a metadata file still names (kept, or restored)
  for (const std::string& meta_path : list_persisted(persist_prefix_)) {
    std::string why;
    std::unique_ptr<PersistMeta> meta = PersistMeta::open_existing(meta_path, why);
    if (!meta) {
      if (why != "in use by a running daemon")
        log_error("%s: cannot restore staged pages from it: %s", meta_path.c_str(), why.c_str());
      continue;
    }
    PersistedHeader& h = meta->header();
    const std::string recorded_root(h.source_root, strnlen(h.source_root, sizeof h.source_root));
    if (real_path(recorded_root) != root_path && recorded_root != opts_.source) {
      meta->keep(true);  // another source whose path hashes alike: not ours to judge
      continue;
    }
    std::string rel(h.path, h.path_len);
    const std::string seg_path = meta_path.substr(0, meta_path.size() - 5) + ".seg";
    // 1. The root: the same directory, not only the same path.
    std::string reason;
    if (h.version < 2) {
      reason = "left by an earlier deferfs that recorded no identity of the file";
    } else if (compare_identity(h.root_id, root_id_, false) == Sameness::Other ||
               (compare_identity(h.root_id, root_id_, false) == Sameness::Unproven && h.root_id.dev != root_id_.dev)) {
      reason = "the source directory was made again since (" + describe_identity(h.root_id) + ", now " +
               describe_identity(root_id_) + ")";
    }
    // 2. The file: the very one staged for, at its path or followed by its handle.
    int pfd = -1;
    struct stat st;
    if (reason.empty()) {
      auto same_here = [&](const std::string& path) {
        pfd = openat(source_root_fd_, path.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC);
        FileIdentity now;
        bool same = false;
        if (pfd >= 0 && fstat(pfd, &st) == 0 && S_ISREG(st.st_mode) && take_identity(pfd, now) == 0) {
          switch (compare_identity(h.file_id, now, false)) {
            case Sameness::Same: same = true; break;
            case Sameness::Other: break;
            case Sameness::Unproven:
              // Neither generation nor birth time on this filesystem: only an
              // untouched file (its snapshot's size, mtime and ctime) is proven.
              same = static_cast<uint64_t>(st.st_size) == h.id_size && st.st_mtim.tv_sec == h.id_mtime_sec &&
                     st.st_mtim.tv_nsec == h.id_mtime_nsec && st.st_ctim.tv_sec == h.id_ctime_sec &&
                     st.st_ctim.tv_nsec == h.id_ctime_nsec;
              break;
          }
        }
        if (!same && pfd >= 0) {
          close(pfd);
          pfd = -1;
        }
        return same;
      };
      if (!same_here(rel)) {
        const std::string moved = find_by_handle(source_root_fd_, root_path, h.file_id);
        if (!moved.empty() && same_here(moved)) {
          log_info("%s: renamed to %s while no daemon ran; its staged pages follow it", rel.c_str(), moved.c_str());
          rel = moved;
          // The rename moved its ctime, not its content: with its size and
          // mtime as the snapshot had them, the snapshot stands.
          if (static_cast<uint64_t>(st.st_size) == h.id_size && st.st_mtim.tv_sec == h.id_mtime_sec &&
              st.st_mtim.tv_nsec == h.id_mtime_nsec) {
            h.id_ctime_sec = st.st_ctim.tv_sec;
            h.id_ctime_nsec = st.st_ctim.tv_nsec;
          }
        } else {
          reason = "the file is gone or another file took its name or inode number (" +
                   describe_identity(h.file_id) + ")";
        }
      }
    }
    if (!reason.empty()) {
      if (!keep_aside(*meta, seg_path, reason)) spills_in_use.insert(spill_of(h));
      continue;
    }
    // 3. Ours now: renamed to this instance's names.
    const std::string old_spill = spill_of(h);
    const std::string new_base =
        persist_prefix_ + instance_id_ + "." + std::to_string(st.st_dev) + "." + std::to_string(st.st_ino);
    std::string meta_now = meta_path, seg_now = seg_path;
    if (new_base + ".meta" != meta_path && rename(meta_path.c_str(), (new_base + ".meta").c_str()) == 0) {
      meta->renamed(new_base + ".meta");
      meta_now = new_base + ".meta";
      if (rename(seg_path.c_str(), (new_base + ".seg").c_str()) == 0) seg_now = new_base + ".seg";
      std::snprintf(h.instance, sizeof h.instance, "%s", instance_id_.c_str());
      h.dev = st.st_dev;  // a distributed filesystem's client may show it under another number now
      h.version = 2;
    }
    const std::string new_spill = spill_of(h);
    if (state_dir_fd_ >= 0 && old_spill != new_spill)
      renameat(state_dir_fd_, old_spill.c_str(), state_dir_fd_, new_spill.c_str());
    spills_in_use.insert(new_spill);
    std::shared_ptr<Inode> inode = inodes_.lookup(pfd, st);
    bool writable = false;
    int fd = open_source(*inode, writable);
    try {
      if (fd < 0) throw std::system_error(-fd, std::generic_category(), "open " + rel);
      uint64_t restored = 0;
      auto file = std::make_shared<File>(std::make_unique<FdSource>(fd, writable), counters_, rel,
                                         std::move(meta), seg_now, restored);
      file->set_name(rel);
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
      log_error("%s: cannot restore its staged pages: %s (they stay in %s)", rel.c_str(), e.what(), seg_now.c_str());
    }
    // No kernel reference: the Inode stays in the table while it has staged data.
    inodes_.forget(inodes_.nodeid(*inode), 1);
  }
  if (state_dir_fd_ < 0) return;

  // Spill files and clones no restored file uses. Clones are never staged
  // data: those of dead instances (and of deferfs before instances) go.
  // Spill files of a dead instance of this host whose metadata did not
  // survive (a reboot) are kept aside; those of another host's instance are
  // that host's to restore; those of a live instance are its own.
  DIR* d = reopen_dir(state_dir_fd_);
  if (!d) return;
  std::vector<std::string> names;
  while (dirent* e = readdir(d)) names.push_back(e->d_name);
  closedir(d);
  for (const std::string& n : names) {
    std::string id;
    if (n.rfind("snap.", 0) == 0) {
      unsigned long long dev, ino;
      char rest[64];
      const bool legacy = std::sscanf(n.c_str() + 5, "%llu.%llu%63s", &dev, &ino, rest) == 2;
      id = legacy ? "" : n.substr(5, 16);
      if (id == instance_id_) continue;
      if (!legacy && !DeadInstance::claim(state_dir_fd_, id)) continue;
      unlinkat(state_dir_fd_, n.c_str(), 0);
      log_info("%s/.deferfs/%s: removed (a snapshot clone of an ended daemon)", opts_.source.c_str(), n.c_str());
      continue;
    }
    if (!parse_spill(n, id) || id == instance_id_ || spills_in_use.count(n)) continue;
    std::unique_ptr<DeadInstance> dead;
    if (!id.empty()) {
      dead = DeadInstance::claim(state_dir_fd_, id);
      if (!dead || (!dead->host().empty() && dead->host() != host)) continue;
    }
    // Its metadata is lost: the pages are what the spill file holds.
    int sfd = openat(state_dir_fd_, n.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (sfd < 0) continue;
    OrphanInput in;
    in.path = n;
    in.reason = "a spill file whose metadata (in shared memory) did not survive; the file it belongs to is "
                "not known beyond the numbers in its name";
    struct stat sst;
    fstat(sfd, &sst);
    in.size = static_cast<uint64_t>(sst.st_size);
    for (off_t pos = 0;;) {
      off_t data = lseek(sfd, pos, SEEK_DATA);
      if (data < 0) break;
      off_t hole = lseek(sfd, data, SEEK_HOLE);
      if (hole < 0) hole = sst.st_size;
      for (off_t p = data / 4096; p * 4096 < hole; ++p) in.pages.push_back({static_cast<uint64_t>(p), sfd});
      pos = hole;
    }
    std::string error;
    const std::string name = keep_orphan(state_dir_fd_, in, error);
    close(sfd);
    if (name.empty()) {
      log_error("%s/.deferfs/%s: cannot keep it aside (%s); left in place", opts_.source.c_str(), n.c_str(),
                error.c_str());
      continue;
    }
    unlinkat(state_dir_fd_, n.c_str(), 0);
    log_error("%s/.deferfs/%s: staged pages of an ended daemon whose metadata is lost; kept aside in "
              "%s/.deferfs/orphans/%s (see `deferfs orphans`)",
              opts_.source.c_str(), n.c_str(), opts_.source.c_str(), name.c_str());
  }
  // Dead instances of this host with nothing left: their lock files go.
  for (const std::string& id : instances_in(state_dir_fd_, instance_id_)) {
    std::unique_ptr<DeadInstance> dead = DeadInstance::claim(state_dir_fd_, id);
    if (!dead || (!dead->host().empty() && dead->host() != host)) continue;
    bool left = false;
    for (const std::string& n : spills_in_use) left |= n.find(id) != std::string::npos;
    if (DIR* dd = reopen_dir(state_dir_fd_)) {
      while (dirent* e = readdir(dd)) {
        const std::string n = e->d_name;
        if (n.find(id) != std::string::npos && n.rfind("instance.", 0) != 0) left = true;
      }
      closedir(dd);
    }
    if (!left) dead->retire();
  }
  if (const auto kept = orphans(); !kept.empty())
    log_info("%zu orphaned staged files are kept in %s/.deferfs/orphans (`deferfs orphans`; removed only by "
             "`deferfs orphans --remove`)", kept.size(), opts_.source.c_str());
}

void Daemon::remove_spill_file(dev_t dev, ino_t ino) {
  if (state_dir_fd_ >= 0) unlinkat(state_dir_fd_, spill_name(instance_id_, dev, ino).c_str(), 0);
}

int Daemon::open_spill_file(dev_t dev, ino_t ino) {
  // .deferfs at the source root: hidden from the mount, on the source's own
  // filesystem (spec 3, state_dir). Named per source object, so staged pages
  // spilled there outlive the daemon like those in shared memory (spec 6.5).
  if (state_dir_fd_ < 0) {
    log_error("%s/.deferfs: not available; staged pages cannot spill to disk", opts_.source.c_str());
    return -EROFS;
  }
  const std::string name = spill_name(instance_id_, dev, ino);
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
