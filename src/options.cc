// The mount command line and its -o options (spec 2 and 3).
#include "deferfs/options.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <string_view>

namespace deferfs {

namespace {

constexpr uint64_t kMinPageSize = 4096;
constexpr uint64_t kMaxPageSize = 2 << 20;

// Options of later work: rejected, never accepted and ignored.
// Options of later work, rejected rather than ignored (none at the moment).
constexpr std::string_view kNotYet[] = {""};

// Standard mount and FUSE options without a value, passed to libfuse.
constexpr std::string_view kFuseFlags[] = {
    "rw",        "dev",        "nodev",       "suid",          "nosuid",        "exec",
    "noexec",    "atime",      "noatime",     "relatime",      "norelatime",    "strictatime",
    "nostrictatime", "sync",   "async",       "dirsync",       "lazytime",      "nolazytime",
    "allow_other", "allow_root", "default_permissions", "auto_unmount", "blkdev"};

// Standard FUSE options with a text value, passed to libfuse.
constexpr std::string_view kFuseTextOptions[] = {"fsname", "subtype"};

// Standard FUSE options with a numeric value, passed to libfuse as a plain number.
constexpr std::string_view kFuseSizeOptions[] = {"max_read", "blksize"};

// Options that mount(8) and fstab add for themselves: accepted and dropped.
constexpr std::string_view kDropped[] = {"defaults", "user", "nouser", "users", "auto", "noauto", "_netdev",
                                         "nofail"};

template <size_t N>
bool one_of(std::string_view name, const std::string_view (&list)[N]) {
  for (std::string_view item : list) {
    if (item == name) return true;
  }
  return false;
}

bool is_dropped(std::string_view name, bool has_value) {
  if (name.starts_with("x-") || name == "comment") return true;
  // mount(8) rewrites "user" as "user=NAME" when a user mounts an fstab entry.
  if (name == "user") return true;
  return !has_value && one_of(name, kDropped);
}

// A size suffix's multiplier, or 0 if `suffix` is not one.
uint64_t size_multiplier(std::string_view suffix) {
  // Strip a trailing "iB" or "B": "4KiB", "4kB", "4096B".
  if (suffix.ends_with("iB")) {
    suffix.remove_suffix(2);
    if (suffix.empty()) return 0;  // "4iB"
  } else if (suffix.ends_with("B")) {
    suffix.remove_suffix(1);
  }
  if (suffix.empty()) return 1;
  if (suffix.size() != 1) return 0;
  switch (suffix[0]) {
    case 'k':
    case 'K':
      return uint64_t{1} << 10;
    case 'm':
    case 'M':
      return uint64_t{1} << 20;
    case 'g':
    case 'G':
      return uint64_t{1} << 30;
    default:
      return 0;
  }
}

bool is_power_of_two(uint64_t n) { return n != 0 && (n & (n - 1)) == 0; }

struct NameValue {
  std::string name;
  std::string value;
  bool has_value = false;
};

NameValue split_option(const std::string& item) {
  NameValue nv;
  const size_t eq = item.find('=');
  nv.name = item.substr(0, eq);
  if (eq != std::string::npos) {
    nv.value = item.substr(eq + 1);
    nv.has_value = true;
  }
  return nv;
}

void require_value(const NameValue& nv) {
  if (!nv.has_value || nv.value.empty()) {
    throw UsageError("option '" + nv.name + "' needs a value (" + nv.name + "=...)");
  }
}

void forbid_value(const NameValue& nv) {
  if (nv.has_value) throw UsageError("option '" + nv.name + "' takes no value (got '" + nv.name + "=" + nv.value + "')");
}

void set_page_size(MountOptions& mo, const NameValue& nv) {
  require_value(nv);
  const uint64_t size = parse_size(nv.value, "page_size");
  if (!is_power_of_two(size) || size < kMinPageSize || size > kMaxPageSize) {
    throw UsageError("option 'page_size=" + nv.value + "': the page size must be a power of two from 4k to 2M");
  }
  mo.page_size = size;
}

void set_fsync(MountOptions& mo, const NameValue& nv) {
  require_value(nv);
  if (nv.value == "commit") {
    mo.fsync = FsyncMode::Commit;
  } else if (nv.value == "stage") {
    mo.fsync = FsyncMode::Stage;
  } else {
    throw UsageError("option 'fsync=" + nv.value + "': expected fsync=commit or fsync=stage");
  }
}

// Makes a relative path absolute against the current directory (the daemon
// chdirs to / later). Does not require the path to exist.
std::string absolute(const std::string& path) {
  if (path.starts_with("/")) return path;
  char* cwd = ::getcwd(nullptr, 0);
  if (!cwd) throw UsageError("'" + path + "': cannot find the current directory: " + std::strerror(errno));
  std::string out = cwd;
  std::free(cwd);
  return out == "/" ? "/" + path : out + "/" + path;
}

void set_state_dir(MountOptions& mo, const NameValue& nv) {
  require_value(nv);
  mo.state_dir = absolute(nv.value);
}

bool apply_fuse_option(MountOptions& mo, const NameValue& nv, const std::string& item) {
  if (one_of(nv.name, kFuseFlags)) {
    forbid_value(nv);
    if (nv.name == "allow_other") mo.allow_other = true;
    if (nv.name == "default_permissions") mo.default_permissions = true;
    if (nv.name == "rw") mo.read_only = false;
    mo.fuse_options.push_back(item);
    return true;
  }
  if (one_of(nv.name, kFuseTextOptions)) {
    require_value(nv);
    mo.fuse_options.push_back(item);
    return true;
  }
  if (one_of(nv.name, kFuseSizeOptions)) {
    require_value(nv);
    const uint64_t n = parse_size(nv.value, nv.name);
    if (n == 0 || n > UINT32_MAX) throw UsageError("option '" + item + "': out of range");
    mo.fuse_options.push_back(nv.name + "=" + std::to_string(n));
    return true;
  }
  return false;
}

// Applies one item of a -o list.
void apply_option(MountOptions& mo, const std::string& item) {
  const NameValue nv = split_option(item);
  if (one_of(nv.name, kNotYet)) throw UsageError("option '" + nv.name + "' is not supported yet");
  if (nv.name == "page_size") return set_page_size(mo, nv);
  if (nv.name == "readahead") {
    require_value(nv);
    const uint64_t n = parse_size(nv.value, nv.name);
    if (n > (uint64_t{64} << 20)) throw UsageError("option '" + item + "': at most 64M");
    mo.readahead = n;
    return;
  }
  if (nv.name == "snapshot") {
    require_value(nv);
    if (nv.value == "auto") mo.snapshot = SnapshotMode::Auto;
    else if (nv.value == "reflink") mo.snapshot = SnapshotMode::Reflink;
    else if (nv.value == "guard") mo.snapshot = SnapshotMode::Guard;
    else throw UsageError("option 'snapshot=" + nv.value + "': must be auto, reflink or guard");
    return;
  }
  if (nv.name == "transport") {
    require_value(nv);
    if (nv.value == "auto") mo.transport = TransportMode::Auto;
    else if (nv.value == "uring") mo.transport = TransportMode::Uring;
    else if (nv.value == "dev") mo.transport = TransportMode::Dev;
    else throw UsageError("option 'transport=" + nv.value + "': must be auto, uring or dev");
    return;
  }
  if (nv.name == "cache_size" || nv.name == "dirty_limit") {
    require_value(nv);
    const uint64_t n = parse_size(nv.value, nv.name);
    // Below a few pages no workload can make progress.
    if (n < (uint64_t{1} << 20))
      throw UsageError("option '" + item + "': must be at least 1M");
    (nv.name == "cache_size" ? mo.cache_size : mo.dirty_limit) = n;
    return;
  }
  if (nv.name == "fsync") return set_fsync(mo, nv);
  if (nv.name == "state_dir") return set_state_dir(mo, nv);
  if (nv.name == "ro") {
    forbid_value(nv);
    mo.read_only = true;
    mo.fuse_options.push_back("ro");  // the kernel mount is read-only too
    return;
  }
  if (apply_fuse_option(mo, nv, item)) return;
  if (is_dropped(nv.name, nv.has_value)) return;
  throw UsageError("unknown option '" + nv.name + "'");
}

// Applies a comma-separated -o list; empty items ("a,,b", a trailing ",") are skipped.
void apply_option_list(MountOptions& mo, const std::string& list) {
  size_t start = 0;
  while (start <= list.size()) {
    size_t end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    const std::string item = list.substr(start, end - start);
    if (!item.empty()) apply_option(mo, item);
    start = end + 1;
  }
}

// Resolves `path` (SOURCE or MOUNTPOINT, named by `role`) to an absolute
// path of an existing directory.
std::string resolve_directory(const std::string& path, const char* role) {
  if (path.empty()) throw UsageError(std::string(role) + " is an empty path");
  char* real = ::realpath(path.c_str(), nullptr);
  if (!real) {
    const int err = errno;
    if (err == ENOENT) throw UsageError(std::string(role) + " '" + path + "' does not exist");
    throw UsageError(std::string(role) + " '" + path + "': " + std::strerror(err));
  }
  std::string resolved = real;
  std::free(real);
  struct stat st;
  if (::stat(resolved.c_str(), &st) != 0) {
    throw UsageError(std::string(role) + " '" + path + "': " + std::strerror(errno));
  }
  if (!S_ISDIR(st.st_mode)) throw UsageError(std::string(role) + " '" + path + "' is not a directory");
  return resolved;
}

}  // namespace

uint64_t parse_size(const std::string& text, const std::string& what) {
  auto bad = [&](const char* why) {
    return UsageError(what + ": '" + text + "' " + why +
                      " (expected a number with an optional k, M or G suffix, such as 4096, 64k or 2M)");
  };
  size_t digits = 0;
  uint64_t n = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') {
    const uint64_t d = static_cast<uint64_t>(text[digits] - '0');
    if (n > (UINT64_MAX - d) / 10) throw bad("is too large");
    n = n * 10 + d;
    ++digits;
  }
  if (digits == 0) throw bad("is not a size");
  const uint64_t mult = size_multiplier(std::string_view(text).substr(digits));
  if (mult == 0) throw bad("has an unknown suffix");
  if (n > UINT64_MAX / mult) throw bad("is too large");
  return n * mult;
}

