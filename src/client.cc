// libdeferfs: finding the mount of a path and the control operations
// (client.h). The CLI (cli.cc) prints what these return.
#include "deferfs/client.h"

#include <sys/xattr.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string_view>
#include <thread>

#include "deferfs/control_wire.h"
#include "deferfs/reports.h"

namespace deferfs {

namespace {

using nlohmann::json;
using CliError = ClientError;

constexpr const char* kFsType = "fuse.deferfs";

CliError usage_error(const std::string& message, int err = EINVAL) { return CliError(2, message, err); }

// --- Finding the mount ---------------------------------------------------------

// Undoes the octal escapes of /proc/self/mountinfo ("\040" for a space).
std::string unescape_mountinfo(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      const std::string_view oct = s.substr(i + 1, 3);
      if (oct.find_first_not_of("01234567") == std::string_view::npos) {
        out += static_cast<char>((oct[0] - '0') * 64 + (oct[1] - '0') * 8 + (oct[2] - '0'));
        i += 3;
        continue;
      }
    }
    out += s[i];
  }
  return out;
}

std::vector<std::string_view> split_spaces(std::string_view line) {
  std::vector<std::string_view> fields;
  size_t start = 0;
  while (start < line.size()) {
    size_t end = line.find(' ', start);
    if (end == std::string_view::npos) end = line.size();
    if (end > start) fields.push_back(line.substr(start, end - start));
    start = end + 1;
  }
  return fields;
}

// One line: "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS".
bool parse_mountinfo_line(std::string_view line, MountEntry& e) {
  const std::vector<std::string_view> f = split_spaces(line);
  if (f.size() < 7) return false;
  size_t sep = 6;
  while (sep < f.size() && f[sep] != "-") ++sep;
  if (sep + 1 >= f.size()) return false;
  e.id = std::strtol(std::string(f[0]).c_str(), nullptr, 10);
  e.mountpoint = unescape_mountinfo(f[4]);
  e.fstype = unescape_mountinfo(f[sep + 1]);
  return true;
}

bool path_is_under(const std::string& path, const std::string& dir) {
  if (dir == "/") return true;
  return path == dir || (path.starts_with(dir) && path[dir.size()] == '/');
}

// The mount that `path` (absolute, resolved) is on: the longest mount point
// that contains it, the last one listed if several are stacked there.
MountEntry mount_of(const std::string& path, const std::vector<MountEntry>& mounts) {
  const MountEntry* best = nullptr;
  for (const MountEntry& m : mounts) {
    if (path_is_under(path, m.mountpoint) && (!best || m.mountpoint.size() >= best->mountpoint.size())) {
      best = &m;
    }
  }
  if (!best) throw CliError(1, path + ": no mount contains it in /proc/self/mountinfo");
  return *best;
}

std::string resolve_path(const std::string& path) {
  char* real = ::realpath(path.c_str(), nullptr);
  if (!real) {
    const int err = errno;
    if (err == ENOENT || err == ENOTDIR) throw usage_error(path + ": no such file or directory", ENOENT);
    if (err == ENOTCONN) {
      throw CliError(1, path + ": " + std::strerror(err) + " (the daemon is gone; fusermount3 -u cleans up)", err);
    }
    throw CliError(1, path + ": " + std::strerror(err), err);
  }
  std::string out = real;
  std::free(real);
  return out;
}

// `path` relative to `mountpoint` ("" for the mount point itself).
std::string relative_to(const std::string& path, const std::string& mountpoint) {
  if (path == mountpoint) return "";
  return path.substr(mountpoint == "/" ? 1 : mountpoint.size() + 1);
}

// The control socket's path, as the daemon answers it on its mount point.
std::string control_socket(const std::string& mountpoint) {
  char buf[4096];
  const ssize_t n = ::getxattr(mountpoint.c_str(), kControlXattr, buf, sizeof buf);
  if (n < 0) {
    const int err = errno;
    if (err == EACCES || err == EPERM) {
      throw CliError(1, mountpoint + ": permission denied reading the control address (" + kControlXattr +
                            "); only the user who mounted and root may control this mount", err);
    }
    throw CliError(1, mountpoint + ": cannot read the control address (" + kControlXattr + "): " +
                          std::strerror(err), err);
  }
  std::string socket(buf, static_cast<size_t>(n));
  while (!socket.empty() && socket.back() == '\0') socket.pop_back();
  if (socket.empty()) throw CliError(1, mountpoint + ": the daemon answered an empty control address");
  return socket;
}

