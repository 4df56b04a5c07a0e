// libdeferfs: the client library of deferfs (installed).
//
// - The control operations of spec 2 (status, sync, discard, stats) on the
//   mount that holds a path; the `deferfs` CLI is built on them.
// - Views (spec 9): View::open(path) maps a regular file of a deferfs mount
//   read-only, as the mount shows it (staged writes included). Resident pages
//   are plain memory; touching an absent page has the daemon load it; a page
//   that cannot be served (a conflict, a source error) raises SIGBUS in the
//   touching thread, where View::read() returns -EIO instead.
//
// Errors are ClientError: what() names the path and the cause, err() is the
// errno, status() the CLI's exit status (1 failed, 2 bad usage).
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "deferfs/control.h"

namespace deferfs {

class ClientError : public std::runtime_error {
 public:
  ClientError(int status, const std::string& message, int err = 0)
      : std::runtime_error(message), status_(status), err_(err) {}
  int status() const { return status_; }
  int err() const { return err_; }
  // For code written against the CLI's old error type.
  int status_code() const { return status_; }

 private:
  int status_;
  int err_;
};

// ---- Finding a mount ---------------------------------------------------------

struct MountEntry {
  long id = 0;
  std::string mountpoint;
  std::string fstype;
};

// The mounts of /proc/self/mountinfo. Throws ClientError.
std::vector<MountEntry> read_mountinfo();

// The deferfs mount that `paths` are on (all on one), its control socket,
// and the paths relative to the mount root. Throws ClientError: status 2
// for a path that does not exist or is not on a deferfs mount.
struct Target {
  MountEntry mount;
  std::string socket;
  std::vector<std::string> paths;     // as given
  std::vector<std::string> relative;  // relative to the mount root
};
Target find_target(const std::vector<std::string>& paths);

// A mount-relative path as the user can use it: absolute.
std::string display_path(const Target& t, const std::string& rel);

// ---- Control operations --------------------------------------------------------

using ProgressFn = std::function<void(uint64_t done, uint64_t total)>;

// One request to the daemon of `t`; waits for a slot while the daemon is
// busy (EBUSY). Returns the final reply ({"ok": ..., "result": ...}).
// Throws ClientError when the daemon cannot be reached or answers nonsense.
nlohmann::json call_daemon(const Target& t, const ControlRequest& req, const ProgressFn& on_progress = {});

// Throws ClientError for a failure reply that carries no report (the op did
// not run): status 2 for EINVAL, else 1.
void check_reply(const nlohmann::json& reply, const Target& t, const std::string& op);

// What an operation answered: `reply` is the final reply, `result` its
// report (spec 2.1 fields). ok() is false when some files failed or
// conflicted (the report says which).
struct ControlResult {
  Target target;
  nlohmann::json reply;
  bool ok() const { return reply.value("ok", false); }
  const nlohmann::json& result() const { return reply.at("result"); }
};

// The operations of spec 2 on the mount holding `paths` (empty: the current
// directory). Each throws ClientError when it could not run at all.
ControlResult status(const std::vector<std::string>& paths);
ControlResult sync(const std::vector<std::string>& paths, bool force = false, const ProgressFn& on_progress = {});
ControlResult discard(const std::vector<std::string>& paths);
ControlResult stats(const std::string& path = ".");

// ---- Views -----------------------------------------------------------------------

class View {
 public:
  // A view of the regular file `path` on a deferfs mount. Throws ClientError
  // (err(): EACCES when the caller may not read the file, ENOENT, EISDIR,
  // EINVAL when not on a deferfs mount, ...).
  static View open(const std::string& path);

  View(View&&) noexcept;
  View& operator=(View&&) noexcept;
  ~View();
  View(const View&) = delete;
  View& operator=(const View&) = delete;

  // The file's bytes, [0, size()). Touching past size() but inside its last
  // page reads zeros; further is outside the mapping. A page that cannot be
  // served raises SIGBUS (as a mapped file truncated underneath does), and
  // keeps doing so in this mapping until refresh().
  const std::byte* data() const;
  std::span<const std::byte> bytes() const { return {data(), static_cast<size_t>(size())}; }
  uint64_t size() const;

  // Copies up to `len` bytes at `off` into `buf` without ever raising a
  // signal. Returns the byte count (short at the end of the file) or -errno
  // (-EIO for a page that cannot be served).
  ssize_t read(uint64_t off, size_t len, void* buf) const;

  // Follows a size change of the file: maps it anew at its current size.
  // data() may move. Returns 0 or -errno.
  int refresh();

  const std::string& path() const;

 private:
  struct State;
  explicit View(std::unique_ptr<State> s);
  static View open_view(const std::string& path);
  std::unique_ptr<State> s_;
};

}  // namespace deferfs
