// Daemon::view (spec 9.3): who may open a view of which file, and the
// hand-over of the file to the ViewServer.
//
// Access follows what the mount itself enforces (default_permissions: the
// mode bits of the source, no ACLs): without allow_other only the mounting
// user and root may use the mount at all; then every directory on the path
// needs search (x) permission and the file read (r) permission for the
// peer's uid, gid and supplementary groups (from /proc/PID/status). Root
// may read everything. The path comes resolved by the client (realpath): a
// symbolic link on it is refused (ELOOP), so is the hidden .deferfs.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include "deferfs/daemon.h"
#include "deferfs/log.h"

namespace deferfs {

namespace {

std::system_error view_error(int err, const std::string& path, const std::string& why) {
  return std::system_error(err, std::generic_category(), "view of " + (path.empty() ? "/" : path) + ": " + why);
}

// The supplementary groups of `pid`, or nothing when they cannot be read.
std::vector<gid_t> groups_of(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  std::vector<gid_t> out;
  while (std::getline(in, line)) {
    if (line.rfind("Groups:", 0) != 0) continue;
    std::istringstream ss(line.substr(7));
    long g;
    while (ss >> g) out.push_back(static_cast<gid_t>(g));
  }
  return out;
}

// True if the peer has the permission `bit` (4 r, 2 w, 1 x) on `st`.
bool permitted(const struct stat& st, const PeerCredentials& peer, const std::vector<gid_t>& groups, int bit) {
  if (peer.uid == 0) return true;
  if (st.st_uid == peer.uid) return (st.st_mode >> 6) & bit;
  bool in_group = st.st_gid == peer.gid;
  for (gid_t g : groups) in_group |= g == st.st_gid;
  if (in_group) return (st.st_mode >> 3) & bit;
  return st.st_mode & bit;
}

}  // namespace

void Daemon::view(const std::string& path, const PeerCredentials& peer, int conn) {
  if (!opts_.allow_other && peer.uid != 0 && peer.uid != getuid()) {
    throw view_error(EACCES, path, "permission denied: the mount has no allow_other, only its user and root use it");
  }
  const std::vector<gid_t> groups = groups_of(peer.pid);
  // Walk the path from the source root, checking each directory's search
  // permission, then the file's read permission.
  int dir = source_root_fd_;
  int fd = -1;
  struct stat st {};
  if (::fstat(dir, &st) != 0) throw view_error(errno, path, "the source root");
  size_t start = 0;
  while (true) {
    if (!S_ISDIR(st.st_mode)) {
      if (fd >= 0) ::close(fd);
      throw view_error(ENOTDIR, path, "not a directory on the way");
    }
    if (!permitted(st, peer, groups, 1)) {
      if (fd >= 0) ::close(fd);
      throw view_error(EACCES, path, "permission denied (search) for uid " + std::to_string(peer.uid));
    }
    size_t end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    const std::string name = path.substr(start, end - start);
    if (name.empty()) {
      if (fd >= 0) ::close(fd);
      throw view_error(EISDIR, path, "a directory has no view");
    }
    if (start == 0 && name == ".deferfs") throw view_error(ENOENT, path, "no such file");
    const int next = ::openat(dir, name.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC);
    const int err = errno;
    if (fd >= 0) ::close(fd);
    if (next < 0) throw view_error(err, path, std::strerror(err));
    fd = next;
    dir = fd;
    if (::fstat(fd, &st) != 0) {
      const int e = errno;
      ::close(fd);
      throw view_error(e, path, std::strerror(e));
    }
    if (end == path.size()) break;
    start = end + 1;
  }
  if (S_ISLNK(st.st_mode)) {
    ::close(fd);
    throw view_error(ELOOP, path, "a symbolic link (name the file it points to)");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw view_error(S_ISDIR(st.st_mode) ? EISDIR : EINVAL, path, "only a regular file has a view");
  }
  if (!permitted(st, peer, groups, 4)) {
    ::close(fd);
    log_info("refused a view of %s to uid %u (pid %d): no read permission", path.c_str(),
             static_cast<unsigned>(peer.uid), static_cast<int>(peer.pid));
    throw view_error(EACCES, path, "permission denied (read) for uid " + std::to_string(peer.uid));
  }

  // The Inode holds one extra lookup until the view counts as an open handle.
  std::shared_ptr<Inode> inode = inodes_.lookup(fd, st);
  const uint64_t nodeid = inodes_.nodeid(*inode);
  bool keep_cache = false;
  int err = 0;
  std::shared_ptr<File> file = file_of(*inode, keep_cache, err);
  if (file) file->add_view();  // its count of `handles` is the one file_of took
  inodes_.forget(nodeid, 1);
  if (!file) throw view_error(err ? err : EIO, path, std::strerror(err ? err : EIO));

  ViewTarget target;
  target.file = file;
  target.name = path;
  target.after_load = [this, f = file.get()] { cache_.balance(f); };
  target.release = [this, inode, file] {
    --file->views;
    --file->handles;
    released(*inode);
    inodes_.prune(*inode);
  };
  views_->start(conn, std::move(target));
}

}  // namespace deferfs
