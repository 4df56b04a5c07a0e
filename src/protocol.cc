// The control protocol (see control.h and control_wire.h): request
// validation and the wire, shared by the daemon's server and the client.
#include "deferfs/control.h"
#include "deferfs/control_wire.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <string_view>
#include <system_error>
#include <utility>

#include <nlohmann/json.hpp>

namespace deferfs {

namespace wire {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

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
int errno_of_name(const std::string& name) {
  for (int e = 1; e < 134; ++e) {
    const char* n = ::strerrorname_np(e);
    if (n && name == n) return e;
  }
  return EIO;
}

json error_json(const std::string& message, int err) {
  return json{{"ok", false}, {"error", message}, {"errno", errno_name(err)}};
}

std::string error_reply(const std::string& message, int err) { return dump(error_json(message, err)); }

// ---------------------------------------------------------------------------
// Framing: messages over SOCK_SEQPACKET packets (see control.h)

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

// Receives the rest of a packet into `out` with recvmsg; with `fd_out`, a
// descriptor passed along with it is kept there (only one: any other that
// arrived is closed). Without it the kernel drops passed descriptors.
ssize_t recv_with_fd(int fd, std::string& out, UniqueFd* fd_out) {
  iovec iov{out.data(), out.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (fd_out) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
  }
  ssize_t got;
  for (;;) {
    got = ::recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (got >= 0 || errno != EINTR) break;
  }
  if (got < 0 || !fd_out) return got;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < n; ++i) {
      int passed;
      std::memcpy(&passed, CMSG_DATA(c) + i * sizeof(int), sizeof passed);
      if (fd_out->get() < 0)
        fd_out->reset(passed);
      else
        ::close(passed);
    }
  }
  return got;
}

// Receives one packet into `out`. Returns its status: Ok, Eof, TooLarge,
// Timeout (nothing there after all) or Error.
Received recv_packet(int fd, std::string& out, UniqueFd* fd_out) {
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
  const ssize_t got = recv_with_fd(fd, out, fd_out);
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
Received recv_message(int fd, int stop_fd, size_t limit, int timeout_ms, bool want_fd) {
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
    UniqueFd passed;
    Received p = recv_packet(fd, packet, want_fd ? &passed : nullptr);
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
      r.fd = std::move(passed);
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
int send_packet(int fd, char mark, std::string_view piece, int flags, int pass_fd = -1) {
  iovec iov[2];
  int n = 0;
  if (mark) iov[n++] = {&mark, 1};
  iov[n++] = {const_cast<char*>(piece.data()), piece.size()};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = n;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  if (pass_fd >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &pass_fd, sizeof pass_fd);
  }
  for (;;) {
    if (::sendmsg(fd, &msg, flags | MSG_NOSIGNAL) >= 0) return 0;
    if (errno != EINTR) return errno;
  }
}

// Sends one message, in fragments if it does not fit in a packet.
// Returns 0 or errno (EAGAIN when the send timeout expired).
int send_message(int fd, std::string_view text, int flags, int pass_fd) {
  if (text.size() <= kMaxPacketBytes) return send_packet(fd, '\0', text, flags, pass_fd);
  if (pass_fd >= 0) return EMSGSIZE;
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

}  // namespace wire

namespace {

using nlohmann::json;
using wire::dump;
using wire::quote_for_message;

constexpr int kMaxJsonDepth = 8;           // a request nests 2 levels; more is hostile
constexpr size_t kMaxPathBytes = 4096;     // PATH_MAX
constexpr size_t kMaxNameBytes = 255;      // NAME_MAX
constexpr const char* kOps[] = {"sync", "status", "discard", "stats", "umount", "view"};

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
  const bool needs_paths = op == "sync" || op == "status" || op == "discard" || op == "view";
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
  if (op == "view" && paths.size() != 1) {
    throw ProtocolError("a view request names exactly one file, not " + std::to_string(paths.size()));
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
    throw ProtocolError("unknown op " + quote_for_message(op) + " (expected sync, status, discard, stats, umount or view)");
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

}  // namespace deferfs
