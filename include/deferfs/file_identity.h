// Who a file is, beyond its inode number (issue 16): staged data attaches
// only to the very file it was staged for.
//
// An inode number is reused as soon as a file is deleted; a source root made
// again at the same path is another directory. The identity adds what reuse
// changes: the inode's generation (FS_IOC_GETVERSION: ext4, XFS, btrfs) and
// its birth time (statx STX_BTIME: nanoseconds, also tmpfs), where the
// filesystem has them, and a file handle (name_to_handle_at) by which a file
// renamed while no daemon ran is found again (open_by_handle_at, which fails
// for a reused inode of the same number). Plain data: it is stored as is in
// the persisted metadata (persist.h).
#pragma once

#include <cstdint>
#include <string>

namespace deferfs {

struct FileIdentity {
  uint64_t dev = 0, ino = 0;
  uint64_t generation = 0;
  int64_t btime_sec = 0;
  uint32_t btime_nsec = 0;
  uint32_t flags = 0;  // kHasGeneration | kHasBtime | kHasHandle
  uint32_t handle_bytes = 0;
  int32_t handle_type = 0;
  unsigned char handle[128] = {};

  static constexpr uint32_t kHasGeneration = 1, kHasBtime = 2, kHasHandle = 4;
};
static_assert(sizeof(FileIdentity) == 176, "stored in the persisted header");

// Takes the identity of the open file `fd` (any open mode, O_PATH included
// for what the filesystem allows). 0 or -errno (fstat failed).
int take_identity(int fd, FileIdentity& out);

// The result of comparing a recorded identity with a file found now.
enum class Sameness {
  Same,      // inode number and every mark both sides know agree
  Other,     // another file: number differs, or a generation or birth time does
  Unproven,  // same number, but neither side-by-side mark is known: cannot tell
};
// `dev` is compared only when `compare_dev` (a distributed filesystem's
// clients show one file under different device numbers).
Sameness compare_identity(const FileIdentity& recorded, const FileIdentity& now, bool compare_dev = true);

// Human text for a log or a manifest: "dev 8:0 ino 12 generation 3 born 1700000000.5".
std::string describe_identity(const FileIdentity& id);

// Finds the file `id` names by its handle, below the directory `root_fd`
// (whose absolute path is `root_path`): its path relative to the root, or ""
// if it is gone, its inode was reused, it is outside the root, or handles
// are not available (no handle recorded, no CAP_DAC_READ_SEARCH, a
// filesystem without them).
std::string find_by_handle(int root_fd, const std::string& root_path, const FileIdentity& id);

}  // namespace deferfs
