#include "deferfs/fuse_ops.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "deferfs/caller_creds.h"
#include "deferfs/control.h"
#include "deferfs/daemon.h"
#include "deferfs/log.h"

namespace deferfs {

namespace {

// The source's hidden state directory: never shown through the mount.
constexpr const char* kHiddenDir = ".deferfs";
constexpr double kTimeout = 1.0;  // entry cache, and attributes of non-regular files, seconds
// Regular files' attributes are cached for a second too: without it every
// open makes an extra GETATTR round trip for the permission check. Where the
// daemon changes what stat shows behind the kernel it says so at once: a new
// snapshot at open (open_regular), discard (Daemon::refresh_kernel_view,
// which also pushes a smaller size: the kernel trusts its cached size for
// reads inside it), sync (Daemon::sync) and an fsync that commits
// (Daemon::commit_one). Writes and truncates through the mount update the
// kernel's view themselves. A change made to the source from outside shows
// in stat within a second, and in the data at the next open (spec 5.2).
constexpr double kFileAttrTimeout = 1.0;
double attr_timeout(const struct stat& st) { return S_ISREG(st.st_mode) ? kFileAttrTimeout : kTimeout; }

Daemon& daemon_of(fuse_req_t req) { return *static_cast<Daemon*>(fuse_req_userdata(req)); }
Inode& inode_of(fuse_req_t req, fuse_ino_t ino) { return daemon_of(req).inodes().get(ino); }

struct ProcPath {
  char buf[64];
  explicit ProcPath(int fd) { std::snprintf(buf, sizeof buf, "/proc/self/fd/%d", fd); }
  const char* c_str() const { return buf; }
};

bool hidden(fuse_ino_t parent, const char* name) {
  return parent == FUSE_ROOT_ID && std::strcmp(name, kHiddenDir) == 0;
}

// One open file handle (fi->fh).
// The kernel's lookup keeps the Inode alive while a handle is open.
struct Handle {
  std::shared_ptr<File> file;
};

// Overlays the staged size and times of a regular file on the source's stat.
void overlay(Inode& inode, struct stat& st) {
  std::shared_ptr<File> file;
  {
    std::lock_guard lk(inode.m);
    file = inode.file;
  }
  if (!file) return;
  // A file with nothing staged shows the source as it is (the snapshot is
  // re-validated at the next open); a staged one shows its staged size and
  // the time of its last staged change (or the time set through the mount).
  File::Info i = file->info();
  if (!i.staged) return;
  st.st_size = static_cast<off_t>(i.size);
  if (i.explicit_mtime) {
    st.st_mtim = i.staged_mtime;
  } else if (i.staged_mtime.tv_sec || i.staged_mtime.tv_nsec) {
    st.st_mtim = i.staged_mtime;
    st.st_ctim = i.staged_mtime;
  }
}

int stat_inode(Inode& inode, struct stat& st) {
  if (fstatat(inode.fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) return errno;
  if (S_ISREG(st.st_mode)) overlay(inode, st);
  return 0;
}

// Looks `name` up in `parent` and fills `e`; counts a kernel lookup.
int do_lookup(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_entry_param& e) {
  std::memset(&e, 0, sizeof e);
  e.attr_timeout = kTimeout;
  e.entry_timeout = kTimeout;
  if (hidden(parent, name)) return ENOENT;
  Inode& dir = inode_of(req, parent);
  int fd = openat(dir.fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return errno;
  struct stat st;
  if (fstatat(fd, "", &st, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) {
    int err = errno;
    close(fd);
    return err;
  }
  Daemon& d = daemon_of(req);
  std::shared_ptr<Inode> inode = d.inodes().lookup(fd, st);
  InodeTable::named(*inode, dir, name);
  if (S_ISREG(st.st_mode)) overlay(*inode, st);
  e.ino = d.inodes().nodeid(*inode);
  e.attr = st;
  e.attr_timeout = attr_timeout(st);
  return 0;
}

void reply_entry_or_err(fuse_req_t req, fuse_ino_t parent, const char* name, int err) {
  if (err) {
    fuse_reply_err(req, err);
    return;
  }
  fuse_entry_param e;
  err = do_lookup(req, parent, name, e);
  if (err)
    fuse_reply_err(req, err);
  else
    fuse_reply_entry(req, &e);
}

// ------------------------------------------------------------ init

void op_init(void* userdata, fuse_conn_info* conn) {
  (void)userdata;
  // Large requests: 1 MiB writes (max_pages 256), as large reads as the
  // kernel offers.
  conn->max_write = 1u << 20;
  conn->max_readahead = 1u << 20;
  // We invalidate the kernel's cache ourselves, only when data changed
  // behind it (re-snapshot, discard): keep it across mtime changes.
  if (conn->capable & FUSE_CAP_EXPLICIT_INVAL_DATA) conn->want |= FUSE_CAP_EXPLICIT_INVAL_DATA;
  conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
  // Replies are written from the segments' memory (op_read), never spliced:
  // with SPLICE_MOVE the kernel could even steal a page out of a segment.
  conn->want &= ~(FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
}

// ------------------------------------------------------------ lookup, attrs

void op_lookup(fuse_req_t req, fuse_ino_t parent, const char* name) {
  fuse_entry_param e;
  int err = do_lookup(req, parent, name, e);
  if (err == ENOENT) {
    // Negative entry, cached like a positive one.
    e.ino = 0;
    e.entry_timeout = kTimeout;
    fuse_reply_entry(req, &e);
    return;
  }
  if (err)
    fuse_reply_err(req, err);
  else
    fuse_reply_entry(req, &e);
}

void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup) {
  daemon_of(req).inodes().forget(ino, nlookup);
  fuse_reply_none(req);
}

void op_forget_multi(fuse_req_t req, size_t count, fuse_forget_data* forgets) {
  for (size_t i = 0; i < count; ++i) daemon_of(req).inodes().forget(forgets[i].ino, forgets[i].nlookup);
  fuse_reply_none(req);
}

void op_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*) {
  struct stat st;
  int err = stat_inode(inode_of(req, ino), st);
  if (err)
    fuse_reply_err(req, err);
  else
    fuse_reply_attr(req, &st, attr_timeout(st));
}

void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int valid, fuse_file_info* fi) {
  Daemon& d = daemon_of(req);
  Inode& inode = inode_of(req, ino);
  ProcPath path(inode.fd);
  int err = 0;
  if (valid & FUSE_SET_ATTR_MODE) {
    if (chmod(path.c_str(), attr->st_mode) < 0) err = errno;
  }
  if (!err && (valid & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID))) {
    uid_t uid = (valid & FUSE_SET_ATTR_UID) ? attr->st_uid : static_cast<uid_t>(-1);
    gid_t gid = (valid & FUSE_SET_ATTR_GID) ? attr->st_gid : static_cast<gid_t>(-1);
    if (fchownat(inode.fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) < 0) err = errno;
  }
  if (!err && (valid & FUSE_SET_ATTR_SIZE)) {
    if (inode.type != S_IFREG) {
      err = inode.type == S_IFDIR ? EISDIR : EINVAL;
    } else {
      std::shared_ptr<File> file;
      if (fi && fi->fh) {
        file = reinterpret_cast<Handle*>(fi->fh)->file;
      } else {
        // truncate(2) by name: check write permission on the source, then stage.
        if (access(path.c_str(), W_OK) < 0) err = errno;
        bool keep = false;
        if (!err) file = d.file_of(inode, keep, err);
      }
      if (!err && file) {
        int rc = file->truncate(static_cast<uint64_t>(attr->st_size));
        if (rc < 0) err = -rc;
      }
    }
  }
  if (!err && (valid & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME))) {
    struct timespec tv[2];
    tv[0].tv_nsec = tv[1].tv_nsec = UTIME_OMIT;
    if (valid & FUSE_SET_ATTR_ATIME_NOW)
      tv[0].tv_nsec = UTIME_NOW;
    else if (valid & FUSE_SET_ATTR_ATIME)
      tv[0] = attr->st_atim;
    if (valid & FUSE_SET_ATTR_MTIME_NOW)
      tv[1].tv_nsec = UTIME_NOW;
    else if (valid & FUSE_SET_ATTR_MTIME)
      tv[1] = attr->st_mtim;
    int rc = inode.type == S_IFLNK ? utimensat(inode.fd, "", tv, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)
                                   : utimensat(AT_FDCWD, path.c_str(), tv, 0);
    if (rc < 0) err = errno;
    if (!err && (valid & FUSE_SET_ATTR_MTIME) && inode.type == S_IFREG) {
      std::shared_ptr<File> file;
      {
        std::lock_guard lk(inode.m);
        file = inode.file;
      }
      struct timespec m = tv[1];
      if (m.tv_nsec == UTIME_NOW) clock_gettime(CLOCK_REALTIME, &m);
      if (file) file->set_explicit_mtime(m);
    }
  }
  // Our own chmod/chown/utimes changed the source's ctime (and mtime).
  if (valid & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID | FUSE_SET_ATTR_ATIME |
               FUSE_SET_ATTR_MTIME))
    d.metadata_changed(inode, (valid & FUSE_SET_ATTR_MTIME) != 0);
  if (err) {
    fuse_reply_err(req, err);
    return;
  }
  struct stat st;
  err = stat_inode(inode, st);
  if (err)
    fuse_reply_err(req, err);
  else
    fuse_reply_attr(req, &st, attr_timeout(st));
}

