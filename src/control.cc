// The control protocol (see control.h): request validation, the daemon's
// socket server and the CLI's client call.
#include "deferfs/control.h"

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
#include <optional>
#include <string_view>
#include <system_error>
#include <utility>

#include <nlohmann/json.hpp>

namespace deferfs {

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr int kMaxJsonDepth = 8;           // a request nests 2 levels; more is hostile
constexpr size_t kMaxPathBytes = 4096;     // PATH_MAX
constexpr size_t kMaxNameBytes = 255;      // NAME_MAX
constexpr int kClientReplyTimeoutMs = 60'000;
constexpr auto kProgressInterval = std::chrono::milliseconds(100);
constexpr const char* kOps[] = {"sync", "status", "discard", "stats", "umount"};

// ---------------------------------------------------------------------------
// Small helpers

// Owns one file descriptor; closes it on destruction. Not copyable.
class UniqueFd {
 public:
  explicit UniqueFd(int fd = -1) : fd_(fd) {}
  ~UniqueFd() { reset(); }
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = o.release();
    }
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;

  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

std::system_error sys_error(int err, const std::string& what) {
  return std::system_error(err, std::generic_category(), what);
}

// "EACCES" for EACCES; "EIO" for anything glibc has no name for.
std::string errno_name(int err) {
  const char* name = ::strerrorname_np(err);
  return name ? name : "EIO";
}

// Serializes for the wire. Invalid UTF-8 (a non-UTF-8 file name in a report)
// becomes U+FFFD instead of an exception.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// A string quoted for an error message, control characters escaped.
std::string quote_for_message(std::string_view s) { return dump(json(std::string(s))); }

void log_line(const std::string& message) {
  std::fprintf(stderr, "deferfs: control: %s\n", message.c_str());
}

json error_json(const std::string& message, int err) {
  return json{{"ok", false}, {"error", message}, {"errno", errno_name(err)}};
}

std::string error_reply(const std::string& message, int err) { return dump(error_json(message, err)); }

// Offset of the first byte that is not part of well-formed UTF-8 (RFC 3629:
// no overlong forms, no surrogates, nothing above U+10FFFF), or npos.
size_t first_invalid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;  // overlong
      if (c == 0xED) hi = 0x9F;  // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;  // overlong
      if (c == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
      return i;
    }
    if (i + len > s.size()) return i;
    const auto c1 = static_cast<unsigned char>(s[i + 1]);
    if (c1 < lo || c1 > hi) return i;
    for (size_t k = 2; k < len; ++k) {
      const auto ck = static_cast<unsigned char>(s[i + k]);
      if (ck < 0x80 || ck > 0xBF) return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

// ---------------------------------------------------------------------------
// Request validation

json parse_json_limited(const std::string& text) {
  json::parser_callback_t limit_depth = [](int depth, json::parse_event_t, json&) {
    if (depth > kMaxJsonDepth) {
      throw ProtocolError("request nests deeper than " + std::to_string(kMaxJsonDepth) + " levels");
    }
    return true;
  };
  try {
    return json::parse(text, limit_depth);
  } catch (const json::exception& e) {
    // what() starts with "[json.exception.parse_error.101] "; keep the rest.
    std::string why = e.what();
    if (auto pos = why.find("] "); pos != std::string::npos) why.erase(0, pos + 2);
    throw ProtocolError("request is not valid JSON (truncated or malformed): " + why);
  }
}

bool is_known_op(const std::string& op) {
  for (const char* known : kOps) {
    if (op == known) return true;
  }
  return false;
}

// Validates one path of the request and returns it normalized.
std::string normalize_path(const std::string& path) {
  if (path.size() > kMaxPathBytes) {
    throw ProtocolError("path of " + std::to_string(path.size()) + " bytes is longer than " +
                        std::to_string(kMaxPathBytes));
  }
  if (path.find('\0') != std::string::npos) {
    throw ProtocolError("path " + quote_for_message(path) + " contains a NUL byte");
  }
  if (!path.empty() && path[0] == '/') {
    throw ProtocolError("path " + quote_for_message(path) + " is absolute; paths are relative to the mount root");
  }
  std::string out;
  size_t start = 0;
  while (start <= path.size()) {
    size_t end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    const std::string_view name(path.data() + start, end - start);
    if (name == "..") {
      throw ProtocolError("path " + quote_for_message(path) + " has a '..' component; paths must stay inside the mount");
    }
    if (name.size() > kMaxNameBytes) {
      throw ProtocolError("path " + quote_for_message(path) + " has a name longer than " +
                          std::to_string(kMaxNameBytes) + " bytes");
    }
    if (!name.empty() && name != ".") {
      if (!out.empty()) out += '/';
      out += name;
    }
    start = end + 1;
  }
  return out;
}

std::vector<std::string> parse_paths(const json& j, const std::string& op) {
  auto it = j.find("paths");
  const bool needs_paths = op == "sync" || op == "status" || op == "discard";
  if (it == j.end()) {
    if (needs_paths) throw ProtocolError("request for '" + op + "' has no 'paths'");
    return {};
  }
  if (!it->is_array()) throw ProtocolError("'paths' must be a list of strings");
  if (it->empty() && needs_paths) {
    throw ProtocolError("'paths' is empty (use [\"\"] for the whole mount)");
  }
  std::vector<std::string> paths;
  paths.reserve(it->size());
  for (const json& p : *it) {
    if (!p.is_string()) throw ProtocolError("'paths' must be a list of strings, found " + std::string(p.type_name()));
    paths.push_back(normalize_path(p.get<std::string>()));
  }
  return paths;
}

// Reads an optional boolean field that only `only_op` accepts.
bool parse_flag(const json& j, const char* key, const std::string& op, const char* only_op) {
  auto it = j.find(key);
  if (it == j.end()) return false;
  if (!it->is_boolean()) {
    throw ProtocolError(std::string("'") + key + "' must be true or false, found " + it->type_name());
  }
  if (op != only_op) {
    throw ProtocolError(std::string("'") + key + "' applies only to " + only_op + ", not to " + op);
  }
  return it->get<bool>();
}

void check_version(const json& j) {
  auto it = j.find("version");
  if (it == j.end()) throw ProtocolError("request has no 'version'");
  if (!it->is_number_integer() || it->get<int64_t>() != kProtocolVersion) {
    throw ProtocolError("unsupported protocol version " + dump(*it) + " (this daemon speaks " +
                        std::to_string(kProtocolVersion) + ")");
  }
}

std::string parse_op(const json& j) {
  auto it = j.find("op");
  if (it == j.end()) throw ProtocolError("request has no 'op'");
  if (!it->is_string()) throw ProtocolError("'op' must be a string, found " + std::string(it->type_name()));
  std::string op = it->get<std::string>();
  if (!is_known_op(op)) {
    throw ProtocolError("unknown op " + quote_for_message(op) + " (expected sync, status, discard, stats or umount)");
  }
  return op;
}

void check_known_fields(const json& j) {
  for (const auto& item : j.items()) {
    const std::string& key = item.key();
    if (key != "version" && key != "op" && key != "paths" && key != "force" && key != "discard") {
      throw ProtocolError("unknown field " + quote_for_message(key) + " in request");
    }
  }
}

json request_json(const ControlRequest& req) {
  json j{{"version", kProtocolVersion}, {"op", req.op}, {"paths", req.paths}};
  if (req.op == "sync") j["force"] = req.force;
  if (req.op == "umount") j["discard"] = req.discard;
  return j;
}

// ---------------------------------------------------------------------------
// Framing: messages over SOCK_SEQPACKET packets (see control.h)

enum class RecvStatus { Ok, Eof, Timeout, Stopped, TooLarge, Truncated, Malformed, Error };

struct Received {
  RecvStatus status = RecvStatus::Error;
  std::string text;    // the message, for Ok
  std::string detail;  // the cause, for TooLarge/Truncated/Malformed
  int err = 0;         // errno, for Error
};

Received received(RecvStatus status, std::string detail = {}, int err = 0) {
  Received r;
  r.status = status;
  r.detail = std::move(detail);
  r.err = err;
  return r;
}

// Waits until `fd` is readable. Returns 1 readable, 0 timed out, -1 `stop_fd`
// became readable, -2 poll failed (errno set). timeout_ms < 0 waits forever.
int wait_readable(int fd, int stop_fd, int timeout_ms) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms < 0 ? 0 : timeout_ms);
  for (;;) {
    pollfd fds[2] = {{fd, POLLIN, 0}, {stop_fd, POLLIN, 0}};
    int wait = -1;
    if (timeout_ms >= 0) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      wait = left < 0 ? 0 : static_cast<int>(left);
    }
    const int n = ::poll(fds, stop_fd >= 0 ? 2 : 1, wait);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -2;
    }
    if (n == 0) return 0;
    if (stop_fd >= 0 && fds[1].revents) return -1;
    return 1;
  }
}

