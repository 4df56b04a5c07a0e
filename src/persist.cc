#include "deferfs/persist.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <system_error>

namespace deferfs {

namespace {
constexpr char kMagic[8] = {'D', 'F', 'S', 'M', 'E', 'T', 'A', '1'};
constexpr const char* kShmDir = "/dev/shm";
}  // namespace

PersistMeta::PersistMeta(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}

PersistMeta::~PersistMeta() {
  if (header_) munmap(header_, map_len_);
  if (!keep_) unlink(path_.c_str());
  if (fd_ >= 0) close(fd_);  // releases the flock
}

int PersistMeta::map(uint64_t pages) {
  // Reserve address space generously: remapping moves bytes_, so do it in
  // doubling steps (callers hold the File's lock).
  uint64_t cap = 1 << 16;
  while (cap < pages) cap *= 2;
  if (header_ && cap <= pages_) return 0;
  const size_t len = sizeof(PersistedHeader) + cap;
  if (ftruncate(fd_, static_cast<off_t>(len)) < 0) return -errno;
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
  if (p == MAP_FAILED) return -errno;
  if (header_) munmap(header_, map_len_);
  header_ = static_cast<PersistedHeader*>(p);
  bytes_ = reinterpret_cast<uint8_t*>(header_ + 1);
  pages_ = cap;
  map_len_ = len;
  return 0;
}

int PersistMeta::reserve(uint64_t pages) { return pages <= pages_ ? 0 : map(pages); }

std::unique_ptr<PersistMeta> PersistMeta::create(const std::string& path, uint64_t pages) {
  int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), path);
  if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
    int e = errno;
    close(fd);
    throw std::system_error(e, std::generic_category(), "lock " + path);
  }
  std::unique_ptr<PersistMeta> m(new PersistMeta(path, fd));
  if (int rc = m->map(pages); rc < 0) throw std::system_error(-rc, std::generic_category(), path);
  std::memcpy(m->header_->magic, kMagic, sizeof kMagic);
  m->header_->version = 2;
  return m;
}

std::unique_ptr<PersistMeta> PersistMeta::open_existing(const std::string& path, std::string& why) {
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    why = std::strerror(errno);
    return nullptr;
  }
  if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
    why = "in use by a running daemon";
    close(fd);
    return nullptr;
  }
  struct stat st;
  if (fstat(fd, &st) < 0 || static_cast<uint64_t>(st.st_size) < sizeof(PersistedHeader)) {
    why = "too short";
    close(fd);
    return nullptr;
  }
  std::unique_ptr<PersistMeta> m(new PersistMeta(path, fd));
  m->keep_ = true;  // until the caller decides
  if (m->map(static_cast<uint64_t>(st.st_size) - sizeof(PersistedHeader)) < 0 ||
      std::memcmp(m->header_->magic, kMagic, sizeof kMagic) != 0 || (m->header_->version != 1 && m->header_->version != 2) ||
      m->header_->path_len >= sizeof m->header_->path) {
    why = "not a deferfs metadata file";
    return nullptr;
  }
  return m;
}

std::vector<uint64_t> PersistMeta::staged_pages() const {
  std::vector<uint64_t> out;
  const off_t base = sizeof(PersistedHeader);
  off_t pos = base;
  const off_t end = base + static_cast<off_t>(pages_);
  while (pos < end) {
    off_t data = lseek(fd_, pos, SEEK_DATA);
    if (data < 0 || data >= end) break;
    off_t hole = lseek(fd_, data, SEEK_HOLE);
    if (hole < 0 || hole > end) hole = end;
    for (off_t i = data; i < hole; ++i)
      if (bytes_[i - base] != 0) out.push_back(static_cast<uint64_t>(i - base));
    pos = hole;
  }
  return out;
}

bool PersistMeta::peek_header(const std::string& path, PersistedHeader& out) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return false;
  const ssize_t n = pread(fd, &out, sizeof out, 0);
  close(fd);
  return n == static_cast<ssize_t>(sizeof out) && std::memcmp(out.magic, kMagic, sizeof kMagic) == 0 &&
         (out.version == 1 || out.version == 2);
}

int count_homeless() {
  int homeless = 0;
  for (const std::string& meta_path : list_persisted(std::string(kShmDir) + "/deferfs.")) {
    // Peeked, never locked: every daemon counts these at its start, and a
    // lock taken even for a moment made a daemon of another source that was
    // restoring that very file at that moment skip it as "in use by a
    // running daemon" (its staged pages hidden until the next mount: an
    // fsx SIGKILL check failed so in CI, with two tests running at once).
    PersistedHeader h;
    if (!PersistMeta::peek_header(meta_path, h)) continue;
    std::string root(h.source_root, strnlen(h.source_root, sizeof h.source_root));
    struct stat st;
    if (!root.empty() && stat(root.c_str(), &st) != 0) ++homeless;
  }
  return homeless;
}

std::string persist_prefix(const std::string& source_root) {
  char key[32];
  std::snprintf(key, sizeof key, "%016llx",
                static_cast<unsigned long long>(XXH64(source_root.data(), source_root.size(), 0)));
  return std::string(kShmDir) + "/deferfs." + key + ".";
}

std::vector<std::string> list_persisted(const std::string& prefix) {
  std::vector<std::string> out;
  const std::string base = prefix.substr(prefix.rfind('/') + 1);
  DIR* d = opendir(kShmDir);
  if (!d) return out;
  while (dirent* e = readdir(d)) {
    std::string name = e->d_name;
    if (name.compare(0, base.size(), base) == 0 && name.size() > 5 && name.compare(name.size() - 5, 5, ".meta") == 0)
      out.push_back(std::string(kShmDir) + "/" + name);
  }
  closedir(d);
  return out;
}

}  // namespace deferfs
