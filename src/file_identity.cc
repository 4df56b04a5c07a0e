#include "deferfs/file_identity.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <memory>

namespace deferfs {

int take_identity(int fd, FileIdentity& out) {
  out = FileIdentity{};
  struct statx sx;
  if (statx(fd, "", AT_EMPTY_PATH, STATX_BASIC_STATS | STATX_BTIME, &sx) < 0) return -errno;
  out.dev = makedev(sx.stx_dev_major, sx.stx_dev_minor);
  out.ino = sx.stx_ino;
  if (sx.stx_mask & STATX_BTIME) {
    out.btime_sec = sx.stx_btime.tv_sec;
    out.btime_nsec = sx.stx_btime.tv_nsec;
    out.flags |= FileIdentity::kHasBtime;
  }
  // FS_IOC_GETVERSION needs a real open file (not O_PATH): reopen through
  // /proc if needed, read-only (no write access is implied by it).
  int gen = 0;
  if (ioctl(fd, FS_IOC_GETVERSION, &gen) == 0) {
    out.generation = static_cast<uint32_t>(gen);
    out.flags |= FileIdentity::kHasGeneration;
  } else if (errno == EBADF) {
    char proc[64];
    std::snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    int rfd = open(proc, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOATIME);
    if (rfd < 0) rfd = open(proc, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (rfd >= 0) {
      if (ioctl(rfd, FS_IOC_GETVERSION, &gen) == 0) {
        out.generation = static_cast<uint32_t>(gen);
        out.flags |= FileIdentity::kHasGeneration;
      }
      close(rfd);
    }
  }
  // The handle (for following a rename); its size is asked for first.
  struct {
    struct file_handle fh;
    unsigned char bytes[sizeof out.handle];
  } h;
  h.fh.handle_bytes = sizeof out.handle;
  int mount_id = 0;
  if (name_to_handle_at(fd, "", &h.fh, &mount_id, AT_EMPTY_PATH) == 0 && h.fh.handle_bytes <= sizeof out.handle) {
    out.handle_bytes = h.fh.handle_bytes;
    out.handle_type = h.fh.handle_type;
    std::memcpy(out.handle, h.fh.f_handle, h.fh.handle_bytes);
    out.flags |= FileIdentity::kHasHandle;
  }
  return 0;
}

Sameness compare_identity(const FileIdentity& a, const FileIdentity& b, bool compare_dev) {
  if (a.ino != b.ino || (compare_dev && a.dev != b.dev)) return Sameness::Other;
  bool proven = false;
  if ((a.flags & b.flags) & FileIdentity::kHasGeneration) {
    if (a.generation != b.generation) return Sameness::Other;
    proven = true;
  }
  if ((a.flags & b.flags) & FileIdentity::kHasBtime) {
    if (a.btime_sec != b.btime_sec || a.btime_nsec != b.btime_nsec) return Sameness::Other;
    proven = true;
  }
  return proven ? Sameness::Same : Sameness::Unproven;
}

std::string describe_identity(const FileIdentity& id) {
  char buf[160];
  int n = std::snprintf(buf, sizeof buf, "dev %u:%u ino %llu", major(static_cast<dev_t>(id.dev)),
                        minor(static_cast<dev_t>(id.dev)), static_cast<unsigned long long>(id.ino));
  if (id.flags & FileIdentity::kHasGeneration)
    n += std::snprintf(buf + n, sizeof buf - static_cast<size_t>(n), " generation %llu",
                       static_cast<unsigned long long>(id.generation));
  if (id.flags & FileIdentity::kHasBtime)
    std::snprintf(buf + n, sizeof buf - static_cast<size_t>(n), " born %lld.%09u",
                  static_cast<long long>(id.btime_sec), id.btime_nsec);
  return buf;
}

std::string find_by_handle(int root_fd, const std::string& root_path, const FileIdentity& id) {
  if (!(id.flags & FileIdentity::kHasHandle) || id.handle_bytes > sizeof id.handle) return "";
  struct {
    struct file_handle fh;
    unsigned char bytes[sizeof id.handle];
  } h;
  h.fh.handle_bytes = id.handle_bytes;
  h.fh.handle_type = id.handle_type;
  std::memcpy(h.fh.f_handle, id.handle, id.handle_bytes);
  // The mount fd must be a real open file (an O_PATH one is refused).
  int mfd = openat(root_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (mfd < 0) return "";
  int fd = open_by_handle_at(mfd, &h.fh, O_PATH | O_CLOEXEC);
  close(mfd);
  if (fd < 0) return "";  // ESTALE: gone or reused; EPERM: no capability
  FileIdentity now;
  std::string rel;
  char proc[64], target[PATH_MAX + 1];
  std::snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(proc, target, PATH_MAX);
  if (n > 0 && take_identity(fd, now) == 0 && compare_identity(id, now) == Sameness::Same) {
    std::string abs(target, static_cast<size_t>(n));
    // A deleted file's link ends in " (deleted)" and lies nowhere below the root.
    const std::string prefix = root_path.back() == '/' ? root_path : root_path + "/";
    if (abs.compare(0, prefix.size(), prefix) == 0 && abs.size() > prefix.size() &&
        abs.find(" (deleted)") == std::string::npos)
      rel = abs.substr(prefix.size());
  }
  close(fd);
  return rel;
}

}  // namespace deferfs
