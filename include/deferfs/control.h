// The control protocol between the `deferfs` CLI and a mounted daemon.
//
// Transport: a Unix SOCK_SEQPACKET socket. A message is one UTF-8 JSON object.
// A message of at most kMaxPacketBytes travels as one packet holding exactly
// its text. A longer one is cut into fragments: every packet but the last
// holds '+' followed by a piece, the last holds '=' followed by the final
// piece (a JSON text never starts with '+' or '='), each packet at most
// kMaxPacketBytes. Requests are at most kMaxMessageBytes, replies at most
// kMaxReplyBytes. The daemon identifies each client by SO_PEERCRED.
//
// Request:  {"version": 1, "op": "sync"|"status"|"discard"|"stats"|"umount"|"view",
//            "paths": ["rel/path", ...],   // relative to the mount root; "" = all
//            "force": bool,                // sync only
//            "discard": bool}              // umount only
//   "paths" is required and non-empty for sync, status and discard, optional
//   (and unused) for stats and umount; exactly one file for view. Unknown
//   fields are an error. Every user may send "view" (its handler checks the
//   file's permissions, spec 9.3); the other ops are for the mounting user
//   and root, others get "errno": "EACCES" and the connection is closed.
//   A view request hands the connection to the views' protocol (view.h).
// Replies:  zero or more {"progress": {"done": N, "total": N}} (sync only,
//           at most about ten a second), then exactly one final
//           {"ok": true, "result": {...report...}}
//           or {"ok": false, "error": "message naming the cause", "errno": "EINVAL"}.
//           When sync, discard or umount ran but some files failed or
//           conflicted, the final reply is {"ok": false, "error": ...,
//           "errno": "EIO", "result": {...report...}}: the report says which.
// A connection may carry several requests, one after the other. A framing
// error (oversized packet, truncated fragments) gets an error reply and the
// connection is closed; a malformed request gets an error reply and the
// connection stays usable.
//
// How the CLI finds the socket: getxattr(<any path in the mount>,
// kControlXattr) answers the socket's absolute path. The daemon serves that
// attribute itself for every inode, so the path alone is enough.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "deferfs/reports.h"

