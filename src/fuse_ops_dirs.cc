// FUSE handlers of the namespace (mknod, mkdir, symlink, link, unlink,
// rmdir, rename), of directories (opendir, readdir, ...) and of xattrs.
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
#include "fuse_ops_internal.h"

namespace deferfs::fuse_detail {

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

}  // namespace deferfs::fuse_detail
