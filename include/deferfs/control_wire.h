// The control protocol's wire (see control.h for the format): the framing of
// messages over SOCK_SEQPACKET packets, file descriptors passed along with a
// message (SCM_RIGHTS), the socket helpers and the error-reply shape. Shared
// by the daemon's server (control_server.cc), the client (control_client.cc)
// and the views (view.cc, view_server.cc). Internal: not installed.
#pragma once

#include <sys/types.h>
#include <sys/un.h>

#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include <nlohmann/json_fwd.hpp>

namespace deferfs::wire {

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
  void reset(int fd = -1);

 private:
  int fd_;
};

std::system_error sys_error(int err, const std::string& what);
// "EACCES" for EACCES; "EIO" for anything glibc has no name for.
std::string errno_name(int err);
// The errno an "errno" name of a reply stands for (EIO when unknown).
int errno_of_name(const std::string& name);
// Serializes for the wire. Invalid UTF-8 becomes U+FFFD instead of an exception.
std::string dump(const nlohmann::json& j);
// A string quoted for an error message, control characters escaped.
std::string quote_for_message(std::string_view s);
nlohmann::json error_json(const std::string& message, int err);
std::string error_reply(const std::string& message, int err);

enum class RecvStatus { Ok, Eof, Timeout, Stopped, TooLarge, Truncated, Malformed, Error };

struct Received {
  RecvStatus status = RecvStatus::Error;
  std::string text;    // the message, for Ok
  std::string detail;  // the cause, for TooLarge/Truncated/Malformed
  int err = 0;         // errno, for Error
  UniqueFd fd;         // a descriptor passed with an unfragmented message, if asked for
};

// Receives one whole message (reassembling fragments) of at most `limit`
// bytes. Each packet must arrive within `timeout_ms` (< 0: no limit).
// Returns Stopped as soon as `stop_fd` (may be -1) is readable. With
// `want_fd`, one descriptor passed along with an unfragmented message is kept
// in Received::fd; every other descriptor that arrives is closed at once.
Received recv_message(int fd, int stop_fd, size_t limit, int timeout_ms, bool want_fd = false);

// Sends one message, in fragments if it does not fit in a packet; `pass_fd`
// (>= 0) travels with it (the message must then fit one packet). Returns 0
// or errno (EAGAIN when the send timeout expired).
int send_message(int fd, std::string_view text, int flags = 0, int pass_fd = -1);

// Before closing a connection early: stop writing and drop what the peer
// already sent, so that closing does not turn into ECONNRESET ahead of our
// last reply on its side.
void drain(int fd);

void set_timeout(int fd, int option, int ms);
sockaddr_un socket_address(const std::string& path);
UniqueFd new_socket(const std::string& path);
// Connects to the socket at `path`; returns the error number, 0 on success.
int try_connect(int fd, const std::string& path);

}  // namespace deferfs::wire
