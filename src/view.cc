// libdeferfs: the client's side of a view (client.h; protocol in view_wire.h).
//
// The mapping is PROT_READ, MAP_PRIVATE of the segment's read-only fd (a
// shared mapping of a read-only fd cannot be registered with userfaultfd),
// MADV_DONTFORK (a child would inherit it unregistered: absent pages would
// read as zeros instead of faulting to the daemon). The View keeps its own
// copy of the userfaultfd, to register a new mapping at refresh(); so if
// the daemon dies, a touch of an absent page blocks until the process is
// killed, rather than reading wrong bytes.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <mutex>

#include "deferfs/client.h"
#include "deferfs/control_wire.h"
#include "deferfs/view_wire.h"

namespace deferfs {

using nlohmann::json;
using namespace wire;

namespace {

constexpr int kReplyTimeoutMs = 60'000;
constexpr uint64_t kLoadChunk = 1 << 20;  // what read() asks the daemon to load at once

uint64_t map_len(uint64_t size) {
  const uint64_t len = (size + kViewSysPage - 1) / kViewSysPage * kViewSysPage;
  return len ? len : kViewSysPage;
}

}  // namespace

struct View::State {
  std::string path;
  UniqueFd conn, seg, uffd;
  const std::byte* data = nullptr;
  uint64_t len = 0;       // of the mapping
  uint64_t size = 0;      // of the file
  uint64_t page_size = 0;
  std::mutex mutex;       // one request at a time on conn

  ~State() {
    if (data) ::munmap(const_cast<std::byte*>(data), len);
  }

  [[noreturn]] void fail(int err, const std::string& why) const {
    throw ClientError(1, path + ": " + why, err);
  }

  // One request, its reply. Returns the reply; an error reply becomes -errno
  // in `err` (0 when ok). Throws when the daemon is gone.
  json request(const json& j, int pass_fd, int& err, UniqueFd* got_fd = nullptr) {
    if (int e = send_message(conn.get(), dump(j), 0, pass_fd)) fail(e, std::string("view: ") + std::strerror(e));
    Received m = recv_message(conn.get(), -1, 1 << 16, kReplyTimeoutMs, got_fd != nullptr);
    if (m.status != RecvStatus::Ok) {
      fail(m.err ? m.err : EPIPE, "view: the daemon closed the connection (" +
                                      (m.detail.empty() ? std::string("no reply") : m.detail) + ")");
    }
    json r = json::parse(m.text, nullptr, false);
    if (!r.is_object() || !r.contains("ok") || !r["ok"].is_boolean()) fail(EPROTO, "view: bad reply from the daemon");
    err = 0;
    if (!r["ok"].get<bool>()) err = errno_of_name(r.value("errno", std::string("EIO")));
    if (got_fd) *got_fd = std::move(m.fd);
    return r;
  }