// recv(2) that retries on EINTR, and once on ECONNRESET: a peer that closed
// with our data unread leaves that error pending ahead of the packets it
// sent us before, which are still there to read.
ssize_t recv_retrying(int fd, void* buf, size_t len, int flags) {
  bool reset_seen = false;
  for (;;) {
    const ssize_t n = ::recv(fd, buf, len, flags);
    if (n >= 0 || errno == EINTR) {
      if (n >= 0) return n;
      continue;
    }
    if (errno != ECONNRESET || reset_seen) return n;
    reset_seen = true;
  }
}

// Receives one packet into `out`. Returns its status: Ok, Eof, TooLarge,
// Timeout (nothing there after all) or Error.
Received recv_packet(int fd, std::string& out) {
  const ssize_t size = recv_retrying(fd, nullptr, 0, MSG_PEEK | MSG_TRUNC | MSG_DONTWAIT);
  if (size < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return received(RecvStatus::Timeout);
    return received(RecvStatus::Error, {}, errno);
  }
  if (size == 0) {
    char c;
    (void)::recv(fd, &c, 1, MSG_DONTWAIT);  // consume an empty packet if it was one
    return received(RecvStatus::Eof);
  }
  if (static_cast<size_t>(size) > kMaxPacketBytes) {
    char c;
    (void)::recv(fd, &c, 1, MSG_TRUNC | MSG_DONTWAIT);  // drops the rest of the packet
    return received(RecvStatus::TooLarge, "packet of " + std::to_string(size) +
                                              " bytes is larger than the limit of " +
                                              std::to_string(kMaxPacketBytes));
  }
  out.resize(static_cast<size_t>(size));
  const ssize_t got = recv_retrying(fd, out.data(), out.size(), MSG_DONTWAIT);
  if (got < 0) return received(RecvStatus::Error, {}, errno);
  out.resize(static_cast<size_t>(got));
  return received(RecvStatus::Ok);
}