void op_readlink(fuse_req_t req, fuse_ino_t ino) {
  char buf[PATH_MAX + 1];
  ssize_t n = readlinkat(inode_of(req, ino).fd, "", buf, sizeof buf - 1);
  if (n < 0) {
    fuse_reply_err(req, errno);
    return;
  }
  buf[n] = 0;
  fuse_reply_readlink(req, buf);
}

// ------------------------------------------------------------ namespace

void op_mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev) {
  CallerCredentials as_caller(req);  // spec 8.1: what a user creates is theirs
  if (hidden(parent, name)) return (void)fuse_reply_err(req, EPERM);
  int rc = mknodat(inode_of(req, parent).fd, name, mode, rdev);
  reply_entry_or_err(req, parent, name, rc < 0 ? errno : 0);
}

void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode) {
  CallerCredentials as_caller(req);  // spec 8.1: what a user creates is theirs
  if (hidden(parent, name)) return (void)fuse_reply_err(req, EPERM);
  int rc = mkdirat(inode_of(req, parent).fd, name, mode);
  reply_entry_or_err(req, parent, name, rc < 0 ? errno : 0);
}

void op_symlink(fuse_req_t req, const char* link, fuse_ino_t parent, const char* name) {
  CallerCredentials as_caller(req);  // spec 8.1: what a user creates is theirs
  if (hidden(parent, name)) return (void)fuse_reply_err(req, EPERM);
  int rc = symlinkat(link, inode_of(req, parent).fd, name);
  reply_entry_or_err(req, parent, name, rc < 0 ? errno : 0);
}

