// The daemon's side of views (view_server.h; protocol in view_wire.h).
#include "deferfs/view_server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <system_error>

#include <nlohmann/json.hpp>

#include "deferfs/control_wire.h"
#include "deferfs/file.h"
#include "deferfs/log.h"
#include "deferfs/view_wire.h"

namespace deferfs {

namespace {

using nlohmann::json;
using namespace wire;

constexpr size_t kMaxViewMessage = 4096;
constexpr int kHandshakeTimeoutMs = 5000;
constexpr uint64_t kMaxLoadBytes = uint64_t{64} << 20;  // one "load" request
constexpr int kFaultBatch = 64;

std::string ok_reply(json result = nullptr) {
  json j{{"ok", true}};
  if (!result.is_null()) j["result"] = std::move(result);
  return dump(j);
}

// A descriptor is a userfaultfd if /proc says so.
bool is_userfaultfd(int fd) {
  char link[64];
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  const ssize_t n = ::readlink(path.c_str(), link, sizeof link - 1);
  if (n < 0) return false;
  link[n] = 0;
  return std::strcmp(link, "anon_inode:[userfaultfd]") == 0;
}

// An unsigned field of a view message, or throws std::invalid_argument.
uint64_t get_u64(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_unsigned()) {
    throw std::invalid_argument(std::string("view message: '") + key + "' must be an unsigned integer");
  }
  return it->get<uint64_t>();
}

json parse_message(const std::string& text, std::initializer_list<const char*> allowed) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("op") || !j["op"].is_string()) {
    throw std::invalid_argument("view message: not a JSON object with a string 'op'");
  }
  for (const auto& item : j.items()) {
    bool known = item.key() == "op";
    for (const char* k : allowed) known |= item.key() == k;
    if (!known) throw std::invalid_argument("view message: unknown field " + quote_for_message(item.key()));
  }
  return j;
}

}  // namespace

// One view: its connection, the client's userfaultfd, its mapping.
struct ViewServer::View {
  UniqueFd conn;
  UniqueFd uffd;
  ViewTarget target;
  uint64_t base = 0, len = 0;            // the client's current mapping
  uint64_t old_base = 0, old_len = 0;    // the one it replaced (faults may still come from it)
  std::thread thread;
  std::atomic<bool> done{false};

  void run(int stop_fd) noexcept;
  bool handshake(int stop_fd);
  void set_mapping(const json& j);
  void serve_faults();
  void serve_fault(uint64_t addr);
  void poison(uint64_t addr);
  bool serve_request(const std::string& text);
  void poison_pending();
};

void ViewServer::View::set_mapping(const json& j) {
  const uint64_t a = get_u64(j, "addr"), l = get_u64(j, "len");
  if (a % kViewSysPage || l % kViewSysPage || l == 0 || l > kViewMaxLen || a + l < a) {
    throw std::invalid_argument("view message: 'addr' and 'len' must be page-aligned, len at most 1 PiB");
  }
  old_base = base;
  old_len = len;
  base = a;
  len = l;
}

bool ViewServer::View::handshake(int stop_fd) {
  File& file = *target.file;
  // The segment, reopened read-only: the client may map it but never change it.
  const std::string self = "/proc/self/fd/" + std::to_string(file.segment_fd());
  UniqueFd seg(::open(self.c_str(), O_RDONLY | O_CLOEXEC));
  if (seg.get() < 0) {
    const int err = errno;
    (void)send_message(conn.get(), error_reply(target.name + ": cannot reopen its segment read-only: " +
                                                   std::strerror(err), err));
    return false;
  }
  const json result{{"size", file.info().size}, {"page_size", file.page_size()}};
  if (send_message(conn.get(), ok_reply(result), 0, seg.get()) != 0) return false;
  seg.reset();

  Received m = recv_message(conn.get(), stop_fd, kMaxViewMessage, kHandshakeTimeoutMs, /*want_fd=*/true);
  if (m.status != RecvStatus::Ok) return false;
  try {
    const json j = parse_message(m.text, {"addr", "len"});
    if (j["op"] != "map") throw std::invalid_argument("view message: expected 'map' first");
    if (m.fd.get() < 0 || !is_userfaultfd(m.fd.get())) {
      throw std::invalid_argument("view message: 'map' must come with the mapping's userfaultfd");
    }
    set_mapping(j);
  } catch (const std::invalid_argument& e) {
    (void)send_message(conn.get(), error_reply(std::string("bad request: ") + e.what(), EINVAL));
    return false;
  }
  uffd = std::move(m.fd);
  const int fl = ::fcntl(uffd.get(), F_GETFL);
  if (fl >= 0) (void)::fcntl(uffd.get(), F_SETFL, fl | O_NONBLOCK);
  return send_message(conn.get(), ok_reply()) == 0;
}

