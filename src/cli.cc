// The `deferfs` subcommands that talk to a running daemon (spec 2): argument
// parsing, finding the mount and its control socket from a path, the call,
// and human or JSON output.
#include "deferfs/cli.h"

#include <sys/xattr.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string_view>
#include <thread>

#include <nlohmann/json.hpp>

#include "deferfs/control.h"
#include "deferfs/reports.h"

namespace deferfs {

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr const char* kFsType = "fuse.deferfs";
constexpr auto kUmountWait = std::chrono::seconds(60);
constexpr auto kProgressDelay = std::chrono::seconds(1);
constexpr auto kProgressRedraw = std::chrono::milliseconds(100);

// A failure that ends the command: `message` goes to stderr after
// "deferfs: ", `status` is the exit status (1 failed, 2 bad usage).
struct CliError : std::runtime_error {
  CliError(int status, const std::string& message) : std::runtime_error(message), status(status) {}
  int status;
};

CliError usage_error(const std::string& message) { return CliError(2, message); }

// --- Arguments ---------------------------------------------------------------

struct CliArgs {
  std::string command;
  bool force = false;    // sync
  bool json = false;     // sync, status, discard, stats
  bool discard = false;  // umount
  bool help = false;
  std::vector<std::string> paths;
};

// Applies one flag of `a.command`; false if the command has no such flag.
bool apply_flag(CliArgs& a, const std::string& flag) {
  const std::string& c = a.command;
  if (flag == "-h" || flag == "--help") return a.help = true;
  if (flag == "--json" && c != "umount") return a.json = true;
  if (flag == "--force" && c == "sync") return a.force = true;
  if (flag == "--discard" && c == "umount") return a.discard = true;
  return false;
}

CliArgs parse_cli_args(const std::vector<std::string>& args) {
  CliArgs a;
  a.command = args.at(0);
  bool flags_done = false;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (!flags_done && arg == "--") {
      flags_done = true;
    } else if (!flags_done && arg.size() > 1 && arg[0] == '-') {
      if (!apply_flag(a, arg)) throw usage_error(a.command + ": unknown option '" + arg + "'");
    } else {
      a.paths.push_back(arg);
    }
  }
  if (a.help) return a;
  if (a.command == "stats" && a.paths.size() > 1) {
    throw usage_error("stats: takes at most one PATH, got " + std::to_string(a.paths.size()));
  }
  if (a.command == "umount" && a.paths.size() != 1) {
    throw usage_error(a.paths.empty() ? "umount: missing MOUNTPOINT"
                                      : "umount: takes one MOUNTPOINT, got " + std::to_string(a.paths.size()));
  }
  if (a.paths.empty()) a.paths.push_back(".");
  return a;
}

// --- Finding the mount ---------------------------------------------------------

struct MountEntry {
  long id = 0;
  std::string mountpoint;
  std::string fstype;
};

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
    if (err == ENOENT || err == ENOTDIR) throw usage_error(path + ": no such file or directory");
    if (err == ENOTCONN) {
      throw CliError(1, path + ": " + std::strerror(err) + " (the daemon is gone; fusermount3 -u cleans up)");
    }
    throw CliError(1, path + ": " + std::strerror(err));
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
                            "); only the user who mounted and root may control this mount");
    }
    throw CliError(1, mountpoint + ": cannot read the control address (" + kControlXattr + "): " +
                          std::strerror(err));
  }
  std::string socket(buf, static_cast<size_t>(n));
  while (!socket.empty() && socket.back() == '\0') socket.pop_back();
  if (socket.empty()) throw CliError(1, mountpoint + ": the daemon answered an empty control address");
  return socket;
}

// The mount that the command's PATHs are on, and the paths relative to it.
struct Target {
  MountEntry mount;
  std::string socket;
  std::vector<std::string> paths;     // as given on the command line
  std::vector<std::string> relative;  // relative to the mount root
};