MountOptions parse_mount_args(const std::vector<std::string>& args) {
  MountOptions mo;
  std::vector<std::string> positional;
  bool options_done = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (options_done || arg.size() < 2 || arg[0] != '-') {
      positional.push_back(arg);
    } else if (arg == "--") {
      options_done = true;
    } else if (arg == "-o") {
      if (i + 1 >= args.size()) throw UsageError("-o needs an argument (-o OPT[,OPT...])");
      apply_option_list(mo, args[++i]);
    } else if (arg.starts_with("-o")) {
      apply_option_list(mo, arg.substr(2));
    } else if (arg == "-f") {
      mo.foreground = true;
    } else if (arg == "-d") {
      mo.debug = true;
      mo.foreground = true;
    } else if (arg == "-h" || arg == "--help") {
      // Handled by main before we get here.
    } else {
      throw UsageError("unknown flag '" + arg + "'");
    }
  }
  if (positional.empty()) throw UsageError("missing SOURCE and MOUNTPOINT");
  if (positional.size() == 1) throw UsageError("missing MOUNTPOINT (after SOURCE '" + positional[0] + "')");
  if (positional.size() > 2) throw UsageError("unexpected argument '" + positional[2] + "' after MOUNTPOINT");
  mo.source = resolve_directory(positional[0], "SOURCE");
  mo.mountpoint = resolve_directory(positional[1], "MOUNTPOINT");
  if (mo.state_dir.empty()) mo.state_dir = default_state_dir();
  return mo;
}

std::string default_state_dir() {
  const char* xdg = std::getenv("XDG_RUNTIME_DIR");
  struct stat st;
  if (xdg && xdg[0] == '/' && ::stat(xdg, &st) == 0 && S_ISDIR(st.st_mode)) {
    return std::string(xdg) + "/deferfs";
  }
  return "/run/deferfs";
}

}  // namespace deferfs

namespace deferfs {

void resolve_memory_defaults(MountOptions& mo) {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page = ::sysconf(_SC_PAGESIZE);
  const uint64_t ram = pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page)
                                             : uint64_t{1} << 30;
  if (mo.cache_size == 0) mo.cache_size = ram / 2;
  if (mo.dirty_limit == 0) mo.dirty_limit = ram / 4;
}

}  // namespace deferfs
