// The daemon's control server (see control.h): accepts clients, checks
// who they are (SO_PEERCRED), serves their requests one after the other and
// hands view requests over to the views' server.
#include "deferfs/control.h"
#include "deferfs/control_wire.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string_view>
#include <system_error>
#include <utility>

#include <nlohmann/json.hpp>

namespace deferfs {

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;
using namespace wire;

constexpr auto kProgressInterval = std::chrono::milliseconds(100);

void log_line(const std::string& message) {
  std::fprintf(stderr, "deferfs: control: %s\n", message.c_str());
}


// Removes a socket left at `path` by a daemon that is gone. Throws if a live
// daemon answers there or the path is something other than a socket.
void remove_stale_socket(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return;
    throw sys_error(errno, "control socket " + path);
  }
  if (!S_ISSOCK(st.st_mode)) throw sys_error(EEXIST, "control socket " + path + ": exists and is not a socket");
  UniqueFd probe = new_socket(path);
  if (try_connect(probe.get(), path) == 0) {
    throw sys_error(EADDRINUSE, "control socket " + path + ": another daemon is listening on it");
  }
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    throw sys_error(errno, "control socket " + path + ": removing the stale socket");
  }
}

// Sends a final error reply to a client we will not serve; never blocks.
void reject(int fd, const std::string& message, int err) {
  (void)send_message(fd, error_reply(message, err), MSG_DONTWAIT);
  drain(fd);
}

// Sends progress packets for one sync, at most one per kProgressInterval
// (the first and the last always). Never blocks and never throws: a client
// too slow to read simply misses some.
class ProgressSender {
 public:
  explicit ProgressSender(int fd) : fd_(fd) {}
  void operator()(uint64_t done, uint64_t total) noexcept {
    try {
      std::lock_guard lock(mutex_);
      const auto now = Clock::now();
      if (sent_any_ && done == last_done_ && total == last_total_) return;
      if (sent_any_ && done < total && now - last_sent_ < kProgressInterval) return;
      json j{{"progress", {{"done", done}, {"total", total}}}};
      (void)send_message(fd_, dump(j), MSG_DONTWAIT);
      sent_any_ = true;
      last_sent_ = now;
      last_done_ = done;
      last_total_ = total;
    } catch (...) {
      // Progress is best effort.
    }
  }

 private:
  const int fd_;
  std::mutex mutex_;  // the handler may report from several threads
  bool sent_any_ = false;
  Clock::time_point last_sent_;
  uint64_t last_done_ = 0;
  uint64_t last_total_ = 0;
};

std::string count_files(size_t n) { return std::to_string(n) + (n == 1 ? " file" : " files"); }

// The final reply of an op whose report says some files did not make it.
json partial_failure(const std::string& what, json result) {
  json j = error_json(what, EIO);
  j["result"] = std::move(result);
  return j;
}

json sync_reply(const SyncReport& r, const char* op) {
  json result = r;
  if (r.ok()) return json{{"ok", true}, {"result", std::move(result)}};
  std::string what = std::string(op) + " incomplete: " + std::to_string(r.conflicts.size()) + " in conflict, " +
                     std::to_string(r.failed.size()) + " failed; their changes stay staged";
  if (std::string_view(op) == "umount") what += "; the mount stays";
  return partial_failure(what, std::move(result));
}

json discard_reply(const DiscardReport& r) {
  json result = r;
  if (r.failed.empty()) return json{{"ok", true}, {"result", std::move(result)}};
  return partial_failure("discard incomplete: " + count_files(r.failed.size()) + " failed", std::move(result));
}

// The errno an exception from the handler stands for.
int exception_errno(const std::system_error& e) {
  const auto& cat = e.code().category();
  if (cat == std::generic_category() || cat == std::system_category()) {
    return e.code().value() ? e.code().value() : EIO;
  }
  return EIO;
}

}  // namespace
void ControlHandler::view(const std::string& path, const PeerCredentials&, int) {
  throw sys_error(ENOTSUP, quote_for_message(path) + ": this daemon serves no views");
}

// ---------------------------------------------------------------------------
// ControlServer