void check_sendable(const std::string& given, const std::string& rel) {
  try {
    (void)json(rel).dump();
  } catch (const json::exception&) {
    throw usage_error(given + ": the name is not valid UTF-8, which the control protocol cannot carry; "
                              "name a directory above it");
  }
}

}  // namespace

std::vector<MountEntry> read_mountinfo() {
  std::ifstream in("/proc/self/mountinfo");
  if (!in) throw CliError(1, std::string("/proc/self/mountinfo: ") + std::strerror(errno));
  std::vector<MountEntry> mounts;
  std::string line;
  while (std::getline(in, line)) {
    MountEntry e;
    if (parse_mountinfo_line(line, e)) mounts.push_back(std::move(e));
  }
  return mounts;
}

Target find_target(const std::vector<std::string>& paths) {
  const std::vector<MountEntry> mounts = read_mountinfo();
  Target t;
  for (const std::string& given : paths) {
    const std::string real = resolve_path(given);
    const MountEntry m = mount_of(real, mounts);
    if (m.fstype != kFsType) throw usage_error(given + ": not on a deferfs mount");
    if (t.paths.empty()) {
      t.mount = m;
    } else if (m.id != t.mount.id) {
      throw usage_error(given + ": on the deferfs mount " + m.mountpoint + ", not on " + t.mount.mountpoint +
                        " like " + t.paths.front() + "; run one command per mount");
    }
    t.paths.push_back(given);
    t.relative.push_back(relative_to(real, m.mountpoint));
    check_sendable(given, t.relative.back());
  }
  t.socket = control_socket(t.mount.mountpoint);
  return t;
}

std::string display_path(const Target& t, const std::string& rel) {
  const std::string& mp = t.mount.mountpoint;
  if (rel.empty()) return mp;
  return mp == "/" ? "/" + rel : mp + "/" + rel;
}

json call_daemon(const Target& t, const ControlRequest& req, const ProgressFn& on_progress) {
  const std::string& mp = t.mount.mountpoint;
  try {
    // A daemon serving its maximum of clients answers EBUSY without running
    // anything: wait for a slot (up to about 10 s) as a user would.
    for (int attempt = 0;; ++attempt) {
      json reply = control_call(t.socket, req, on_progress);
      const bool busy = !reply.value("ok", false) && reply.value("errno", std::string()) == "EBUSY" &&
                        !reply.contains("result");
      if (!busy || attempt >= 50) return reply;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  } catch (const ControlConnectError& e) {
    throw CliError(1, "cannot reach the daemon of " + mp + " at " + t.socket + ": " + e.code().message(),
                   e.code().value());
  } catch (const std::system_error& e) {
    throw CliError(1, mp + ": " + e.what(), e.code().value());
  } catch (const ProtocolError& e) {
    throw CliError(1, mp + ": " + e.what(), EPROTO);
  }
}

// Throws for a failure reply that carries no report (the op did not run).
void check_reply(const json& reply, const Target& t, const std::string& op) {
  if (reply.at("ok").get<bool>() || reply.contains("result")) return;
  const json& error = reply.value("error", json());
  const json& err_name = reply.value("errno", json());
  const std::string message = error.is_string() ? error.get<std::string>() : "unknown error";
  const bool usage = err_name.is_string() && err_name.get<std::string>() == "EINVAL";
  throw CliError(usage ? 2 : 1, t.mount.mountpoint + ": " + op + ": " + message,
                 err_name.is_string() ? wire::errno_of_name(err_name.get<std::string>()) : EIO);
}

namespace {

ControlResult run_op(const std::string& op, const std::vector<std::string>& given, bool force,
                     const ProgressFn& on_progress) {
  ControlResult r;
  r.target = find_target(given.empty() ? std::vector<std::string>{"."} : given);
  ControlRequest req;
  req.op = op;
  if (op != "stats") req.paths = r.target.relative;
  req.force = force;
  r.reply = call_daemon(r.target, req, on_progress);
  check_reply(r.reply, r.target, op);
  if (!r.reply.contains("result") || !r.reply["result"].is_object()) {
    throw ClientError(1, r.target.mount.mountpoint + ": bad reply from the daemon: no report", EPROTO);
  }
  return r;
}

}  // namespace

ControlResult status(const std::vector<std::string>& paths) { return run_op("status", paths, false, {}); }
ControlResult sync(const std::vector<std::string>& paths, bool force, const ProgressFn& on_progress) {
  return run_op("sync", paths, force, on_progress);
}
ControlResult discard(const std::vector<std::string>& paths) { return run_op("discard", paths, false, {}); }
ControlResult stats(const std::string& path) { return run_op("stats", {path}, false, {}); }

}  // namespace deferfs