void check_sendable(const std::string& given, const std::string& rel) {
  try {
    (void)json(rel).dump();
  } catch (const json::exception&) {
    throw usage_error(given + ": the name is not valid UTF-8, which the control protocol cannot carry; "
                              "name a directory above it");
  }
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

// --- Talking to the daemon --------------------------------------------------

// Shows sync progress as one updating line on stderr: only on a terminal and
// only once the sync has run for kProgressDelay.
class ProgressLine {
 public:
  ProgressLine() : enabled_(::isatty(STDERR_FILENO) == 1), start_(Clock::now()) {}
  ~ProgressLine() { clear(); }
  ProgressLine(const ProgressLine&) = delete;
  ProgressLine& operator=(const ProgressLine&) = delete;

  void update(uint64_t done, uint64_t total) {
    if (!enabled_) return;
    const auto now = Clock::now();
    if (now - start_ < kProgressDelay) return;
    if (drawn_ && now - last_ < kProgressRedraw && done < total) return;
    const unsigned pct = total ? static_cast<unsigned>(done * 100 / total) : 100;
    std::fprintf(stderr, "\r\033[Ksyncing: %llu of %llu (%u%%)", static_cast<unsigned long long>(done),
                 static_cast<unsigned long long>(total), pct);
    std::fflush(stderr);
    drawn_ = true;
    last_ = now;
  }

  void clear() {
    if (!drawn_) return;
    std::fputs("\r\033[K", stderr);
    std::fflush(stderr);
    drawn_ = false;
  }

 private:
  const bool enabled_;
  const Clock::time_point start_;
  Clock::time_point last_;
  bool drawn_ = false;
};

json call_daemon(const Target& t, const ControlRequest& req,
                 const std::function<void(uint64_t, uint64_t)>& on_progress = {}) {
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
    throw CliError(1, "cannot reach the daemon of " + mp + " at " + t.socket + ": " + e.code().message());
  } catch (const std::system_error& e) {
    throw CliError(1, mp + ": " + e.what());
  } catch (const ProtocolError& e) {
    throw CliError(1, mp + ": " + e.what());
  }
}

// Throws for a failure reply that carries no report (the op did not run).
void check_reply(const json& reply, const Target& t, const std::string& op) {
  if (reply.at("ok").get<bool>() || reply.contains("result")) return;
  const json& error = reply.value("error", json());
  const json& err_name = reply.value("errno", json());
  const std::string message = error.is_string() ? error.get<std::string>() : "unknown error";
  const bool usage = err_name.is_string() && err_name.get<std::string>() == "EINVAL";
  throw CliError(usage ? 2 : 1, t.mount.mountpoint + ": " + op + ": " + message);
}

// The reply's report, converted; a reply that does not fit is a failure.
template <typename Report>
Report report_of(const json& reply, const Target& t) {
  try {
    return reply.at("result").get<Report>();
  } catch (const json::exception& e) {
    throw CliError(1, t.mount.mountpoint + ": bad reply from the daemon: " + e.what());
  }
}

void print_json(const json& j) {
  std::fputs(j.dump(2, ' ', false, json::error_handler_t::replace).c_str(), stdout);
  std::fputc('\n', stdout);
}

// --- Human output ------------------------------------------------------------

std::string human_size(uint64_t bytes) {
  static const char* const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double v = static_cast<double>(bytes);
  size_t u = 0;
  while (v >= 1024 && u + 1 < std::size(units)) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  std::string s = buf;
  if (s.ends_with(".0")) s.resize(s.size() - 2);
  return s + " " + units[u];
}

std::string plural(uint64_t n, const char* one, const char* many) {
  return std::to_string(n) + " " + (n == 1 ? one : many);
}

// A mount-relative path as the user can use it: absolute.
std::string display_path(const Target& t, const std::string& rel) {
  const std::string& mp = t.mount.mountpoint;
  if (rel.empty()) return mp;
  return mp == "/" ? "/" + rel : mp + "/" + rel;
}

void report_failed(const Target& t, const std::vector<FileError>& failed, const char* consequence) {
  for (const FileError& f : failed) {
    std::fprintf(stderr, "deferfs: %s: %s; %s\n", display_path(t, f.path).c_str(), f.error.c_str(), consequence);
  }
}

