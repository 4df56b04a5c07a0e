// Per-thread switch to the requester's filesystem credentials (see
// caller_creds.h). Raw syscalls only: glibc's setgroups() and friends change
// every thread of the process (nptl's setxid broadcast).
#include "deferfs/caller_creds.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "deferfs/log.h"

namespace deferfs {

namespace {

// 32-bit ids: on i386 and arm the plain numbers are the legacy 16-bit calls.
#ifdef SYS_setfsuid32
constexpr long kSetfsuid = SYS_setfsuid32;
constexpr long kSetfsgid = SYS_setfsgid32;
constexpr long kSetgroups = SYS_setgroups32;
constexpr long kGetgroups = SYS_getgroups32;
#else
constexpr long kSetfsuid = SYS_setfsuid;
constexpr long kSetfsgid = SYS_setfsgid;
constexpr long kSetgroups = SYS_setgroups;
constexpr long kGetgroups = SYS_getgroups;
#endif

constexpr uid_t kQueryId = static_cast<uid_t>(-1);  // an invalid id: changes nothing, answers the current one

// setfsuid/setfsgid always return the previous id and never an error; the
// only way to know whether a change took is to ask again with an invalid id.
bool set_fsuid(uid_t uid) {
  (void)syscall(kSetfsuid, uid);
  return static_cast<uid_t>(syscall(kSetfsuid, kQueryId)) == uid;
}

bool set_fsgid(gid_t gid) {
  (void)syscall(kSetfsgid, gid);
  return static_cast<gid_t>(syscall(kSetfsgid, static_cast<gid_t>(kQueryId))) == gid;
}

bool set_groups(const std::vector<gid_t>& groups) {
  return syscall(kSetgroups, groups.size(), groups.empty() ? nullptr : groups.data()) == 0;
}

bool get_groups(std::vector<gid_t>& out) {
  for (int attempt = 0; attempt < 4; ++attempt) {
    const long n = syscall(kGetgroups, 0, nullptr);
    if (n < 0) return false;
    out.resize(static_cast<size_t>(n));
    const long got = syscall(kGetgroups, n, out.empty() ? nullptr : out.data());
    if (got >= 0) {
      out.resize(static_cast<size_t>(got));
      return true;
    }
    if (errno != EINVAL) return false;  // EINVAL: the list grew in between
  }
  return false;
}

// The requester's supplementary groups, from /proc/<tid>/task/<tid>/status
// (libfuse). False (and `groups` empty) if they cannot be read.
bool requester_groups(fuse_req_t req, std::vector<gid_t>& groups) {
  groups.resize(32);
  for (int attempt = 0; attempt < 3; ++attempt) {
    const int n = fuse_req_getgroups(req, static_cast<int>(groups.size()), groups.data());
    if (n < 0) break;
    if (static_cast<size_t>(n) <= groups.size()) {
      groups.resize(static_cast<size_t>(n));
      return true;
    }
    groups.resize(static_cast<size_t>(n));  // too small: n is the count needed
  }
  groups.clear();
  return false;
}

// The daemon's own filesystem credentials, read once: every thread has them
// whenever it is not switched (nothing else in the daemon changes them).
struct DaemonCredentials {
  bool root = false;
  bool ok = false;  // the groups could be read
  uid_t fsuid = 0;
  gid_t fsgid = 0;
  std::vector<gid_t> groups;
};

const DaemonCredentials& daemon_credentials() {
  static const DaemonCredentials creds = [] {
    DaemonCredentials c;
    c.root = geteuid() == 0;
    c.fsuid = static_cast<uid_t>(syscall(kSetfsuid, kQueryId));
    c.fsgid = static_cast<gid_t>(syscall(kSetfsgid, static_cast<gid_t>(kQueryId)));
    c.ok = get_groups(c.groups);
    return c;
  }();
  return creds;
}

std::atomic<bool> warned_switch{false};
std::atomic<bool> warned_groups{false};

}  // namespace

CallerCredentials::CallerCredentials(fuse_req_t req) {
  const DaemonCredentials& own = daemon_credentials();
  if (!own.root) return;
  const fuse_ctx* ctx = fuse_req_ctx(req);
  if (!ctx) return;
  saved_fsuid_ = own.fsuid;
  saved_fsgid_ = own.fsgid;

  if (ctx->uid == 0 && own.fsuid == 0) {
    // A root caller: with fsuid 0 its capabilities pass every permission
    // check, so its supplementary groups decide nothing; only the group of
    // what it creates follows its gid. No /proc read, no groups switched.
    if (ctx->gid == own.fsgid) return;
    if (!set_fsgid(ctx->gid)) {
      if (!warned_switch.exchange(true))
        log_error("cannot switch to the caller's gid %u: creating files with gid %u", static_cast<unsigned>(ctx->gid),
                  static_cast<unsigned>(own.fsgid));
      set_fsgid(own.fsgid);
      return;
    }
    switched_ = Switch::Gid;
    return;
  }

  if (!own.ok) {
    if (!warned_switch.exchange(true)) {
      log_error("cannot read the daemon's supplementary groups: creating files as root, not as the caller");
    }
    return;
  }
  std::vector<gid_t> groups;
  if (!requester_groups(req, groups) && !warned_groups.exchange(true)) {
    log_info("cannot read the supplementary groups of pid %d (uid %u): creating without them",
             static_cast<int>(ctx->pid), static_cast<unsigned>(ctx->uid));
  }

  // Groups and gid first: setfsuid away from 0 drops the capabilities that
  // the others do not need, but the order keeps the window with a mixed
  // identity as small as it can be.
  if (!set_groups(groups)) {
    const int err = errno;
    if (!warned_switch.exchange(true)) {
      log_error("cannot switch to the caller's groups (%s): creating files as root, not as the caller",
                std::strerror(err));
    }
    return;  // nothing changed
  }
  switched_ = Switch::All;  // from here on restore() has something to undo
  if (!set_fsgid(ctx->gid) || !set_fsuid(ctx->uid)) {
    if (!warned_switch.exchange(true)) {
      log_error("cannot switch to the caller's uid %u gid %u: creating files as root, not as the caller",
                static_cast<unsigned>(ctx->uid), static_cast<unsigned>(ctx->gid));
    }
    restore();
  }
}

void CallerCredentials::restore() {
  if (switched_ == Switch::None) return;
  // fsuid first: back at 0, the thread has its filesystem capabilities again.
  const bool ok = switched_ == Switch::Gid
                      ? set_fsgid(saved_fsgid_)
                      : set_fsuid(saved_fsuid_) && set_fsgid(saved_fsgid_) && set_groups(daemon_credentials().groups);
  if (!ok) {
    log_error("cannot switch a thread back to the daemon's credentials (fsuid %u): aborting",
              static_cast<unsigned>(saved_fsuid_));
    std::abort();
  }
  switched_ = Switch::None;
}

}  // namespace deferfs
