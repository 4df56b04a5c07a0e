#include "deferfs/orphans.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <vector>

namespace deferfs {

namespace {

bool valid_name(const std::string& n) {
  return !n.empty() && n != "." && n != ".." && n.find('/') == std::string::npos && n[0] != '.';
}

// The file's base name, reduced to characters safe in a directory name.
std::string label_of(const std::string& path) {
  std::string base = path.substr(path.rfind('/') == std::string::npos ? 0 : path.rfind('/') + 1);
  std::string out;
  for (char c : base) out += (isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.') ? c : '_';
  if (out.empty() || out[0] == '.') out = "file" + out;
  return out.substr(0, 64);
}

int write_all(int fd, const char* p, size_t n, off_t off) {
  while (n > 0) {
    ssize_t w = pwrite(fd, p, n, off);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return -errno;
    p += w;
    n -= static_cast<size_t>(w);
    off += w;
  }
  return 0;
}

int remove_tree_at(int parent, const std::string& name) {
  int fd = openat(parent, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return -errno;
  DIR* d = fdopendir(fd);
  if (!d) {
    close(fd);
    return -errno;
  }
  std::vector<std::string> names;
  while (dirent* e = readdir(d))
    if (std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..")) names.push_back(e->d_name);
  int rc = 0;
  for (const std::string& n : names)
    if (unlinkat(dirfd(d), n.c_str(), 0) < 0 && rc == 0) rc = -errno;
  closedir(d);
  if (unlinkat(parent, name.c_str(), AT_REMOVEDIR) < 0 && rc == 0) rc = -errno;
  return rc;
}

}  // namespace

std::string keep_orphan(int state_dir_fd, const OrphanInput& in, std::string& error) {
  if (mkdirat(state_dir_fd, kOrphansDir, 0700) < 0 && errno != EEXIST) {
    error = std::string(".deferfs/orphans: ") + std::strerror(errno);
    return "";
  }
  int odir = openat(state_dir_fd, kOrphansDir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (odir < 0) {
    error = std::string(".deferfs/orphans: ") + std::strerror(errno);
    return "";
  }
  char stamp[32];
  const time_t now = time(nullptr);
  struct tm tm;
  gmtime_r(&now, &tm);
  strftime(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", &tm);
  std::string name;
  for (int n = 0; n < 1000; ++n) {
    name = std::string(stamp) + "-" + label_of(in.path) + (n ? "-" + std::to_string(n) : "");
    if (mkdirat(odir, name.c_str(), 0700) == 0) break;
    if (errno != EEXIST) {
      error = ".deferfs/orphans/" + name + ": " + std::strerror(errno);
      close(odir);
      return "";
    }
    name.clear();
  }
  if (name.empty()) {
    error = ".deferfs/orphans: no free name";
    close(odir);
    return "";
  }
  auto fail = [&](const std::string& what, int err) {
    error = ".deferfs/orphans/" + name + "/" + what + ": " + std::strerror(err);
    remove_tree_at(odir, name);
    close(odir);
    return std::string();
  };
  int dfd = openat(odir, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (dfd < 0) return fail("", errno);
  // The pages, at their offsets in the file.
  int pfd = openat(dfd, "pages", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (pfd < 0) {
    close(dfd);
    return fail("pages", errno);
  }
  std::vector<char> buf(in.page_size);
  std::vector<uint64_t> pages;
  for (const OrphanPage& p : in.pages) {
    const off_t off = static_cast<off_t>(p.page * in.page_size);
    ssize_t n = pread(p.fd, buf.data(), buf.size(), off);
    if (n < 0) n = 0;
    std::fill(buf.begin() + n, buf.end(), 0);
    if (int rc = write_all(pfd, buf.data(), buf.size(), off); rc < 0) {
      close(pfd);
      close(dfd);
      return fail("pages", -rc);
    }
    pages.push_back(p.page);
  }
  std::sort(pages.begin(), pages.end());
  // The manifest: what a person needs to put the pages back.
  std::string m;
  m += "deferfs orphan: staged data whose file could not be proven to be the same file\n";
  m += "path: " + in.path + "\n";
  m += "reason: " + in.reason + "\n";
  m += "identity: " + describe_identity(in.identity) + "\n";
  m += "page_size: " + std::to_string(in.page_size) + "\n";
  m += "snapshot_size: " + std::to_string(in.base_size) + "\n";
  m += "staged_size: " + std::to_string(in.size) + "\n";
  m += "kept: " + std::string(stamp) + "\n";
  m += "pages: " + std::to_string(pages.size()) + " (their bytes are in the file 'pages' at their offsets)\n";
  for (size_t i = 0; i < pages.size();) {
    size_t j = i + 1;
    while (j < pages.size() && pages[j] == pages[j - 1] + 1) ++j;
    m += "  offset " + std::to_string(pages[i] * in.page_size) + " length " +
         std::to_string((j - i) * in.page_size) + "\n";
    i = j;
  }
  m += "restore: dd if=pages of=FILE bs=" + std::to_string(in.page_size) +
       " skip=N seek=N count=K conv=notrunc for each range (N = offset / page_size), then truncate "
       "FILE to staged_size if it changed\n";
  int mfd = openat(dfd, "manifest", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  int rc = mfd < 0 ? -errno : write_all(mfd, m.data(), m.size(), 0);
  if (rc == 0 && (fsync(pfd) < 0 || fsync(mfd) < 0)) rc = -errno;
  if (mfd >= 0) close(mfd);
  close(pfd);
  if (rc == 0 && fsync(dfd) < 0) rc = -errno;
  close(dfd);
  if (rc < 0) return fail("manifest", -rc);
  fsync(odir);
  close(odir);
  return name;
}

std::vector<std::string> list_orphans(int state_dir_fd) {
  std::vector<std::string> out;
  int odir = openat(state_dir_fd, kOrphansDir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (odir < 0) return out;
  DIR* d = fdopendir(odir);
  if (!d) {
    close(odir);
    return out;
  }
  while (dirent* e = readdir(d))
    if (valid_name(e->d_name)) out.push_back(e->d_name);
  closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

int remove_orphan(int state_dir_fd, const std::string& name) {
  if (!valid_name(name)) return -EINVAL;
  int odir = openat(state_dir_fd, kOrphansDir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (odir < 0) return -errno;
  int rc = remove_tree_at(odir, name);
  close(odir);
  return rc;
}

}  // namespace deferfs
