// Creating as the caller (spec 8.1): with allow_other on a mount made by
// root, a file, directory, node or symlink that a user creates through the
// mount must belong to that user, with the group and the permission checks
// of that user, exactly as on a local filesystem.
//
// The daemon serves every request from a pool of threads that all run as
// root. For the few operations that create a name, the serving thread
// switches its own filesystem credentials (fsuid, fsgid and supplementary
// groups) to the requester's, does the system call, and switches back.
//
// Only the calling thread changes: the raw syscalls SYS_setfsuid,
// SYS_setfsgid and SYS_setgroups act on one task, whereas glibc's wrappers
// (setgroups, setfsuid on some versions) broadcast the change to every
// thread of the process, which would let one request's identity leak into
// requests served concurrently by other threads.
//
// While switched, the thread has lost root's filesystem capabilities
// (CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_CHOWN, CAP_MKNOD, ...: the kernel drops
// them from the effective set when fsuid leaves 0 and gives them back when it
// returns to 0), so the daemon's own bookkeeping opens (the snapshot's fd via
// /proc/self/fd, spill files, ...) must run after restore(), as root.
#pragma once

#include <sys/types.h>

#include <fuse_lowlevel.h>

#include <vector>

namespace deferfs {

// RAII: switches the calling thread to the credentials of the requester of
// `req` for its lifetime (or until restore()). A no-op when the daemon does
// not run as root (it could not switch, and every file it creates is its
// user's anyway, as with sshfs). Not copyable, not movable: it must be
// destroyed on the thread that made it, before that thread serves another
// request.
//
// If the requester's supplementary groups cannot be read (the process has
// already exited, or lives in another pid namespace), the thread runs with
// the requester's uid and gid and no supplementary groups: never with more
// rights than the requester, possibly with fewer. If the switch itself fails
// (the daemon lacks CAP_SETUID/CAP_SETGID, e.g. in a restricted container),
// the thread stays as it was and switched() is false; a log line says so once.
// A failure to switch back is fatal (the process aborts with a log line): a
// thread must never go on serving requests with a user's identity.
class CallerCredentials {
 public:
  explicit CallerCredentials(fuse_req_t req);
  ~CallerCredentials() { restore(); }
  CallerCredentials(const CallerCredentials&) = delete;
  CallerCredentials& operator=(const CallerCredentials&) = delete;

  // Returns the thread to the daemon's own credentials now. Idempotent; the
  // destructor calls it too.
  void restore();

  // True while the thread runs with credentials changed for the requester
  // (a root requester of the daemon's own gid needs no change: false).
  bool switched() const { return switched_ != Switch::None; }

 private:
  // What was changed: nothing; the fsgid alone (a root requester: its
  // capabilities pass every check, its groups decide nothing); or fsuid,
  // fsgid and the supplementary groups.
  enum class Switch { None, Gid, All };
  Switch switched_ = Switch::None;
  uid_t saved_fsuid_ = 0;  // the daemon's own (read once per process)
  gid_t saved_fsgid_ = 0;
};

}  // namespace deferfs