ControlServer::ControlServer(std::string socket_path, uid_t owner_uid, ControlHandler& handler)
    : path_(std::move(socket_path)), owner_uid_(owner_uid), handler_(handler) {
  const sockaddr_un addr = socket_address(path_);
  remove_stale_socket(path_);
  UniqueFd sock = new_socket(path_);
  if (::bind(sock.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    throw sys_error(errno, "control socket " + path_ + ": bind");
  }
  try {
    // Everyone may connect so that others get a clear EACCES reply from the
    // SO_PEERCRED check rather than a bare connect error.
    if (::chmod(path_.c_str(), 0666) != 0) throw sys_error(errno, "control socket " + path_ + ": chmod");
    if (::listen(sock.get(), 64) != 0) throw sys_error(errno, "control socket " + path_ + ": listen");
    int p[2];
    if (::pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) throw sys_error(errno, "control socket " + path_ + ": pipe");
    stop_pipe_[0] = p[0];
    stop_pipe_[1] = p[1];
  } catch (...) {
    ::unlink(path_.c_str());
    throw;
  }
  listen_fd_ = sock.release();
  reserve_fd_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
}

ControlServer::~ControlServer() {
  stop();
  if (thread_.joinable()) thread_.join();
  reap_workers(true);
  for (int fd : {listen_fd_, stop_pipe_[0], stop_pipe_[1], reserve_fd_}) {
    if (fd >= 0) ::close(fd);
  }
  ::unlink(path_.c_str());
}

void ControlServer::start() {
  if (started_.exchange(true)) return;
  thread_ = std::thread(&ControlServer::run, this);
}

void ControlServer::stop() {
  if (stopping_.exchange(true)) return;
  const char byte = 's';
  (void)!::write(stop_pipe_[1], &byte, 1);  // stays unread: every poller sees it
}

void ControlServer::run() noexcept {
  while (!stopping_) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {stop_pipe_[0], POLLIN, 0}};
    const int n = ::poll(fds, 2, 1000);
    try {
      reap_workers(false);
      if (n < 0) {
        if (errno != EINTR) {
          log_line(std::string("poll: ") + std::strerror(errno));
          std::this_thread::sleep_for(std::chrono::milliseconds(100));
        }
        continue;
      }
      if (fds[1].revents) break;
      if (fds[0].revents) accept_one();
    } catch (const std::exception& e) {
      log_line(std::string("accepting a client: ") + e.what());
    } catch (...) {
      log_line("accepting a client: unknown error");
    }
  }
}

void ControlServer::accept_one() {
  if (reserve_fd_ < 0) reserve_fd_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);  // back after an EMFILE
  UniqueFd conn(::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC));
  if (conn.get() < 0 && (errno == EMFILE || errno == ENFILE) && reserve_fd_ >= 0) {
    log_line("out of file descriptors (" + std::string(std::strerror(errno)) +
             "): a control client is served on the reserved one");
    ::close(std::exchange(reserve_fd_, -1));
    conn.reset(::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC));
  }
  if (conn.get() < 0) {
    const int err = errno;
    if (err == EINTR || err == EAGAIN || err == ECONNABORTED) return;
    log_line(std::string("accept: ") + std::strerror(err));
    std::this_thread::sleep_for(std::chrono::milliseconds(100));  // e.g. EMFILE: do not spin
    return;
  }
  set_timeout(conn.get(), SO_SNDTIMEO, kIoTimeoutMs);
  set_timeout(conn.get(), SO_RCVTIMEO, kIoTimeoutMs);

  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(conn.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
    reject(conn.get(), std::string("cannot identify the client: ") + std::strerror(errno), EACCES);
    return;
  }
  // Anyone may ask for a view (spec 9.3: the handler checks the file's
  // permissions); everything else is for the owner and root only, checked
  // per request in handle().
  const PeerCredentials peer{cred.pid, cred.uid, cred.gid};
  const bool owner = cred.uid == owner_uid_ || cred.uid == 0;
  if (!owner) {
    size_t others = 0;
    for (const Worker& w : workers_) others += !w.owner && !w.done;
    if (others >= kMaxOtherClients) {
      reject(conn.get(), "the daemon is busy: " + std::to_string(kMaxOtherClients) +
                             " clients of other users connected, try again", EBUSY);
      return;
    }
  }
  if (workers_.size() >= kMaxClients) {
    // A client that got its reply and closed may still be counted: its thread
    // is only now seeing the end of the stream.
    std::unique_lock lk(finished_mutex_);
    finished_cv_.wait_for(lk, std::chrono::milliseconds(kFullWaitMs), [this] {
      for (const Worker& w : workers_)
        if (w.done) return true;
      return false;
    });
    lk.unlock();
    reap_workers(false);
  }
  if (workers_.size() >= kMaxClients) {
    reject(conn.get(), "the daemon is busy: " + std::to_string(kMaxClients) + " clients connected, try again",
           EBUSY);
    return;
  }
  Worker& w = workers_.emplace_back();
  w.owner = owner;
  try {
    w.thread = std::thread([this, &w, fd = conn.get(), peer] {
      serve_client(fd, peer);
      {
        std::lock_guard lk(finished_mutex_);
        w.done = true;
      }
      finished_cv_.notify_all();
    });
  } catch (const std::system_error& e) {
    workers_.pop_back();
    reject(conn.get(), std::string("the daemon cannot start a thread: ") + e.what(), EAGAIN);
    return;
  }
  (void)conn.release();  // the client thread owns it now
}