void print_status(const Target& t, const StatusReport& r) {
  if (r.files.empty()) {
    std::puts("nothing staged");
    return;
  }
  struct Row {
    std::string path, size, dirty, state;
  };
  std::vector<Row> rows;
  size_t w_path = 0, w_size = 0, w_dirty = 0;
  for (const StatusEntry& e : r.files) {
    Row row{display_path(t, e.path), human_size(e.size),
            plural(e.dirty_pages, "dirty page", "dirty pages") + " (" + human_size(e.dirty_bytes) + ")",
            to_string(e.state)};
    w_path = std::max(w_path, row.path.size());
    w_size = std::max(w_size, row.size.size());
    w_dirty = std::max(w_dirty, row.dirty.size());
    rows.push_back(std::move(row));
  }
  for (const Row& row : rows) {
    std::printf("%-*s  %*s  %-*s  %s\n", static_cast<int>(w_path), row.path.c_str(), static_cast<int>(w_size),
                row.size.c_str(), static_cast<int>(w_dirty), row.dirty.c_str(), row.state.c_str());
  }
  std::printf("total: %s, %s (%s)\n", plural(r.files.size(), "file", "files").c_str(),
              plural(r.dirty_pages, "dirty page", "dirty pages").c_str(), human_size(r.dirty_bytes).c_str());
}

void print_sync(const Target& t, const SyncReport& r) {
  std::string bytes = plural(r.bytes_written, "byte", "bytes");
  if (r.bytes_written >= 1024) bytes += " (" + human_size(r.bytes_written) + ")";
  std::printf("synced %s: %s written, %llu skipped, %s\n", plural(r.files, "file", "files").c_str(),
              plural(r.pages_written, "page", "pages").c_str(), static_cast<unsigned long long>(r.pages_skipped),
              bytes.c_str());
  for (const std::string& path : r.conflicts) {
    std::fprintf(stderr,
                 "deferfs: %s: changed outside the mount since its snapshot; not synced, its changes stay staged "
                 "(sync --force writes them over it, discard drops them)\n",
                 display_path(t, path).c_str());
  }
  report_failed(t, r.failed, "not synced, its changes stay staged");
}

void print_stats(const StatsReport& r) {
  auto line = [](const char* name, const std::string& value) { std::printf("%s: %s\n", name, value.c_str()); };
  if (!r.mountpoint.empty()) line("mountpoint", r.mountpoint);
  if (!r.source.empty()) line("source", r.source);
  if (r.pid) line("pid", std::to_string(r.pid));
  line("page_size", human_size(r.page_size));
  line("files_open", std::to_string(r.files_open));
  line("snapshots", std::to_string(r.snapshots));
  line("snapshots_kept", std::to_string(r.snapshots_kept));
  line("materialized_bytes", human_size(r.materialized_bytes));
  line("loaded_bytes", human_size(r.loaded_bytes));
  line("dirty_pages", std::to_string(r.dirty_pages));
  line("dirty_bytes", human_size(r.dirty_bytes));
  line("skipped_pages", std::to_string(r.skipped_pages));
  line("synced_bytes", human_size(r.synced_bytes));
  line("evicted_bytes", human_size(r.evicted_bytes));
  line("cache_limit_bytes", r.cache_limit_bytes ? human_size(r.cache_limit_bytes) : "none");
  line("daemon_rss_bytes", human_size(r.daemon_rss_bytes));
  if (r.dirty_limit_bytes) line("dirty_limit_bytes", human_size(r.dirty_limit_bytes));
  line("spilled_bytes", human_size(r.spilled_bytes));
  line("spilled_total_bytes", human_size(r.spilled_total_bytes));
  if (!r.transport.empty()) {
    std::string t = r.transport;
    if (!r.transport_reason.empty()) t += " (" + r.transport_reason + ")";
    line("transport", t);
  }
  if (!r.transport_queue_requests.empty()) {
    std::string q;
    for (size_t i = 0; i < r.transport_queue_requests.size(); ++i)
      q += (i ? " " : "") + std::string("cpu") + std::to_string(i) + "=" + std::to_string(r.transport_queue_requests[i]);
    line("transport_requests", q);
  }
}