// Before closing a connection early: stop writing and drop what the client
// already sent, so that closing does not turn into ECONNRESET ahead of our
// last reply on its side. Bounded: a client that keeps sending gets the reset.
void drain(int fd) {
  (void)::shutdown(fd, SHUT_WR);
  char c;
  for (int i = 0; i < 64; ++i) {
    if (::recv(fd, &c, 1, MSG_TRUNC | MSG_DONTWAIT) <= 0) return;
  }
}

// Receives one whole message (reassembling fragments) of at most `limit`
// bytes. Each packet must arrive within `timeout_ms` (< 0: no limit).
// Returns Stopped as soon as `stop_fd` (may be -1) is readable.
Received recv_message(int fd, int stop_fd, size_t limit, int timeout_ms) {
  std::string text;
  bool fragmented = false;
  std::string packet;
  for (;;) {
    const int w = wait_readable(fd, stop_fd, timeout_ms);
    if (w == -1) return received(RecvStatus::Stopped);
    if (w == -2) return received(RecvStatus::Error, {}, errno);
    if (w == 0) {
      if (!fragmented) return received(RecvStatus::Timeout);
      return received(RecvStatus::Truncated, "truncated message: no further fragment within " +
                                                 std::to_string(timeout_ms / 1000) + " s");
    }
    Received p = recv_packet(fd, packet);
    if (p.status == RecvStatus::Timeout) continue;  // spurious wakeup
    if (p.status == RecvStatus::Eof && fragmented) {
      return received(RecvStatus::Truncated, "truncated message: connection closed after a fragment");
    }
    if (p.status != RecvStatus::Ok) return p;

    const char mark = packet.empty() ? '\0' : packet[0];
    if (!fragmented && mark != '+') {
      if (mark == '=') return received(RecvStatus::Malformed, "final fragment ('=') without a first one");
      Received r = received(RecvStatus::Ok);
      r.text = std::move(packet);
      return r;
    }
    if (mark != '+' && mark != '=') {
      return received(RecvStatus::Malformed, "packet inside a fragmented message does not start with '+' or '='");
    }
    text.append(packet, 1);
    if (text.size() > limit) {
      return received(RecvStatus::TooLarge, "message is larger than the limit of " + std::to_string(limit) +
                                                " bytes");
    }
    fragmented = true;
    if (mark == '=') {
      Received r = received(RecvStatus::Ok);
      r.text = std::move(text);
      return r;
    }
  }
}