void ControlServer::reap_workers(bool all) {
  for (auto it = workers_.begin(); it != workers_.end();) {
    if (all || it->done) {
      if (it->thread.joinable()) it->thread.join();
      it = workers_.erase(it);
    } else {
      ++it;
    }
  }
}

void ControlServer::serve_client(int fd, const PeerCredentials& peer) noexcept {
  UniqueFd conn(fd);
  try {
    while (!stopping_) {
      Received m = recv_message(fd, stop_pipe_[0], kMaxMessageBytes, kIoTimeoutMs);
      switch (m.status) {
        case RecvStatus::Ok: {
          bool close = false;
          const std::string reply = handle(m.text, conn, peer, close);
          if (conn.get() < 0) return;  // a view took the connection over
          if (send_message(fd, reply) != 0) return;
          if (close) {
            drain(fd);
            return;
          }
          break;
        }
        case RecvStatus::TooLarge:
          (void)send_message(fd, error_reply("bad request: " + m.detail, EMSGSIZE));
          drain(fd);
          return;
        case RecvStatus::Truncated:
        case RecvStatus::Malformed:
          (void)send_message(fd, error_reply("bad request: " + m.detail, EINVAL));
          drain(fd);
          return;
        case RecvStatus::Eof:
        case RecvStatus::Timeout:
        case RecvStatus::Stopped:
        case RecvStatus::Error:
          return;
      }
    }
  } catch (const std::exception& e) {
    log_line(std::string("serving a client: ") + e.what());
  } catch (...) {
    log_line("serving a client: unknown error");
  }
}

std::string ControlServer::handle(const std::string& message, UniqueFd& conn, const PeerCredentials& peer,
                                  bool& close) {
  const int fd = conn.get();
  try {
    const ControlRequest req = parse_request(message);
    json reply;
    if (peer.uid != owner_uid_ && peer.uid != 0 && req.op != "view") {
      log_line("refused a client of uid " + std::to_string(peer.uid) + " (pid " + std::to_string(peer.pid) + ")");
      close = true;
      return error_reply("permission denied: only uid " + std::to_string(owner_uid_) +
                             " (who mounted) and root may control this mount, not uid " + std::to_string(peer.uid),
                         EACCES);
    }
    if (req.op == "view") {
      // The handler checks that the client may read the file and takes the
      // connection over; if it throws, the error is replied below.
      close = true;
      handler_.view(req.paths.front(), peer, fd);
      (void)conn.release();
      return {};
    } else if (req.op == "sync") {
      std::lock_guard lock(op_mutex_);
      ProgressSender sender(fd);
      const ControlHandler::Progress progress = [&sender](uint64_t done, uint64_t total) { sender(done, total); };
      reply = sync_reply(handler_.sync(req.paths, req.force, progress), "sync");
    } else if (req.op == "status") {
      reply = json{{"ok", true}, {"result", handler_.status(req.paths)}};
    } else if (req.op == "discard") {
      std::lock_guard lock(op_mutex_);
      reply = discard_reply(handler_.discard(req.paths));
    } else if (req.op == "stats") {
      reply = json{{"ok", true}, {"result", handler_.stats()}};
    } else {  // umount; parse_request admits no other op
      std::lock_guard lock(op_mutex_);
      reply = sync_reply(handler_.umount(req.discard), "umount");
    }
    std::string text = dump(reply);
    if (text.size() > kMaxReplyBytes) {
      return error_reply("reply of " + std::to_string(text.size()) + " bytes is larger than the limit of " +
                             std::to_string(kMaxReplyBytes) + "; name fewer paths",
                         EMSGSIZE);
    }
    return text;
  } catch (const ProtocolError& e) {
    return error_reply(std::string("bad request: ") + e.what(), EINVAL);
  } catch (const std::system_error& e) {
    return error_reply(e.what(), exception_errno(e));
  } catch (const std::invalid_argument& e) {
    return error_reply(e.what(), EINVAL);
  } catch (const std::bad_alloc&) {
    return error_reply("out of memory", ENOMEM);
  } catch (const std::exception& e) {
    return error_reply(e.what(), EIO);
  } catch (...) {
    return error_reply("unknown internal error", EIO);
  }
}


}  // namespace deferfs
