// What the FUSE handlers share (fuse_ops.cc, fuse_ops_files.cc,
// fuse_ops_dirs.cc); private to src/. Each handler sends exactly one reply.
#pragma once

#include <fuse_lowlevel.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstring>
#include <memory>

#include "deferfs/daemon.h"

namespace deferfs::fuse_detail {

// The source's hidden state directory: never shown through the mount.
inline constexpr const char* kHiddenDir = ".deferfs";
inline constexpr double kTimeout = 1.0;  // entry cache, and attributes of non-regular files, seconds
// Regular files' attributes are cached for a second too: without it every
// open makes an extra GETATTR round trip for the permission check. Where the
// daemon changes what stat shows behind the kernel it says so at once: a new
// snapshot at open (open_regular), discard (Daemon::refresh_kernel_view,
// which also pushes a smaller size: the kernel trusts its cached size for
// reads inside it), sync (Daemon::sync) and an fsync that commits
// (Daemon::commit_one). Writes and truncates through the mount update the
// kernel's view themselves. A change made to the source from outside shows
// in stat within a second, and in the data at the next open (spec 5.2).
inline constexpr double kFileAttrTimeout = 1.0;
inline double attr_timeout(const struct stat& st) { return S_ISREG(st.st_mode) ? kFileAttrTimeout : kTimeout; }

inline Daemon& daemon_of(fuse_req_t req) { return *static_cast<Daemon*>(fuse_req_userdata(req)); }
inline Inode& inode_of(fuse_req_t req, fuse_ino_t ino) { return daemon_of(req).inodes().get(ino); }

struct ProcPath {
  char buf[64];
  explicit ProcPath(int fd) { std::snprintf(buf, sizeof buf, "/proc/self/fd/%d", fd); }
  const char* c_str() const { return buf; }
};

inline bool hidden(fuse_ino_t parent, const char* name) {
  return parent == FUSE_ROOT_ID && std::strcmp(name, kHiddenDir) == 0;
}

// One open file handle (fi->fh).
// The kernel's lookup keeps the Inode alive while a handle is open.
struct Handle {
  std::shared_ptr<File> file;
};

// Overlays the staged size and times of a regular file on the source's stat.
void overlay(Inode& inode, struct stat& st);
int stat_inode(Inode& inode, struct stat& st);
// Looks `name` up in `parent` and fills `e`; counts a kernel lookup.
int do_lookup(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_entry_param& e);
void reply_entry_or_err(fuse_req_t req, fuse_ino_t parent, const char* name, int err);

// The handlers, by file: fuse_ops.cc (init, lookup, attributes),
// fuse_ops_dirs.cc (names, directories, xattrs), fuse_ops_files.cc (files).
void op_init(void* userdata, fuse_conn_info* conn);
void op_lookup(fuse_req_t req, fuse_ino_t parent, const char* name);
void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup);
void op_forget_multi(fuse_req_t req, size_t count, fuse_forget_data* forgets);
void op_getattr(fuse_req_t req, fuse_ino_t ino, fuse_file_info*);
void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat* attr, int valid, fuse_file_info* fi);
void op_readlink(fuse_req_t req, fuse_ino_t ino);
void op_mknod(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, dev_t rdev);
void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode);
void op_symlink(fuse_req_t req, const char* link, fuse_ino_t parent, const char* name);
void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t parent, const char* name);
void op_unlink(fuse_req_t req, fuse_ino_t parent, const char* name);
void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char* name);
void op_rename(fuse_req_t req, fuse_ino_t parent, const char* name, fuse_ino_t newparent,
               const char* newname, unsigned int flags);
void op_open(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
void op_create(fuse_req_t req, fuse_ino_t parent, const char* name, mode_t mode, fuse_file_info* fi);
void op_read(fuse_req_t req, fuse_ino_t, size_t size, off_t off, fuse_file_info* fi);
void op_write(fuse_req_t req, fuse_ino_t, const char* buf, size_t size, off_t off, fuse_file_info* fi);
void op_flush(fuse_req_t req, fuse_ino_t, fuse_file_info*);
void op_release(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
void op_fsync(fuse_req_t req, fuse_ino_t ino, int, fuse_file_info*);
void op_fallocate(fuse_req_t req, fuse_ino_t, int mode, off_t off, off_t len, fuse_file_info* fi);
void op_opendir(fuse_req_t req, fuse_ino_t ino, fuse_file_info* fi);
void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, fuse_file_info* fi);
void op_releasedir(fuse_req_t req, fuse_ino_t, fuse_file_info* fi);
void op_fsyncdir(fuse_req_t req, fuse_ino_t, int datasync, fuse_file_info* fi);
void op_statfs(fuse_req_t req, fuse_ino_t ino);
void op_access(fuse_req_t req, fuse_ino_t ino, int mask);
void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char* name, size_t size);
void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size);
void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char* name, const char* value, size_t size,
                 int flags);
void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char* name);

}  // namespace deferfs::fuse_detail