void ViewServer::View::poison(uint64_t addr) {
  uffdio_poison p{};
  p.range.start = addr / kViewSysPage * kViewSysPage;
  p.range.len = kViewSysPage;
  if (::ioctl(uffd.get(), UFFDIO_POISON, &p) == 0) return;
  if (errno == EEXIST) {  // the page became present meanwhile: let it retry
    uffdio_range r{p.range.start, p.range.len};
    (void)::ioctl(uffd.get(), UFFDIO_WAKE, &r);
  }
  // ESRCH, ENOENT: the client's address space is gone; its view ends soon.
}

void ViewServer::View::serve_fault(uint64_t addr) {
  uint64_t b = base, l = len;
  if (addr - old_base < old_len) {
    b = old_base;
    l = old_len;
  } else if (addr - base >= len) {
    poison(addr);  // outside what the client said it mapped
    return;
  }
  const uint64_t off = addr - b;
  const int rc = target.file->load_for_view(off);
  if (target.after_load) target.after_load();
  if (rc < 0) {
    if (rc != -EFAULT) log_debug("%s: a view's fault at %llu not served: %s", target.name.c_str(),
                                 static_cast<unsigned long long>(off), std::strerror(-rc));
    poison(addr);
    return;
  }
  // Wake the whole file page: every thread waiting in it retries and maps it.
  const uint64_t ps = target.file->page_size();
  const uint64_t start = off / ps * ps;
  uffdio_range r{b + start, std::min(ps, l - start)};
  (void)::ioctl(uffd.get(), UFFDIO_WAKE, &r);
}

void ViewServer::View::serve_faults() {
  uffd_msg msgs[kFaultBatch];
  for (;;) {
    const ssize_t n = ::read(uffd.get(), msgs, sizeof msgs);
    if (n <= 0) return;  // EAGAIN: all served
    for (ssize_t i = 0; i < n / static_cast<ssize_t>(sizeof(uffd_msg)); ++i) {
      if (msgs[i].event == UFFD_EVENT_PAGEFAULT) serve_fault(msgs[i].arg.pagefault.address);
    }
  }
}

void ViewServer::View::poison_pending() {
  uffd_msg msgs[kFaultBatch];
  ssize_t n;
  while ((n = ::read(uffd.get(), msgs, sizeof msgs)) > 0) {
    for (ssize_t i = 0; i < n / static_cast<ssize_t>(sizeof(uffd_msg)); ++i) {
      if (msgs[i].event == UFFD_EVENT_PAGEFAULT) poison(msgs[i].arg.pagefault.address);
    }
  }
}