void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t parent, const char* name) {
  CallerCredentials as_caller(req);  // spec 8.1: what a user creates is theirs
  if (hidden(parent, name)) return (void)fuse_reply_err(req, EPERM);
  Inode& inode = inode_of(req, ino);
  int rc = linkat(inode.fd, "", inode_of(req, parent).fd, name, AT_EMPTY_PATH);
  if (rc < 0 && errno == ENOENT) {  // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH
    ProcPath p(inode.fd);
    rc = linkat(AT_FDCWD, p.c_str(), inode_of(req, parent).fd, name, AT_SYMLINK_FOLLOW);
  }
  int err = rc < 0 ? errno : 0;
  if (!err) daemon_of(req).metadata_changed(inode, false);  // nlink and ctime changed
  reply_entry_or_err(req, parent, name, err);
}

// The source object a name refers to, to find its staged data once the name
// is gone. Returns false if the name does not exist.
bool victim_of(int dirfd, const char* name, struct stat& st) {
  return fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode);
}

void op_unlink(fuse_req_t req, fuse_ino_t parent, const char* name) {
  if (hidden(parent, name)) return (void)fuse_reply_err(req, ENOENT);
  int dirfd = inode_of(req, parent).fd;
  struct stat victim;
  bool regular = victim_of(dirfd, name, victim);
  if (unlinkat(dirfd, name, 0) < 0) return (void)fuse_reply_err(req, errno);
  if (regular) daemon_of(req).unlinked(victim.st_dev, victim.st_ino);
  fuse_reply_err(req, 0);
}

void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char* name) {
  if (hidden(parent, name)) return (void)fuse_reply_err(req, ENOENT);
  fuse_reply_err(req, unlinkat(inode_of(req, parent).fd, name, AT_REMOVEDIR) < 0 ? errno : 0);
}

