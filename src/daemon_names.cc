// How the Daemon names its files in reports: the path of an Inode relative
// to the source root, found again below the root when its known name is gone.
#include "deferfs/daemon.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "deferfs/log.h"

namespace deferfs {

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
      MutexLock lk(const_cast<Inode&>(inode).m);
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


}  // namespace deferfs
