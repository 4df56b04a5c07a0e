// The libfuse low-level handlers: thin. Each turns one request into calls on
// the Daemon, the InodeTable and File, and sends exactly one reply. No
// exception crosses into libfuse; page logic lives in File, not here.
#pragma once

#include <fuse_lowlevel.h>

namespace deferfs {

// The handler table; the session's userdata must be the Daemon.
fuse_lowlevel_ops make_fuse_ops();

}  // namespace deferfs
