// The views' protocol (spec 9), between View (view.cc, in libdeferfs) and
// the daemon's ViewServer (view_server.cc), and the userfaultfd definitions
// both need. Internal: not installed.
//
// On a control connection (control.h), after
//   C: {"version": 1, "op": "view", "paths": ["rel/path"]}
// the daemon either replies an error (EACCES, ENOENT, EISDIR, ...; no
// descriptor, the connection is closed) or
//   D: {"ok": true, "result": {"size": N, "page_size": P}}  + the segment, read-only
// The client maps the segment PROT_READ, MAP_PRIVATE, registers the mapping
// with a userfaultfd (UFFD_USER_MODE_ONLY, missing faults) and sends
//   C: {"op": "map", "addr": A, "len": L}  + the userfaultfd
//   D: {"ok": true}
// From then on the daemon serves the mapping's faults: a fault at A + off
// loads the file's page holding `off` into the segment and wakes the faulting
// thread (UFFDIO_WAKE), or poisons the page (UFFDIO_POISON: SIGBUS) when it
// cannot be served. The connection then carries, one at a time:
//   C: {"op": "load", "off": O, "len": N}   D: {"ok": true} or an error with "errno"
//   C: {"op": "size"}                        D: {"ok": true, "result": {"size": N}}
//   C: {"op": "map", "addr": A, "len": L}    D: {"ok": true}  (a new mapping, registered
//                                               on the same userfaultfd; it replaces the old)
// The view ends when the client closes the connection (or dies). Anything
// else gets an error reply and ends the view.
#pragma once

#include <linux/userfaultfd.h>
#include <sys/ioctl.h>

#include <cstdint>

#ifndef UFFDIO_POISON
// Kernel 6.6+; Debian 12's header (Linux 6.1) lacks it.
struct uffdio_poison {
  struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1 << 0)
  __u64 mode;
  __s64 updated;
};
#define _UFFDIO_POISON (0x08)
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif

namespace deferfs {

// Faults are resolved per system page; the file's pages may be larger.
inline constexpr uint64_t kViewSysPage = 4096;
// The longest a view's mapping may be (the daemon refuses more): 1 PiB.
inline constexpr uint64_t kViewMaxLen = uint64_t{1} << 50;

}  // namespace deferfs