// --- Subcommands ---------------------------------------------------------------

ControlRequest request_for(const CliArgs& a, const Target& t) {
  ControlRequest req;
  req.op = a.command;
  if (a.command == "sync" || a.command == "status" || a.command == "discard") req.paths = t.relative;
  req.force = a.force;
  req.discard = a.discard;
  return req;
}

int run_sync(const CliArgs& a) {
  const Target t = find_target(a.paths);
  json reply;
  {
    ProgressLine progress;
    reply = call_daemon(t, request_for(a, t), [&progress](uint64_t done, uint64_t total) {
      progress.update(done, total);
    });
  }
  check_reply(reply, t, "sync");
  const auto r = report_of<SyncReport>(reply, t);
  if (a.json) {
    print_json(reply["result"]);
    for (const std::string& path : r.conflicts) {
      std::fprintf(stderr, "deferfs: %s: changed outside the mount since its snapshot; not synced\n",
                   display_path(t, path).c_str());
    }
    report_failed(t, r.failed, "not synced, its changes stay staged");
  } else {
    print_sync(t, r);
  }
  return r.ok() && reply["ok"].get<bool>() ? 0 : 1;
}

int run_status(const CliArgs& a) {
  const Target t = find_target(a.paths);
  const json reply = call_daemon(t, request_for(a, t));
  check_reply(reply, t, "status");
  const auto r = report_of<StatusReport>(reply, t);
  if (a.json) {
    print_json(reply["result"]);
  } else {
    print_status(t, r);
  }
  return reply["ok"].get<bool>() ? 0 : 1;
}

int run_discard(const CliArgs& a) {
  const Target t = find_target(a.paths);
  const json reply = call_daemon(t, request_for(a, t));
  check_reply(reply, t, "discard");
  const auto r = report_of<DiscardReport>(reply, t);
  if (a.json) {
    print_json(reply["result"]);
  } else if (r.files == 0 && r.failed.empty()) {
    std::puts("nothing to discard");
  } else {
    std::printf("discarded %s: %s dropped\n", plural(r.files, "file", "files").c_str(),
                plural(r.pages_dropped, "dirty page", "dirty pages").c_str());
  }
  report_failed(t, r.failed, "not discarded");
  return r.failed.empty() && reply["ok"].get<bool>() ? 0 : 1;
}

int run_stats(const CliArgs& a) {
  const Target t = find_target(a.paths);
  const json reply = call_daemon(t, request_for(a, t));
  check_reply(reply, t, "stats");
  const auto r = report_of<StatsReport>(reply, t);
  if (a.json) {
    print_json(reply["result"]);
  } else {
    print_stats(r);
  }
  return 0;
}

bool mount_present(long id) {
  for (const MountEntry& m : read_mountinfo()) {
    if (m.id == id) return true;
  }
  return false;
}

// True while `pid` runs; a zombie (exited, not yet reaped by its parent)
// has finished.
bool process_running(long pid) {
  std::FILE* f = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r");
  if (!f) return false;
  char buf[512];
  size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[n] = 0;
  const char* close_paren = std::strrchr(buf, ')');  // the command name may hold spaces
  return close_paren && close_paren[1] == ' ' && close_paren[2] != 'Z' && close_paren[2] != 'X';
}