void op_rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
               const char* newname, unsigned int flags) {
  if (hidden(parent, name) || hidden(newparent, newname)) return (void)fuse_reply_err(req, EPERM);
  // Staged data follows its file: it is keyed by the source inode, which a
  // rename keeps (spec 6.6).
  int olddir = inode_of(req, parent).fd;
  int newdir = inode_of(req, newparent).fd;
  struct stat victim, moved;
  bool replaces = !(flags & RENAME_EXCHANGE) && victim_of(newdir, newname, victim);
  bool moves_file = victim_of(olddir, name, moved);
  bool swapped = (flags & RENAME_EXCHANGE) && victim_of(newdir, newname, victim);
  if (renameat2(olddir, name, newdir, newname, flags) < 0) return (void)fuse_reply_err(req, errno);
  Daemon& d = daemon_of(req);
  // The moved file's ctime changed (our own doing); a replaced one lost a name.
  if (moves_file) {
    d.metadata_changed(moved.st_dev, moved.st_ino, false);
    if (auto inode = d.inodes().find(moved.st_dev, moved.st_ino))
      InodeTable::named(*inode, inode_of(req, newparent), newname);
  }
  if (swapped) d.metadata_changed(victim.st_dev, victim.st_ino, false);
  if (replaces && !(moves_file && victim.st_ino == moved.st_ino && victim.st_dev == moved.st_dev))
    d.unlinked(victim.st_dev, victim.st_ino);
  fuse_reply_err(req, 0);
}

// ------------------------------------------------------------ files

// Checks that the caller's access mode is allowed on the source, as an open
// of the source itself would (the daemon's own fd may be opened differently).
int check_open(Inode& inode, int flags) {
  ProcPath p(inode.fd);
  int fd = open(p.c_str(), (flags & O_ACCMODE) | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
  if (fd < 0) return errno;
  close(fd);
  return 0;
}

void open_regular(fuse_req_t req, Inode& inode, fuse_file_info* fi) {
  Daemon& d = daemon_of(req);
  bool keep_cache = false;
  int err = 0;
  std::shared_ptr<File> file = d.file_of(inode, keep_cache, err);
  if (!file) {
    fuse_reply_err(req, err ? err : EIO);
    return;
  }
  // A new snapshot (or one that changed): the kernel's cached size and times
  // are stale too. Attributes only: that takes no page lock, so it is safe
  // inside a request; the pages are dropped by the open itself (!keep_cache).
  if (!keep_cache) d.invalidate_attributes(inode);
  if ((fi->flags & O_ACCMODE) != O_RDONLY && !file->source().writable()) {
    fuse_reply_err(req, EACCES);
    return;
  }
  // libfuse asks for atomic O_TRUNC: the kernel sends no separate truncate.
  if ((fi->flags & O_TRUNC) && (fi->flags & O_ACCMODE) != O_RDONLY) {
    if (int rc = file->truncate(0); rc < 0) {
      fuse_reply_err(req, -rc);
      return;
    }
    keep_cache = false;
  }
  auto h = std::make_unique<Handle>();
  h->file = file;
  // The table keeps the Inode alive while the kernel holds a lookup; the
  // handle needs no separate reference to it.
  ++file->handles;
  fi->keep_cache = keep_cache ? 1 : 0;
  // A read-only handle has nothing to flush at close (no locks are served
  // here, and its mappings cannot be written): the kernel then skips the
  // FLUSH round trip of every close(2).
  fi->noflush = (fi->flags & O_ACCMODE) == O_RDONLY ? 1 : 0;
  fi->fh = reinterpret_cast<uint64_t>(h.get());
  Handle* raw = h.release();
  d.keep_handle(raw, [raw] { delete raw; });
  if (fuse_reply_open(req, fi) == -ENOENT) {  // interrupted: the open never happened
    d.drop_handle(raw);
    delete raw;
    --file->handles;
  }
}

void op_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Inode& inode = inode_of(req, ino);
  if (inode.type != S_IFREG) return (void)fuse_reply_err(req, EINVAL);
  // A read-only open needs no check of its own: the kernel checked the
  // caller's permission (default_permissions), and the daemon's own open of
  // the source (file_of) reports what stops reading it. A writable one may
  // meet what the modes do not say (a read-only filesystem, an immutable
  // file), which only an open tells.
  if ((fi->flags & O_ACCMODE) != O_RDONLY)
    if (int err = check_open(inode, fi->flags)) return (void)fuse_reply_err(req, err);
  open_regular(req, inode, fi);
}