namespace deferfs {

namespace wire {
class UniqueFd;
}

inline constexpr int kProtocolVersion = 1;
inline constexpr size_t kMaxPacketBytes = 64 << 10;   // one packet on the socket
inline constexpr size_t kMaxMessageBytes = 1 << 20;   // one request, all fragments
inline constexpr size_t kMaxReplyBytes = 256 << 20;   // one reply, all fragments
inline constexpr const char* kControlXattr = "user.deferfs.control";

struct ControlRequest {
  std::string op;
  std::vector<std::string> paths;
  bool force = false;
  bool discard = false;
};

// Thrown by parse_request for any malformed message; what() names the cause.
struct ProtocolError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Parses and validates one request message (size, UTF-8, JSON, nesting
// depth, types, version, known op, known fields, paths relative, without
// NUL and without ".." components). Paths come back normalized: empty and
// "." components dropped, so "a//b/./c/" is "a/b/c" and "." is "" (the
// whole mount). Pure function: the fuzz target calls it directly.
ControlRequest parse_request(const std::string& packet);

// What the daemon does for each op. Implemented by the daemon core; every
// call comes from a ControlServer client thread while FUSE threads run.
// The server runs at most one of sync, discard and umount at a time; status
// and stats may run concurrently with each other and with those. An
// exception thrown by a call becomes an error reply (std::system_error
// carries its errno, std::invalid_argument is EINVAL, anything else EIO);
// it never reaches the server's threads. Must not destroy the ControlServer.
// Who is at the other end of a control connection (SO_PEERCRED).
struct PeerCredentials {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
};

class ControlHandler {
 public:
  virtual ~ControlHandler() = default;
  using Progress = std::function<void(uint64_t done, uint64_t total)>;
  virtual SyncReport sync(const std::vector<std::string>& paths, bool force,
                          const Progress& progress) = 0;
  virtual StatusReport status(const std::vector<std::string>& paths) = 0;
  virtual DiscardReport discard(const std::vector<std::string>& paths) = 0;
  virtual StatsReport stats() = 0;
  // Sync everything (or discard if `discard`), then unmount. Returns the sync
  // report; if it is not ok() the mount stays up and nothing is lost.
  virtual SyncReport umount(bool discard) = 0;
  // A view of the file at `path` (spec 9) for `peer`: checks that the peer
  // may read it and takes over the connection `conn` (closing it when the
  // view ends). Throws (std::system_error with EACCES, ENOENT, ...) without
  // taking it: the error is replied and the connection closed. The default
  // has no views (ENOTSUP).
  virtual void view(const std::string& path, const PeerCredentials& peer, int conn);
};

// The daemon's listening socket, the thread that accepts on it, and one
// thread per connected client (at most kMaxClients at once; more get an
// EBUSY error reply). A client that stalls mid-message or sends nothing is
// dropped after kIoTimeoutMs so it cannot hold a slot; a client that does not
// read its replies is dropped after the same time. No exception escapes the
// threads: bad input gets an error reply and the server keeps serving.
class ControlServer {
 public:
  static constexpr size_t kMaxClients = 16;
  static constexpr int kIoTimeoutMs = 5000;
  // With every slot taken, how long a new client waits for one to free.
  static constexpr int kFullWaitMs = 200;

  // Creates `socket_path` (removing a stale socket there; refusing if a live
  // daemon answers on it or something else than a socket is there). Mode
  // 0600 would lock out root-less helpers, so access is checked with
  // SO_PEERCRED against `owner_uid` (and uid 0). Throws std::system_error
  // naming the path. `handler` must outlive the server.
  ControlServer(std::string socket_path, uid_t owner_uid, ControlHandler& handler);
  // Stops (see stop()), joins every thread (waiting for handler calls in
  // progress to return), closes and unlinks the socket. Must not be called
  // from inside a handler call.
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // Starts the accepting thread. Call once; later calls do nothing. Call it
  // after daemonizing: threads do not survive fork() (fuse_daemonize).
  void start();
  // Stops accepting and asks every client thread to finish after its
  // current request. Does not wait; thread-safe; idempotent.
  void stop();
  const std::string& path() const { return path_; }

 private:
  struct Worker {
    std::thread thread;
    std::atomic<bool> done{false};
    bool owner = false;  // the mounting user or root
  };
  // Clients other than the owner (view requests) take at most this many
  // slots, so they can never lock the owner out.
  static constexpr size_t kMaxOtherClients = kMaxClients / 2;

  void run() noexcept;                     // the accepting thread
  void accept_one();                       // accepting thread only
  void reap_workers(bool all);             // accepting thread (or destructor after it)
  // Client thread; owns and closes fd (unless a view takes it over).
  void serve_client(int fd, const PeerCredentials& peer) noexcept;
  // One reply; throws only bad_alloc. `close`: end the connection after it.
  // A view request may take `conn` (it is then released, -1).
  std::string handle(const std::string& message, wire::UniqueFd& conn, const PeerCredentials& peer, bool& close);

  // Constant after construction.
  const std::string path_;
  const uid_t owner_uid_;
  ControlHandler& handler_;
  int listen_fd_ = -1;
  int stop_pipe_[2] = {-1, -1};  // a byte in it (never read) means "stop"
  // A descriptor held in reserve (of /dev/null), touched only by the
  // accepting thread: when the daemon runs out of descriptors (every inode
  // the kernel knows holds one), it is given up so that a client waiting to
  // be accepted (umount, status) is still served instead of hanging in the
  // listen queue; taken again at the next accept.
  int reserve_fd_ = -1;

  std::thread thread_;                 // the accepting thread; set by start()
  std::atomic<bool> started_{false};
  std::atomic<bool> stopping_{false};
  std::list<Worker> workers_;          // touched only by the accepting thread,
                                       // and by the destructor once it is joined
  std::mutex op_mutex_;                // serializes sync, discard and umount
  // A client thread that finished says so here: with every slot taken, the
  // accepting thread waits a moment for one whose client just hung up.
  std::mutex finished_mutex_;
  std::condition_variable finished_cv_;
};

// Thrown by control_call when it cannot connect to the socket at all (no
// socket, connection refused, permission denied): the daemon is not reachable.
struct ControlConnectError : std::system_error {
  using std::system_error::system_error;
};

// Client side, used by the CLI: connects, sends `req`, calls `on_progress`
// for each progress reply, and returns the final reply object (which has a
// boolean "ok"). Waits for the final reply of sync and umount without a
// time limit, at most a minute for the other ops. Throws ControlConnectError
// (connect), std::system_error (send/recv; messages name the socket) or ProtocolError
// (bad or missing reply, or a request too large to send).
nlohmann::json control_call(const std::string& socket_path, const ControlRequest& req,
                            const std::function<void(uint64_t, uint64_t)>& on_progress = {});

}  // namespace deferfs