  // Maps `new_len` bytes, registers them and tells the daemon. Returns 0 or -errno.
  int map(uint64_t new_len) {
    void* p = ::mmap(nullptr, new_len, PROT_READ, MAP_PRIVATE, seg.get(), 0);
    if (p == MAP_FAILED) return -errno;
    (void)::madvise(p, new_len, MADV_DONTFORK);
    uffdio_register reg{};
    reg.range.start = reinterpret_cast<uint64_t>(p);
    reg.range.len = new_len;
    reg.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (::ioctl(uffd.get(), UFFDIO_REGISTER, &reg) != 0) {
      const int e = errno;
      ::munmap(p, new_len);
      return -e;
    }
    int err = 0;
    const bool first = data == nullptr;
    json r = request({{"op", "map"}, {"addr", reg.range.start}, {"len", new_len}}, first ? uffd.get() : -1, err);
    if (err) {
      ::munmap(p, new_len);
      return -err;
    }
    if (data) ::munmap(const_cast<std::byte*>(data), len);
    data = static_cast<const std::byte*>(p);
    len = new_len;
    return 0;
  }
};

View::View(std::unique_ptr<State> s) : s_(std::move(s)) {}
View::View(View&&) noexcept = default;
View& View::operator=(View&&) noexcept = default;
View::~View() = default;

const std::byte* View::data() const { return s_->data; }
uint64_t View::size() const { return s_->size; }
const std::string& View::path() const { return s_->path; }

View View::open(const std::string& path) {
  try {
    return open_view(path);
  } catch (const std::system_error& e) {
    throw ClientError(1, path + ": " + e.what(), e.code().value());
  }
}

View View::open_view(const std::string& path) {
  const Target t = find_target({path});
  auto s = std::make_unique<State>();
  s->path = path;
  s->conn = new_socket(t.socket);
  if (int e = try_connect(s->conn.get(), t.socket)) {
    s->fail(e, "cannot reach the daemon at " + t.socket + ": " + std::strerror(e));
  }
  int err = 0;
  json r = s->request({{"version", kProtocolVersion}, {"op", "view"}, {"paths", {t.relative.front()}}}, -1, err,
                      &s->seg);
  if (err) s->fail(err, r.value("error", std::string(std::strerror(err))));
  if (s->seg.get() < 0 || !r.contains("result") || !r["result"].value("size", json()).is_number_unsigned()) {
    s->fail(EPROTO, "view: the daemon's reply has no segment or no size");
  }
  s->size = r["result"]["size"].get<uint64_t>();
  s->page_size = r["result"].value("page_size", uint64_t{4096});

  s->uffd.reset(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)));
  if (s->uffd.get() < 0) s->fail(errno, std::string("userfaultfd: ") + std::strerror(errno));
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_POISON;
  if (::ioctl(s->uffd.get(), UFFDIO_API, &api) != 0) {
    s->fail(errno, std::string("userfaultfd: this kernel cannot serve views of shared memory (") +
                       std::strerror(errno) + ")");
  }
  if (int rc = s->map(map_len(s->size)); rc < 0) s->fail(-rc, std::string("view: ") + std::strerror(-rc));
  return View(std::move(s));
}

ssize_t View::read(uint64_t off, size_t len, void* buf) const {
  State& s = *s_;
  if (off >= s.size) return 0;
  len = static_cast<size_t>(std::min<uint64_t>(len, s.size - off));
  size_t done = 0;
  int stuck = 0;
  while (done < len) {
    // The kernel copies for us: a page it cannot fault in (absent: user-mode
    // faults only reach the daemon; poisoned) ends the copy, no signal.
    iovec local{static_cast<char*>(buf) + done, len - done};
    iovec remote{const_cast<std::byte*>(s.data) + off + done, len - done};
    const ssize_t got = ::process_vm_readv(::getpid(), &local, 1, &remote, 1, 0);
    if (got > 0) {
      done += static_cast<size_t>(got);
      stuck = 0;
      continue;
    }
    if (got < 0 && errno != EFAULT) return -errno;
    if (++stuck > 8) return -EAGAIN;  // evicted again before each copy
    const uint64_t at = off + done;
    int err = 0;
    uint64_t now_size = 0;
    try {
      std::lock_guard lk(s.mutex);
      json r = s.request({{"op", "load"}, {"off", at}, {"len", std::min<uint64_t>(len - done, kLoadChunk)}}, -1,
                         err);
      if (!err) now_size = r.at("result").at("size").get<uint64_t>();
    } catch (const ClientError& e) {
      return -(e.err() ? e.err() : EIO);
    } catch (const nlohmann::json::exception&) {
      return -EPROTO;
    }
    if (err) return -err;
    if (at >= now_size) break;  // the file shrank under the view: a short read
    if (stuck > 1) {
      // Loaded, yet the copy fails: a poison left by an earlier failure stays
      // in our page table; dropping our mapping of the page clears it.
      const uint64_t page = at / kViewSysPage * kViewSysPage;
      (void)::madvise(const_cast<std::byte*>(s.data) + page, kViewSysPage, MADV_DONTNEED);
    }
  }
  return static_cast<ssize_t>(done);
}

int View::refresh() {
  State& s = *s_;
  std::lock_guard lk(s.mutex);
  int err = 0;
  try {
    json r = s.request({{"op", "size"}}, -1, err);
    if (err) return -err;
    const uint64_t size = r.at("result").at("size").get<uint64_t>();
    // A new mapping: the size may have changed, and pages poisoned in the
    // old one are served afresh.
    if (int rc = s.map(map_len(size)); rc < 0) return rc;
    s.size = size;
  } catch (const ClientError& e) {
    return -(e.err() ? e.err() : EIO);
  } catch (const nlohmann::json::exception&) {
    return -EPROTO;
  }
  return 0;
}

}  // namespace deferfs