void op_create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, fuse_file_info* fi) {
  CallerCredentials as_caller(req);  // spec 8.1: what a user creates is theirs
  if (hidden(parent, name)) return (void)fuse_reply_err(req, EPERM);
  // The name appears on the source at once (spec 6.6); the data is staged.
  int fd = openat(inode_of(req, parent).fd, name,
                  (fi->flags & ~(O_TRUNC | O_APPEND | O_DIRECT)) | O_CREAT | O_CLOEXEC | O_NOFOLLOW, mode);
  if (fd < 0) return (void)fuse_reply_err(req, errno);
  close(fd);
  as_caller.restore();  // the daemon's own open of the file (file_of) runs as root
  fuse_entry_param e;
  if (int err = do_lookup(req, parent, name, e)) return (void)fuse_reply_err(req, err);
  Daemon& d = daemon_of(req);
  Inode& inode = d.inodes().get(e.ino);
  bool keep_cache = false;
  int err = 0;
  std::shared_ptr<File> file = d.file_of(inode, keep_cache, err);
  if (!file) {
    d.inodes().forget(e.ino, 1);
    return (void)fuse_reply_err(req, err ? err : EIO);
  }
  if (fi->flags & O_TRUNC) file->truncate(0);
  auto h = std::make_unique<Handle>();
  h->file = file;
  ++file->handles;
  fi->fh = reinterpret_cast<uint64_t>(h.get());
  Handle* raw = h.release();
  d.keep_handle(raw, [raw] { delete raw; });
  if (fuse_reply_create(req, &e, fi) == -ENOENT) {
    d.drop_handle(raw);
    delete raw;
    --file->handles;
  }
}

void op_read(fuse_req_t req, fuse_ino_t, size_t size, off_t off, fuse_file_info* fi) {
  // Once replied to, req is gone and the handle may be released by another
  // thread at any moment: keep what is used afterwards.
  Daemon& d = daemon_of(req);
  const std::shared_ptr<File> file = reinterpret_cast<Handle*>(fi->fh)->file;
  // Replied straight from the segment's memory: one copy, by the kernel,
  // into the reply (libfuse 3.14's fd path, measured here, preads into a
  // fresh buffer and copies twice). The file stays pinned until the reply is
  // sent, so eviction cannot free those pages meanwhile.
  thread_local std::vector<File::Extent> extents;  // reused: no allocation per read
  extents.clear();
  ssize_t n = file->read_pinned(static_cast<uint64_t>(off), size, extents);
  if (n < 0) {
    fuse_reply_err(req, static_cast<int>(-n));
  } else {
    // Holes and cut pages. Zero-initialized and not const, so in .bss: never
    // written, its pages are the kernel's shared zero page (nothing to fill
    // on the first read, nothing in the binary).
    static char zeros[2u << 20];
    // Extents are runs of resident or zero pages, so few; a short array on
    // the stack covers the usual case.
    iovec small[16];
    std::vector<iovec> large;
    iovec* iov = small;
    if (extents.size() > std::size(small)) {
      large.resize(extents.size());
      iov = large.data();
    }
    for (size_t i = 0; i < extents.size(); ++i) {
      // Zero runs are at most one request long (<= max_read <= 2 MiB).
      const char* from = extents[i].zeros ? zeros : extents[i].data;
      iov[i] = iovec{const_cast<char*>(from), static_cast<size_t>(extents[i].len)};
    }
    fuse_reply_iov(req, iov, static_cast<int>(extents.size()));
    file->unpin();
  }
  d.cache().balance(file.get());
}

void op_write(fuse_req_t req, fuse_ino_t, const char* buf, size_t size, off_t off, fuse_file_info* fi) {
  // Once replied to, req is gone and the handle may be released by another
  // thread at any moment: keep what is used afterwards.
  Daemon& d = daemon_of(req);
  const std::shared_ptr<File> file = reinterpret_cast<Handle*>(fi->fh)->file;
  ssize_t n = file->write(buf, size, static_cast<uint64_t>(off), fi->writepage != 0);
  if (n < 0)
    fuse_reply_err(req, static_cast<int>(-n));
  else
    fuse_reply_write(req, static_cast<size_t>(n));
  d.cache().balance(file.get());
}

void op_flush(fuse_req_t req, fuse_ino_t, fuse_file_info*) { fuse_reply_err(req, 0); }