// One request on an established view. False ends the view.
bool ViewServer::View::serve_request(const std::string& text) {
  File& file = *target.file;
  try {
    const json j = parse_message(text, {"addr", "len", "off"});
    const std::string op = j["op"];
    if (op == "size") return send_message(conn.get(), ok_reply({{"size", file.info().size}})) == 0;
    if (op == "map") {
      set_mapping(j);
      return send_message(conn.get(), ok_reply()) == 0;
    }
    if (op != "load") throw std::invalid_argument("view message: unknown op " + quote_for_message(op));
    const uint64_t off = get_u64(j, "off"), n = std::min(get_u64(j, "len"), kMaxLoadBytes);
    if (n) {
      const int rc = file.load_for_view(off, n);
      if (target.after_load) target.after_load();
      // -EFAULT: past the end; the reply's size tells the client where it is.
      if (rc < 0 && rc != -EFAULT) {
        return send_message(conn.get(), error_reply(target.name + ": " + std::strerror(-rc), -rc)) == 0;
      }
    }
    return send_message(conn.get(), ok_reply({{"size", file.info().size}})) == 0;
  } catch (const std::invalid_argument& e) {
    (void)send_message(conn.get(), error_reply(std::string("bad request: ") + e.what(), EINVAL));
    return false;
  }
}

void ViewServer::View::run(int stop_fd) noexcept {
  try {
    if (handshake(stop_fd)) {
      for (;;) {
        pollfd fds[3] = {{uffd.get(), POLLIN, 0}, {conn.get(), POLLIN, 0}, {stop_fd, POLLIN, 0}};
        if (::poll(fds, 3, -1) < 0) {
          if (errno == EINTR) continue;
          break;
        }
        if (fds[2].revents) {
          poison_pending();  // nobody will serve them: SIGBUS rather than a hang
          break;
        }
        if (fds[0].revents & POLLIN) serve_faults();
        if (fds[1].revents) {
          Received m = recv_message(conn.get(), -1, kMaxViewMessage, 1000);
          if (m.status != RecvStatus::Ok) {
            if (m.status == RecvStatus::TooLarge || m.status == RecvStatus::Malformed ||
                m.status == RecvStatus::Truncated)
              (void)send_message(conn.get(), error_reply("bad request: " + m.detail, EINVAL));
            break;  // closed (or died), or broke the protocol
          }
          if (!serve_request(m.text)) break;
        }
      }
    }
  } catch (const std::exception& e) {
    log_error("%s: a view ended: %s", target.name.c_str(), e.what());
  }
  drain(conn.get());
  conn.reset();
  uffd.reset();
  if (target.release) {
    try {
      target.release();
    } catch (...) {
    }
  }
  target = {};
  done = true;
}

ViewServer::ViewServer() {
  if (::pipe2(stop_pipe_, O_CLOEXEC | O_NONBLOCK) != 0) throw sys_error(errno, "views: pipe");
}

ViewServer::~ViewServer() {
  stopping_ = true;
  const char byte = 's';
  (void)!::write(stop_pipe_[1], &byte, 1);
  reap(true);
  ::close(stop_pipe_[0]);
  ::close(stop_pipe_[1]);
}

void ViewServer::reap(bool all) {
  std::list<std::unique_ptr<View>> finished;
  {
    std::lock_guard lk(mutex_);
    for (auto it = views_.begin(); it != views_.end();) {
      if (all || (*it)->done) {
        finished.push_back(std::move(*it));
        it = views_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& v : finished)
    if (v->thread.joinable()) v->thread.join();
}

void ViewServer::start(int conn, ViewTarget target) {
  reap(false);
  auto fail = [&target](int err, const std::string& why) {
    if (target.release) target.release();
    return sys_error(err, target.name + ": " + why);
  };
  std::lock_guard lk(mutex_);
  if (stopping_) throw fail(ESHUTDOWN, "the mount is going away");
  if (views_.size() >= kMaxViews) {
    throw fail(EMFILE, "the daemon serves " + std::to_string(kMaxViews) + " views already; close some");
  }
  auto v = std::make_unique<View>();
  View& view = *v;
  view.target = std::move(target);
  view.conn.reset(conn);
  try {
    view.thread = std::thread([&view, stop = stop_pipe_[0]] { view.run(stop); });
  } catch (const std::system_error& e) {
    (void)view.conn.release();  // the caller replies and closes it
    target = std::move(view.target);
    throw fail(EAGAIN, std::string("cannot start a thread: ") + e.what());
  }
  views_.push_back(std::move(v));
}

}  // namespace deferfs
