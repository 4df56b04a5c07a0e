// Mount command line and -o options (spec 2 and 3).
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace deferfs {

enum class FsyncMode { Commit, Stage };
// How a snapshot is protected from changes made outside the mount (spec 5.2).
enum class SnapshotMode { Auto, Reflink, Guard };
// How FUSE requests reach the daemon (spec 3): io_uring per CPU, /dev/fuse,
// or the first where the kernel allows it (transport.h).
enum class TransportMode { Auto, Uring, Dev };

struct MountOptions {
  std::string source;       // absolute, resolved before the mount (fuse_daemonize chdirs to /)
  std::string mountpoint;   // absolute
  bool foreground = false;  // -f
  bool debug = false;       // -d (implies -f)
  uint64_t page_size = 4096;
  FsyncMode fsync = FsyncMode::Commit;
  SnapshotMode snapshot = SnapshotMode::Auto;
  TransportMode transport = TransportMode::Auto;
  // Largest readahead window of the loader on sequential access (0: none).
  uint64_t readahead = uint64_t{1} << 20;
  bool read_only = false;
  // Memory limits (spec 3, 7.2); 0 until resolved: half of RAM and a quarter
  // of RAM by default (resolve_memory_defaults).
  uint64_t cache_size = 0;
  uint64_t dirty_limit = 0;
  std::string state_dir;    // default: $XDG_RUNTIME_DIR/deferfs or /run/deferfs
  bool allow_other = false;
  bool default_permissions = false;
  // Options passed to libfuse untouched (allow_other, fsname=..., rw, nosuid, ...),
  // each "name" or "name=value".
  std::vector<std::string> fuse_options;
};

// Thrown for every bad invocation; what() names the option or path and the
// cause. The mount command prints it and exits 2 before mounting anything.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// "4096", "4k", "64M", "2G" (also K/m/g, and a trailing "iB"/"B"). Throws
// UsageError naming `what` on anything else or on overflow.
uint64_t parse_size(const std::string& text, const std::string& what);

// Parses argv of the mount form (after "deferfs" and an optional "mount"):
// SOURCE MOUNTPOINT [-o OPTS]... [-f] [-d], options anywhere. Checks that
// SOURCE and MOUNTPOINT exist and are directories and resolves them.
// Every option of spec 3 is implemented.
MountOptions parse_mount_args(const std::vector<std::string>& args);

std::string default_state_dir();

// Fills cache_size / dirty_limit left at 0 with their defaults (half and a
// quarter of physical memory).
void resolve_memory_defaults(MountOptions& mo);

}  // namespace deferfs