void op_release(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  daemon_of(req).drop_handle(reinterpret_cast<void*>(fi->fh));
  std::unique_ptr<Handle> h(reinterpret_cast<Handle*>(fi->fh));
  --h->file->handles;
  h.reset();
  daemon_of(req).released(inode_of(req, ino));
  fuse_reply_err(req, 0);
}

void op_fsync(fuse_req_t req, fuse_ino_t ino, int, fuse_file_info*) {
  Daemon& d = daemon_of(req);
  if (d.options().fsync == FsyncMode::Stage) return (void)fuse_reply_err(req, 0);
  int rc = d.commit_one(inode_of(req, ino));
  fuse_reply_err(req, rc < 0 ? -rc : 0);
}

void op_fallocate(fuse_req_t req, fuse_ino_t, int mode, off_t off, off_t len, fuse_file_info* fi) {
  Handle* h = reinterpret_cast<Handle*>(fi->fh);
  if (mode != 0) return (void)fuse_reply_err(req, EOPNOTSUPP);
  // Mode 0 only guarantees the range exists: extend the staged size.
  uint64_t end = static_cast<uint64_t>(off) + static_cast<uint64_t>(len);
  int rc = 0;
  if (end > h->file->info().size) rc = h->file->truncate(end);
  fuse_reply_err(req, rc < 0 ? -rc : 0);
}

// ------------------------------------------------------------ directories

struct DirHandle {
  DIR* dir = nullptr;
  off_t offset = 0;
  dirent* entry = nullptr;
  ~DirHandle() {
    if (dir) closedir(dir);
  }
};

void op_opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi) {
  Inode& inode = inode_of(req, ino);
  auto dh = std::make_unique<DirHandle>();
  int fd = openat(inode.fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return (void)fuse_reply_err(req, errno);
  dh->dir = fdopendir(fd);
  if (!dh->dir) {
    int err = errno;
    close(fd);
    return (void)fuse_reply_err(req, err);
  }
  fi->fh = reinterpret_cast<uint64_t>(dh.get());
  Daemon& d = daemon_of(req);
  DirHandle* raw = dh.release();
  d.keep_handle(raw, [raw] { delete raw; });
  if (fuse_reply_open(req, fi) == -ENOENT) {
    d.drop_handle(raw);
    delete raw;
  }
}

void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi) {
  DirHandle* dh = reinterpret_cast<DirHandle*>(fi->fh);
  std::vector<char> buf(size);
  size_t used = 0;
  if (off != dh->offset) {
    seekdir(dh->dir, off);
    dh->entry = nullptr;
    dh->offset = off;
  }
  for (;;) {
    if (!dh->entry) {
      errno = 0;
      dh->entry = readdir(dh->dir);
      if (!dh->entry) {
        if (errno && used == 0) return (void)fuse_reply_err(req, errno);
        break;
      }
    }
    dirent* e = dh->entry;
    off_t next = e->d_off;
    if (!(ino == FUSE_ROOT_ID && std::strcmp(e->d_name, kHiddenDir) == 0)) {
      struct stat st = {};
      st.st_ino = e->d_ino;
      st.st_mode = static_cast<mode_t>(DTTOIF(e->d_type));
      size_t n = fuse_add_direntry(req, buf.data() + used, size - used, e->d_name, &st, next);
      if (n > size - used) break;  // full: this entry goes in the next call
      used += n;
    }
    dh->entry = nullptr;
    dh->offset = next;
  }
  fuse_reply_buf(req, buf.data(), used);
}

void op_releasedir(fuse_req_t req, fuse_ino_t, fuse_file_info* fi) {
  daemon_of(req).drop_handle(reinterpret_cast<void*>(fi->fh));
  delete reinterpret_cast<DirHandle*>(fi->fh);
  fuse_reply_err(req, 0);
}

void op_fsyncdir(fuse_req_t req, fuse_ino_t, int datasync, fuse_file_info* fi) {
  DirHandle* dh = reinterpret_cast<DirHandle*>(fi->fh);
  int fd = dirfd(dh->dir);
  int rc = datasync ? fdatasync(fd) : fsync(fd);
  fuse_reply_err(req, rc < 0 ? errno : 0);
}