// Sends one packet: optional one-byte mark, then `piece`. Returns 0 or errno.
int send_packet(int fd, char mark, std::string_view piece, int flags) {
  iovec iov[2];
  int n = 0;
  if (mark) iov[n++] = {&mark, 1};
  iov[n++] = {const_cast<char*>(piece.data()), piece.size()};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = n;
  for (;;) {
    if (::sendmsg(fd, &msg, flags | MSG_NOSIGNAL) >= 0) return 0;
    if (errno != EINTR) return errno;
  }
}

// Sends one message, in fragments if it does not fit in a packet.
// Returns 0 or errno (EAGAIN when the send timeout expired).
int send_message(int fd, std::string_view text, int flags = 0) {
  if (text.size() <= kMaxPacketBytes) return send_packet(fd, '\0', text, flags);
  constexpr size_t piece = kMaxPacketBytes - 1;
  for (size_t off = 0; off < text.size(); off += piece) {
    const bool last = off + piece >= text.size();
    if (int err = send_packet(fd, last ? '=' : '+', text.substr(off, piece), flags)) return err;
  }
  return 0;
}

void set_timeout(int fd, int option, int ms) {
  timeval tv{ms / 1000, (ms % 1000) * 1000};
  (void)::setsockopt(fd, SOL_SOCKET, option, &tv, sizeof tv);
}

sockaddr_un socket_address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof addr.sun_path) {
    throw sys_error(ENAMETOOLONG, "control socket " + path + ": path empty or longer than " +
                                      std::to_string(sizeof addr.sun_path - 1) + " bytes");
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return addr;
}

UniqueFd new_socket(const std::string& path) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (fd.get() < 0) throw sys_error(errno, "control socket " + path + ": socket");
  return fd;
}

// Connects to the socket at `path`; returns the error number, 0 on success.
int try_connect(int fd, const std::string& path) {
  const sockaddr_un addr = socket_address(path);
  for (;;) {
    if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0) return 0;
    if (errno != EINTR) return errno;
  }
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

// ---------------------------------------------------------------------------
// parse_request

ControlRequest parse_request(const std::string& packet) {
  if (packet.size() > kMaxMessageBytes) {
    throw ProtocolError("request of " + std::to_string(packet.size()) + " bytes is larger than the limit of " +
                        std::to_string(kMaxMessageBytes));
  }
  if (packet.empty()) throw ProtocolError("empty request");
  if (size_t bad = first_invalid_utf8(packet); bad != std::string::npos) {
    throw ProtocolError("request is not valid UTF-8 (byte " + std::to_string(bad) + ")");
  }
  // The JSON parser would stop at a raw NUL and accept what came before it.
  if (size_t nul = packet.find('\0'); nul != std::string::npos) {
    throw ProtocolError("request contains a NUL byte (byte " + std::to_string(nul) + ")");
  }
  const json j = parse_json_limited(packet);
  if (!j.is_object()) throw ProtocolError("request is not a JSON object but " + std::string(j.type_name()));
  check_known_fields(j);
  check_version(j);
  ControlRequest req;
  req.op = parse_op(j);
  req.paths = parse_paths(j, req.op);
  req.force = parse_flag(j, "force", req.op, "sync");
  req.discard = parse_flag(j, "discard", req.op, "umount");
  return req;
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
}

