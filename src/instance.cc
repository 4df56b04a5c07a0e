#include "deferfs/instance.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/random.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>
#include <system_error>

namespace deferfs {

namespace {

constexpr const char* kLockPrefix = "instance.";

// A write lock on the whole file: F_SETLK (non-blocking) or F_SETLKW.
int lock_whole(int fd, int cmd) {
  struct flock fl = {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  return fcntl(fd, cmd, &fl) < 0 ? -errno : 0;
}

std::string random_id() {
  unsigned char b[8];
  size_t got = 0;
  while (got < sizeof b) {
    ssize_t n = getrandom(b + got, sizeof b - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw std::system_error(errno, std::generic_category(), "getrandom for the instance id");
    got += static_cast<size_t>(n);
  }
  char s[17];
  for (size_t i = 0; i < sizeof b; ++i) std::snprintf(s + 2 * i, 3, "%02x", b[i]);
  return s;
}

bool valid_id(const std::string& id) {
  if (id.size() != 16) return false;
  for (char c : id)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

}  // namespace

std::string journal_name(const std::string& id) { return "journal." + id; }

std::string spill_name(const std::string& id, unsigned long long dev, unsigned long long ino) {
  return "spill." + id + "." + std::to_string(dev) + "." + std::to_string(ino);
}

std::string clone_name(const std::string& id, unsigned long long dev, unsigned long long ino) {
  return "snap." + id + "." + std::to_string(dev) + "." + std::to_string(ino);
}

std::unique_ptr<Instance> Instance::create(int dir_fd, const std::string& mountpoint) {
  const std::string id = random_id();
  const std::string tmp = "new-" + id, name = kLockPrefix + id;
  int fd = openat(dir_fd, tmp.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), ".deferfs/" + tmp);
  if (int rc = lock_whole(fd, F_SETLK); rc < 0) {
    close(fd);
    unlinkat(dir_fd, tmp.c_str(), 0);
    throw std::system_error(-rc, std::generic_category(), "POSIX lock on .deferfs/" + tmp);
  }
  // For a person looking, and for the host check of a recovery: who holds it.
  const std::string who = "host " + this_host() + " pid " + std::to_string(getpid()) + " mount " +
                          mountpoint + "\n";
  if (pwrite(fd, who.data(), who.size(), 0) < 0) { /* informative only */ }
  if (renameat(dir_fd, tmp.c_str(), dir_fd, name.c_str()) < 0) {
    int e = errno;
    close(fd);
    unlinkat(dir_fd, tmp.c_str(), 0);
    throw std::system_error(e, std::generic_category(), ".deferfs/" + name);
  }
  // Its own handle on the directory: the daemon's closes before we end.
  int own_dir = fcntl(dir_fd, F_DUPFD_CLOEXEC, 0);
  if (own_dir < 0) {
    int e = errno;
    unlinkat(dir_fd, name.c_str(), 0);
    close(fd);
    throw std::system_error(e, std::generic_category(), ".deferfs");
  }
  return std::unique_ptr<Instance>(new Instance(own_dir, id, fd));
}

DIR* reopen_dir(int dir_fd) {
  int fd = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return nullptr;
  DIR* d = fdopendir(fd);
  if (!d) close(fd);
  return d;
}

std::string this_host() {
  char host[256] = {};
  if (gethostname(host, sizeof host - 1) < 0) return "";
  return host;
}

Instance::~Instance() {
  // Spill files left (staged data kept): the lock file stays, so that the
  // next mount knows the host whose shared memory holds the rest.
  bool leaves = false;
  if (DIR* d = reopen_dir(dir_fd_)) {
    const std::string spill = "spill." + id_ + ".";
    while (dirent* e = readdir(d))
      if (std::strncmp(e->d_name, spill.c_str(), spill.size()) == 0) leaves = true;
    closedir(d);
  }
  if (!leaves) unlinkat(dir_fd_, (kLockPrefix + id_).c_str(), 0);  // before the lock goes
  close(fd_);
  close(dir_fd_);
}

int Instance::relock_after_fork() { return lock_whole(fd_, F_SETLKW); }

std::vector<std::string> instances_in(int dir_fd, const std::string& own) {
  std::set<std::string> ids;
  DIR* d = reopen_dir(dir_fd);
  if (!d) return {};
  while (dirent* e = readdir(d)) {
    const std::string n = e->d_name;
    std::string id;
    for (const char* p : {"instance.", "journal.", "spill.", "snap."}) {
      const size_t len = std::strlen(p);
      if (n.compare(0, len, p) != 0) continue;
      id = n.substr(len, n.find('.', len) == std::string::npos ? std::string::npos : n.find('.', len) - len);
    }
    if (valid_id(id) && id != own) ids.insert(id);
  }
  closedir(d);
  return {ids.begin(), ids.end()};
}

std::unique_ptr<DeadInstance> DeadInstance::claim(int dir_fd, const std::string& id) {
  if (!valid_id(id)) return nullptr;
  int fd = openat(dir_fd, (kLockPrefix + id).c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    // No lock file: it ended (or never finished starting, and then left
    // nothing that is in use), or its files come from an earlier version.
    return std::unique_ptr<DeadInstance>(new DeadInstance(dir_fd, id, -1));
  }
  if (lock_whole(fd, F_SETLK) < 0) {
    close(fd);
    return nullptr;  // alive (or another recovery holds it)
  }
  std::unique_ptr<DeadInstance> dead(new DeadInstance(dir_fd, id, fd));
  char buf[512];
  ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
  if (n > 5 && std::strncmp(buf, "host ", 5) == 0) {
    buf[n] = 0;
    dead->host_.assign(buf + 5, std::strcspn(buf + 5, " \n"));
  }
  return dead;
}

void DeadInstance::retire() {
  if (fd_ >= 0) unlinkat(dir_fd_, (kLockPrefix + id_).c_str(), 0);
}

DeadInstance::~DeadInstance() {
  if (fd_ >= 0) close(fd_);
}

bool instance_alive(int dir_fd, const std::string& id) {
  int fd = openat(dir_fd, (kLockPrefix + id).c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return false;
  struct flock fl = {};
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  bool alive = fcntl(fd, F_GETLK, &fl) == 0 && fl.l_type != F_UNLCK;
  close(fd);
  return alive;
}

}  // namespace deferfs