void op_statfs(fuse_req_t req, fuse_ino_t ino) {
  struct statvfs sv;
  if (fstatvfs(inode_of(req, ino).fd, &sv) < 0) return (void)fuse_reply_err(req, errno);
  fuse_reply_statfs(req, &sv);
}

void op_access(fuse_req_t req, fuse_ino_t ino, int mask) {
  ProcPath p(inode_of(req, ino).fd);
  fuse_reply_err(req, access(p.c_str(), mask) < 0 ? errno : 0);
}

// ------------------------------------------------------------ xattrs

void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size) {
  Inode& inode = inode_of(req, ino);
  std::string value;
  ssize_t n;
  std::vector<char> buf;
  if (std::strcmp(name, kControlXattr) == 0) {
    // How the CLI finds this daemon from any path in the mount.
    value = daemon_of(req).control_path();
    n = static_cast<ssize_t>(value.size());
    buf.assign(value.begin(), value.end());
  } else {
    if (inode.type == S_IFLNK) return (void)fuse_reply_err(req, ENOTSUP);
    ProcPath p(inode.fd);
    buf.resize(size);
    n = getxattr(p.c_str(), name, size ? buf.data() : nullptr, size);
    if (n < 0) return (void)fuse_reply_err(req, errno);
  }
  if (size == 0) return (void)fuse_reply_xattr(req, static_cast<size_t>(n));
  if (static_cast<size_t>(n) > size) return (void)fuse_reply_err(req, ERANGE);
  fuse_reply_buf(req, buf.data(), static_cast<size_t>(n));
}

void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size) {
  Inode& inode = inode_of(req, ino);
  if (inode.type == S_IFLNK) return (void)(size ? fuse_reply_buf(req, nullptr, 0) : fuse_reply_xattr(req, 0));
  ProcPath p(inode.fd);
  std::vector<char> buf(size);
  ssize_t n = listxattr(p.c_str(), size ? buf.data() : nullptr, size);
  if (n < 0) return (void)fuse_reply_err(req, errno);
  if (size == 0) return (void)fuse_reply_xattr(req, static_cast<size_t>(n));
  fuse_reply_buf(req, buf.data(), static_cast<size_t>(n));
}

void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size,
                 int flags) {
  Inode& inode = inode_of(req, ino);
  if (std::strcmp(name, kControlXattr) == 0) return (void)fuse_reply_err(req, EPERM);
  if (inode.type == S_IFLNK) return (void)fuse_reply_err(req, ENOTSUP);
  ProcPath p(inode.fd);
  int err = setxattr(p.c_str(), name, value, size, flags) < 0 ? errno : 0;
  if (!err) daemon_of(req).metadata_changed(inode, false);
  fuse_reply_err(req, err);
}

void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char* name) {
  Inode& inode = inode_of(req, ino);
  if (inode.type == S_IFLNK) return (void)fuse_reply_err(req, ENOTSUP);
  ProcPath p(inode.fd);
  int err = removexattr(p.c_str(), name) < 0 ? errno : 0;
  if (!err) daemon_of(req).metadata_changed(inode, false);
  fuse_reply_err(req, err);
}

}  // namespace

fuse_lowlevel_ops make_fuse_ops() {
  fuse_lowlevel_ops ops = {};
  ops.init = op_init;
  ops.lookup = op_lookup;
  ops.forget = op_forget;
  ops.forget_multi = op_forget_multi;
  ops.getattr = op_getattr;
  ops.setattr = op_setattr;
  ops.readlink = op_readlink;
  ops.mknod = op_mknod;
  ops.mkdir = op_mkdir;
  ops.symlink = op_symlink;
  ops.link = op_link;
  ops.unlink = op_unlink;
  ops.rmdir = op_rmdir;
  ops.rename = op_rename;
  ops.open = op_open;
  ops.create = op_create;
  ops.read = op_read;
  ops.write = op_write;
  ops.flush = op_flush;
  ops.release = op_release;
  ops.fsync = op_fsync;
  ops.fallocate = op_fallocate;
  ops.opendir = op_opendir;
  ops.readdir = op_readdir;
  ops.releasedir = op_releasedir;
  ops.fsyncdir = op_fsyncdir;
  ops.statfs = op_statfs;
  ops.access = op_access;
  ops.getxattr = op_getxattr;
  ops.listxattr = op_listxattr;
  ops.setxattr = op_setxattr;
  ops.removexattr = op_removexattr;
  return ops;
}

}  // namespace deferfs
