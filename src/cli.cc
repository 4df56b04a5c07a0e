// The `deferfs` subcommands that talk to a running daemon (spec 2): argument
// parsing, finding the mount and its control socket from a path, the call,
// and human or JSON output.
#include "deferfs/cli.h"
#include "deferfs/orphans.h"

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

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "deferfs/client.h"
#include "deferfs/control.h"
#include "deferfs/reports.h"

namespace deferfs {

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr auto kUmountWait = std::chrono::seconds(60);
constexpr auto kProgressDelay = std::chrono::seconds(1);
constexpr auto kProgressRedraw = std::chrono::milliseconds(100);

// A failure that ends the command: `message` goes to stderr after
// "deferfs: ", status() is the exit status (1 failed, 2 bad usage). The
// client library (client.h) throws the same type.
using CliError = ClientError;

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

// The subcommands and their flags, parsed by CLI11. CLI11's own help and
// messages are off: usage errors name the subcommand and the option as
// deferfs always has ("sync: unknown option '--bogus'"), help is
// print_usage. "--" ends the flags; what follows it is a PATH.
CliArgs parse_cli_args(const std::vector<std::string>& args) {
  CliArgs a;
  CLI::App app{"deferfs"};
  app.set_help_flag();
  app.require_subcommand(1);
  for (const char* name : {"sync", "status", "discard", "stats", "umount"}) {
    const std::string c = name;
    CLI::App* sub = app.add_subcommand(c);
    sub->set_help_flag();
    sub->add_flag("-h,--help", a.help);
    if (c != "umount") sub->add_flag("--json", a.json);
    if (c == "sync") sub->add_flag("--force", a.force);
    if (c == "umount") sub->add_flag("--discard", a.discard);
    sub->add_option("PATH", a.paths);
    sub->allow_extras();  // unknown options are reported below, by name
  }
  std::vector<std::string> reversed(args.rbegin(), args.rend());  // CLI11 takes them last first
  try {
    app.parse(reversed);
  } catch (const CLI::ParseError& e) {
    throw usage_error(args.at(0) + ": " + e.what());
  }
  const CLI::App* sub = app.get_subcommands().front();
  a.command = sub->get_name();
  for (const std::string& extra : sub->remaining()) {
    if (extra != "--" && extra.size() > 1 && extra[0] == '-')
      throw usage_error(a.command + ": unknown option '" + extra + "'");
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
void report_failed(const Target& t, const std::vector<FileError>& failed, const char* consequence) {
  for (const FileError& f : failed) {
    std::fprintf(stderr, "deferfs: %s: %s; %s\n", display_path(t, f.path).c_str(), f.error.c_str(), consequence);
  }
}

void print_status(const Target& t, const StatusReport& r) {
  print_orphans_note(r.orphans);
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
  ControlResult c;
  {
    ProgressLine progress;
    c = deferfs::sync(a.paths, a.force, [&progress](uint64_t done, uint64_t total) { progress.update(done, total); });
  }
  const Target& t = c.target;
  json& reply = c.reply;
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
  const ControlResult c = deferfs::status(a.paths);
  const Target& t = c.target;
  const json& reply = c.reply;
  const auto r = report_of<StatusReport>(reply, t);
  if (a.json) {
    print_json(reply["result"]);
  } else {
    print_status(t, r);
  }
  return reply["ok"].get<bool>() ? 0 : 1;
}

int run_discard(const CliArgs& a) {
  const ControlResult c = deferfs::discard(a.paths);
  const Target& t = c.target;
  const json& reply = c.reply;
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
  const ControlResult c = deferfs::stats(a.paths.front());
  const Target& t = c.target;
  const json& reply = c.reply;
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
    return e.status();
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
    return e.status();
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
      "  deferfs orphans [--json] [--remove NAME|--remove-all] DIR  staged data whose file is gone\n"
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
