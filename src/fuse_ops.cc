// The FUSE handlers' table, their shared helpers, and the handlers of
// init, lookup and attributes.
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

void overlay(Inode& inode, struct stat& st) {
  std::shared_ptr<File> file;
  {
    MutexLock lk(inode.m);
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
    } else if (static_cast<uint64_t>(attr->st_size) > d.max_file_size()) {
      err = EFBIG;  // as the source would answer, before anything is staged
    } else {
      std::shared_ptr<File> file;
      bool by_name = false;
      if (fi && fi->fh) {
        file = reinterpret_cast<Handle*>(fi->fh)->file;
      } else {
        // truncate(2) by name: check write permission on the source, then stage.
        if (access(path.c_str(), W_OK) < 0) err = errno;
        bool keep = false;
        if (!err) file = d.file_of(inode, keep, err);
        by_name = file != nullptr;
      }
      if (!err && file) {
        int rc = file->truncate(static_cast<uint64_t>(attr->st_size));
        if (rc < 0) err = -rc;
      }
      if (by_name) {  // the count of `handles` file_of took
        --file->handles;
        d.released(inode);
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
        MutexLock lk(inode.m);
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

}  // namespace deferfs::fuse_detail

namespace deferfs {

fuse_lowlevel_ops make_fuse_ops() {
  using namespace fuse_detail;
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