ControlServer::~ControlServer() {
  stop();
  if (thread_.joinable()) thread_.join();
  reap_workers(true);
  for (int fd : {listen_fd_, stop_pipe_[0], stop_pipe_[1]}) {
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
  UniqueFd conn(::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC));
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
  if (cred.uid != owner_uid_ && cred.uid != 0) {
    log_line("refused a client of uid " + std::to_string(cred.uid) + " (pid " + std::to_string(cred.pid) + ")");
    reject(conn.get(),
           "permission denied: only uid " + std::to_string(owner_uid_) +
               " (who mounted) and root may control this mount, not uid " + std::to_string(cred.uid),
           EACCES);
    return;
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
  try {
    w.thread = std::thread([this, &w, fd = conn.get()] {
      serve_client(fd);
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

void ControlServer::serve_client(int fd) noexcept {
  UniqueFd conn(fd);
  try {
    while (!stopping_) {
      Received m = recv_message(fd, stop_pipe_[0], kMaxMessageBytes, kIoTimeoutMs);
      switch (m.status) {
        case RecvStatus::Ok:
          if (send_message(fd, handle(m.text, fd)) != 0) return;
          break;
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

std::string ControlServer::handle(const std::string& message, int fd) {
  try {
    const ControlRequest req = parse_request(message);
    json reply;
    if (req.op == "sync") {
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

// ---------------------------------------------------------------------------
// control_call

namespace {

// After a failed send: the daemon may have replied and closed (e.g. EACCES
// before reading our request). Returns that reply if it is there.
std::optional<json> pending_reply(int fd) {
  Received m = recv_message(fd, -1, kMaxReplyBytes, 100);
  if (m.status != RecvStatus::Ok) return std::nullopt;
  json j = json::parse(m.text, nullptr, false);
  if (j.is_object() && j.contains("ok")) return j;
  return std::nullopt;
}

// Reads replies until the final one; progress replies go to `on_progress`.
json read_final_reply(int fd, const std::string& path, int timeout_ms,
                      const std::function<void(uint64_t, uint64_t)>& on_progress) {
  for (;;) {
    Received m = recv_message(fd, -1, kMaxReplyBytes, timeout_ms);
    switch (m.status) {
      case RecvStatus::Ok:
        break;
      case RecvStatus::Eof:
        throw ProtocolError("the daemon at " + path + " closed the connection without a reply");
      case RecvStatus::Timeout:
        throw sys_error(ETIMEDOUT, "no reply from " + path + " within " + std::to_string(timeout_ms / 1000) + " s");
      case RecvStatus::Error:
      case RecvStatus::Stopped:
        throw sys_error(m.err ? m.err : EIO, "receive from " + path);
      case RecvStatus::TooLarge:
      case RecvStatus::Truncated:
      case RecvStatus::Malformed:
        throw ProtocolError("bad reply from " + path + ": " + m.detail);
    }
    json j = json::parse(m.text, nullptr, false);
    if (j.is_discarded() || !j.is_object()) {
      throw ProtocolError("bad reply from " + path + ": not a JSON object");
    }
    if (auto p = j.find("progress"); p != j.end()) {
      if (!p->is_object() || !p->contains("done") || !p->contains("total") || !(*p)["done"].is_number_unsigned() ||
          !(*p)["total"].is_number_unsigned()) {
        throw ProtocolError("bad reply from " + path + ": malformed progress");
      }
      if (on_progress) on_progress((*p)["done"].get<uint64_t>(), (*p)["total"].get<uint64_t>());
      continue;
    }
    if (auto ok = j.find("ok"); ok == j.end() || !ok->is_boolean()) {
      throw ProtocolError("bad reply from " + path + ": no boolean 'ok'");
    }
    return j;
  }
}

}  // namespace

nlohmann::json control_call(const std::string& socket_path, const ControlRequest& req,
                            const std::function<void(uint64_t, uint64_t)>& on_progress) {
  std::string text;
  try {
    text = request_json(req).dump();
  } catch (const json::exception&) {
    throw ProtocolError("a path of the request is not valid UTF-8");
  }
  if (text.size() > kMaxMessageBytes) {
    throw ProtocolError("request of " + std::to_string(text.size()) + " bytes is larger than the limit of " +
                        std::to_string(kMaxMessageBytes) + "; name fewer paths");
  }
  UniqueFd sock = new_socket(socket_path);
  // A refused connection to a socket that exists is transient (a daemon
  // between bind and listen, or replacing a stale socket): retry briefly.
  for (int attempt = 0;; ++attempt) {
    int err = try_connect(sock.get(), socket_path);
    if (err == 0) break;
    if (err != ECONNREFUSED || attempt >= 20)
      throw ControlConnectError(err, std::generic_category(), "connect to " + socket_path);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    sock = new_socket(socket_path);
  }
  set_timeout(sock.get(), SO_SNDTIMEO, ControlServer::kIoTimeoutMs);

  if (int err = send_message(sock.get(), text)) {
    if (auto reply = pending_reply(sock.get())) return *reply;
    throw sys_error(err == EAGAIN ? ETIMEDOUT : err, "send to " + socket_path);
  }
  const bool long_op = req.op == "sync" || req.op == "umount";
  return read_final_reply(sock.get(), socket_path, long_op ? -1 : kClientReplyTimeoutMs, on_progress);
}

}  // namespace deferfs
