// FUSE handlers of regular files: open, create, read, write, release,
// fsync, fallocate.
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
#include "deferfs/transport.h"
#include "fuse_ops_internal.h"

namespace deferfs::fuse_detail {

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
  // file_of counted a handle: given back if the open fails from here on.
  auto refuse = [&](int e) {
    --file->handles;
    d.released(inode);
    fuse_reply_err(req, e);
  };
  if ((fi->flags & O_ACCMODE) != O_RDONLY && !file->source().writable()) return refuse(EACCES);
  // libfuse asks for atomic O_TRUNC: the kernel sends no separate truncate.
  if ((fi->flags & O_TRUNC) && (fi->flags & O_ACCMODE) != O_RDONLY) {
    if (int rc = file->truncate(0); rc < 0) return refuse(-rc);
    keep_cache = false;
  }
  auto h = std::make_unique<Handle>();
  h->file = file;
  // The table keeps the Inode alive while the kernel holds a lookup; the
  // handle needs no separate reference to it. Its count of `handles` is the
  // one file_of took.
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
  h->file = file;  // with the count of `handles` file_of took
  fi->fh = reinterpret_cast<uint64_t>(h.get());
  Handle* raw = h.release();
  d.keep_handle(raw, [raw] { delete raw; });
  if (fuse_reply_create(req, &e, fi) == -ENOENT) {
    d.drop_handle(raw);
    delete raw;
    --file->handles;
  }
}

namespace {

void serve_read(fuse_req_t req, size_t size, off_t off, uint64_t fh) {
  // Once replied to, req is gone and the handle may be released by another
  // thread at any moment: keep what is used afterwards.
  Daemon& d = daemon_of(req);
  const std::shared_ptr<File> file = reinterpret_cast<Handle*>(fh)->file;
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

void serve_write(fuse_req_t req, const char* buf, size_t size, off_t off, uint64_t fh, bool writepage) {
  // Once replied to, req is gone and the handle may be released by another
  // thread at any moment: keep what is used afterwards.
  Daemon& d = daemon_of(req);
  const std::shared_ptr<File> file = reinterpret_cast<Handle*>(fh)->file;
  // Past the source filesystem's largest file: EFBIG, or a short write up to it.
  if (static_cast<uint64_t>(off) >= d.max_file_size()) return (void)fuse_reply_err(req, EFBIG);
  size = static_cast<size_t>(std::min<uint64_t>(size, d.max_file_size() - static_cast<uint64_t>(off)));
  ssize_t n = file->write(buf, size, static_cast<uint64_t>(off), writepage);
  if (n < 0)
    fuse_reply_err(req, static_cast<int>(-n));
  else
    fuse_reply_write(req, static_cast<size_t>(n));
  d.cache().balance(file.get());
}

// A ring thread hands a request whose pages must come from the source (or
// a spill file, or another thread's load) to a worker rather than wait,
// unless it is one short wait and nothing else waits for the ring (a
// random read of one page: the hand-off would cost as much as the read).
constexpr size_t kShortWait = 16 * 1024;

bool hand_off(const fuse_file_info* fi, off_t off, size_t size, bool for_write) {
  return serving_on_ring() &&
         reinterpret_cast<Handle*>(fi->fh)->file->access_waits(static_cast<uint64_t>(off), size, for_write) &&
         (size > kShortWait || ring_has_other_requests());
}

}  // namespace

void op_read(fuse_req_t req, fuse_ino_t, size_t size, off_t off, fuse_file_info* fi) {
  const uint64_t fh = fi->fh;
  if (hand_off(fi, off, size, false))
    return run_off_ring([req, size, off, fh] { serve_read(req, size, off, fh); });
  serve_read(req, size, off, fh);
}

void op_write(fuse_req_t req, fuse_ino_t, const char* buf, size_t size, off_t off, fuse_file_info* fi) {
  const uint64_t fh = fi->fh;
  const bool writepage = fi->writepage != 0;
  // buf lies in the request's buffer (the ring entry's payload), which
  // stays the request's until its reply.
  if (hand_off(fi, off, size, true))
    return run_off_ring([req, buf, size, off, fh, writepage] { serve_write(req, buf, size, off, fh, writepage); });
  serve_write(req, buf, size, off, fh, writepage);
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
  if (end > daemon_of(req).max_file_size()) return (void)fuse_reply_err(req, EFBIG);
  int rc = 0;
  if (end > h->file->info().size) rc = h->file->truncate(end);
  fuse_reply_err(req, rc < 0 ? -rc : 0);
}

}  // namespace deferfs::fuse_detail
