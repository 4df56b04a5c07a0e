// Filling a segment while views map it (spec 9). A view's mapping shows a
// page of the segment as soon as the page exists; a read(2) into the
// daemon's mapping makes the page exist (zeros) before it copies into it, so
// a view could see it half filled. pwrite(2) into the segment's fd creates
// each page locked and unlocks it once written: a view sees it whole or not
// at all. Used by File's loader while File::views > 0.
#pragma once

#include <sys/types.h>

#include <cstdint>

namespace deferfs {

class Source;

// Reads [off, off+len) of `src` (or of the file `fd`) and pwrites it at the
// same offset of the segment `segment_fd`, through a bounce buffer. Returns
// the bytes read (short only at the end of the source) or -errno.
ssize_t read_for_views(Source& src, int segment_fd, uint64_t off, uint64_t len);
ssize_t read_for_views(int fd, int segment_fd, uint64_t off, uint64_t len);

}  // namespace deferfs
