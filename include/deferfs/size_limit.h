// The largest file the source filesystem accepts (issue 16.2): a truncate or
// write through the mount beyond it fails with EFBIG, as on the source, before
// anything is staged.
#pragma once

#include <cstdint>

namespace deferfs {

// Probes the filesystem of directory `dir_fd` (the source's .deferfs) with
// ftruncate on an unnamed file (O_TMPFILE; a named one removed at once
// where that is not supported): a binary search for the largest size it
// accepts (ext4 with 4 KiB blocks: 16 TiB - 4 KiB). No limit is known (the
// largest off_t is returned) if dir_fd < 0 or the probe cannot run.
uint64_t probe_max_file_size(int dir_fd);

}  // namespace deferfs