int run_umount(const CliArgs& a) {
  const Target t = find_target(a.paths);
  const std::string& mp = t.mount.mountpoint;
  if (!t.relative.front().empty()) {
    throw usage_error(a.paths.front() + ": not a mount point; the deferfs mount is at " + mp);
  }
  (void)!::chdir("/");  // our own working directory must not keep the mount busy
  // The daemon's pid, to wait for its exit: the unmount is done when the
  // daemon has committed, freed its segments and gone.
  long daemon_pid = 0;
  try {
    ControlRequest st;
    st.op = "stats";
    st.paths = {""};
    const json sr = call_daemon(t, st);
    if (sr.value("ok", false)) daemon_pid = sr["result"].value("pid", 0L);
  } catch (const std::exception&) {
    // An old daemon without pid: wait for the mount only.
  }
  const json reply = call_daemon(t, request_for(a, t));
  check_reply(reply, t, "umount");
  if (!reply["ok"].get<bool>()) {
    const auto r = report_of<SyncReport>(reply, t);
    for (const std::string& path : r.conflicts) {
      std::fprintf(stderr, "deferfs: %s: changed outside the mount since its snapshot; not synced\n",
                   display_path(t, path).c_str());
    }
    report_failed(t, r.failed, "not synced");
    throw CliError(1, mp + ": not unmounted; every staged change is kept (fix the cause and retry, "
                           "or drop them with umount --discard)");
  }
  const auto deadline = Clock::now() + kUmountWait;
  while (mount_present(t.mount.id)) {
    if (Clock::now() >= deadline) {
      throw CliError(1, mp + ": the daemon agreed to unmount but the mount is still there after 60 s "
                             "(is it busy? see fuser -m " + mp + ")");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  while (daemon_pid > 0 && process_running(daemon_pid) && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  return 0;
}

int run_command(const CliArgs& a) {
  if (a.command == "sync") return run_sync(a);
  if (a.command == "status") return run_status(a);
  if (a.command == "discard") return run_discard(a);
  if (a.command == "stats") return run_stats(a);
  return run_umount(a);
}

}  // namespace

bool is_cli_command(const std::string& word) {
  return word == "sync" || word == "status" || word == "discard" || word == "stats" || word == "umount";
}

int cli_main(const std::vector<std::string>& args) {
  if (args.empty() || !is_cli_command(args[0])) {
    std::fprintf(stderr, "deferfs: unknown command '%s'\n", args.empty() ? "" : args[0].c_str());
    print_usage(stderr);
    return 2;
  }
  CliArgs a;
  try {
    a = parse_cli_args(args);
  } catch (const CliError& e) {
    std::fprintf(stderr, "deferfs: %s\nTry 'deferfs --help'.\n", e.what());
    return e.status;
  }
  if (a.help) {
    print_usage(stdout);
    return 0;
  }
  try {
    return run_command(a);
  } catch (const CliError& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "deferfs: %s\n", e.what());
    return e.status;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "deferfs: %s: %s\n", args[0].c_str(), e.what());
    return 1;
  }
}

void print_usage(std::FILE* out) {
  std::fputs(
      "Usage:\n"
      "  deferfs SOURCE MOUNTPOINT [-o OPT[,OPT...]] [-f] [-d]   mount SOURCE on MOUNTPOINT\n"
      "  deferfs mount SOURCE MOUNTPOINT [-o OPT[,OPT...]] [-f] [-d]\n"
      "  deferfs sync    [--force] [--json] [PATH...]   commit staged changes to the source\n"
      "  deferfs status  [--json] [PATH...]             show what is staged and what conflicts\n"
      "  deferfs discard [--json] [PATH...]             drop staged changes\n"
      "  deferfs stats   [--json] [PATH]                show the counters of the mount\n"
      "  deferfs umount  [--discard] MOUNTPOINT         sync (or discard), then unmount\n"
      "  deferfs --help                                 show this text\n"
      "\n"
      "Mounting: -f stays in the foreground, -d prints FUSE debugging (implies -f).\n"
      "Mount options (-o): page_size=N (4k..2M, a power of two), fsync=commit|stage,\n"
      "  cache_size=N (default half of RAM), dirty_limit=N (default a quarter of RAM),\n"
      "  snapshot=auto|reflink|guard (default auto),\n"
      "  ro, state_dir=DIR, allow_other, default_permissions and the usual FUSE and\n"
      "  mount options (fsname=, subtype=, max_read=, nosuid, nodev, noatime, ...).\n"
      "  Sizes accept k, M and G suffixes.\n"
      "\n"
      "PATH is the mount point or a file or directory inside it; without PATH, the\n"
      "current directory. --json prints one JSON object on stdout.\n"
      "Exit status: 0 success, 1 the operation failed, 2 bad usage.\n",
      out);
}

}  // namespace deferfs
