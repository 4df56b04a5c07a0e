// run_daemon: sets up and runs one mount (options, state directory,
// recovery, the FUSE session and its loop, the exit sync).
#include "deferfs/daemon.h"

#include <fcntl.h>
#include <malloc.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "deferfs/fuse_ops.h"
#include "deferfs/instance.h"
#include "deferfs/log.h"
#include "deferfs/transport.h"

namespace deferfs {

namespace {

// The mount's readahead: the kernel offers FUSE 128 KiB; root may raise the
// mount's bdi to 1 MiB, which makes sequential READs 1 MiB long (8x fewer
// requests). Found through mountinfo (a stat of the mount point would be a
// request to ourselves). Best effort: not root, no change.
void raise_readahead(const std::string& mountpoint) {
  std::FILE* f = std::fopen("/proc/self/mountinfo", "r");
  if (!f) return;
  char line[4096];
  std::string dev;
  while (std::fgets(line, sizeof line, f)) {
    char id[32], parent[32], majmin[64], root[2048], mp[2048];
    if (std::sscanf(line, "%31s %31s %63s %2047s %2047s", id, parent, majmin, root, mp) == 5 && mountpoint == mp)
      dev = majmin;  // the last one is the topmost mount
  }
  std::fclose(f);
  if (dev.empty()) return;
  std::FILE* ra = std::fopen(("/sys/class/bdi/" + dev + "/read_ahead_kb").c_str(), "w");
  if (!ra) return;
  std::fputs("1024\n", ra);
  std::fclose(ra);
}

std::string escape_opt(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == ',' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

int make_state_dir(const std::string& dir) {
  std::string partial;
  for (size_t i = 1; i <= dir.size(); ++i) {
    if (i == dir.size() || dir[i] == '/') {
      partial = dir.substr(0, i);
      if (mkdir(partial.c_str(), 0755) < 0 && errno != EEXIST) return -errno;
    }
  }
  struct stat st;
  if (stat(dir.c_str(), &st) < 0) return -errno;
  return S_ISDIR(st.st_mode) ? 0 : -ENOTDIR;
}

// Every inode the kernel knows holds an O_PATH descriptor of its source (as
// in passthrough_hp), so a tree of tens of thousands of files needs as many:
// the soft limit on open files goes up to the hard one, and for root the hard
// one up to fs.nr_open. Where that is refused the old limits stay and a
// lookup beyond them fails with EMFILE (the control socket keeps a reserve).
void raise_open_file_limit() {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  rlim_t ceiling = rl.rlim_max;
  if (FILE* f = std::fopen("/proc/sys/fs/nr_open", "re")) {
    unsigned long long nr_open = 0;
    if (std::fscanf(f, "%llu", &nr_open) == 1 && nr_open > ceiling) ceiling = static_cast<rlim_t>(nr_open);
    std::fclose(f);
  }
  if (ceiling != rl.rlim_max) {
    const rlimit wider{ceiling, ceiling};
    if (setrlimit(RLIMIT_NOFILE, &wider) == 0) return;  // root (CAP_SYS_RESOURCE)
  }
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

}  // namespace

int run_daemon(const MountOptions& given) {
  MountOptions opts = given;
  if (opts.transport == TransportMode::Uring) {
    if (UringPolicy p = uring_policy(); !p.allowed) {
      std::fprintf(stderr, "deferfs: transport=uring: %s\n", p.why_not.c_str());
      return 2;
    }
  }
  raise_open_file_limit();  // before anything sizes itself by the limit (the snapshot cache)
  resolve_memory_defaults(opts);
  // Page-map tables come and go in sizes of megabytes: keep them in mmap'd
  // chunks that return to the system when freed (glibc's adaptive threshold
  // would move them into arenas that never shrink), and few arenas.
  mallopt(M_MMAP_THRESHOLD, 256 * 1024);
  mallopt(M_ARENA_MAX, 4);
  // Modes of created objects arrive with the caller's umask applied by the
  // kernel: the daemon's own must not mask them a second time.
  umask(0);
  // Open the source before the mount can hide it (deferfs DIR DIR).
  int root_fd = open(opts.source.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (root_fd < 0) {
    std::fprintf(stderr, "deferfs: %s: %s\n", opts.source.c_str(), std::strerror(errno));
    return 2;
  }
  if (int rc = make_state_dir(opts.state_dir); rc < 0) {
    std::fprintf(stderr, "deferfs: state_dir %s: %s\n", opts.state_dir.c_str(), std::strerror(-rc));
    close(root_fd);
    return 2;
  }

  std::vector<std::string> argv_s = {"deferfs"};
  // default_permissions always: the kernel enforces the source's modes and
  // owners (spec 8.1), also for other users under allow_other.
  std::string o = "fsname=" + escape_opt(opts.source) + ",subtype=deferfs,default_permissions";
  if (opts.read_only) o += ",ro";
  for (const std::string& f : opts.fuse_options) o += "," + f;
  argv_s.push_back("-o");
  argv_s.push_back(o);
  if (opts.debug) argv_s.push_back("-d");
  std::vector<char*> argv;
  for (auto& s : argv_s) argv.push_back(s.data());
  fuse_args args = FUSE_ARGS_INIT(static_cast<int>(argv.size()), argv.data());

  // The hidden state directory on the source (journal, spill files), and
  // whatever an interrupted sync left there: finished or dropped before
  // anything is served (spec 6.3).
  int state_fd = -1;
  if (!opts.read_only) {
    if (mkdirat(root_fd, ".deferfs", 0700) < 0 && errno != EEXIST)
      std::fprintf(stderr, "deferfs: %s/.deferfs: %s; sync will not be possible\n", opts.source.c_str(),
                   std::strerror(errno));
    state_fd = openat(root_fd, ".deferfs", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    // Trusted only if it is ours and nobody else can write in it: the
    // journal replayed at mount and the spill files live there.
    // Ours but open to others: close it to them (what others may have put
    // in it is checked file by file: journal and spill files must be ours).
    struct stat sst;
    if (state_fd >= 0 && fstat(state_fd, &sst) == 0 && sst.st_uid == geteuid() && (sst.st_mode & 077) != 0)
      fchmod(state_fd, 0700);
    if (state_fd >= 0 && (fstat(state_fd, &sst) < 0 || sst.st_uid != geteuid() || (sst.st_mode & 077) != 0)) {
      std::fprintf(stderr, "deferfs: %s/.deferfs: not owned by uid %u with mode 0700; not used "
                           "(sync and spill need it: remove it or fix its owner and mode)\n",
                   opts.source.c_str(), static_cast<unsigned>(geteuid()));
      close(state_fd);
      state_fd = -1;
    }
  }
  // This mount's identity (issue 13): its lock in .deferfs says it is alive.
  std::unique_ptr<Instance> instance;
  if (state_fd >= 0) {
    try {
      instance = Instance::create(state_fd, opts.mountpoint);
    } catch (const std::system_error& e) {
      std::fprintf(stderr, "deferfs: %s/.deferfs: %s; sync will not be possible\n", opts.source.c_str(),
                   e.what());
      close(state_fd);
      state_fd = -1;
    }
  }
  // Interrupted syncs of this source's dead instances (never a live one's).
  if (state_fd >= 0) Committer::recover_dead(root_fd, state_fd, instance->id(), true);
  // snapshot=auto picks reflink where the source filesystem can clone.
  bool reflink = false;
  if (opts.snapshot != SnapshotMode::Guard && state_fd >= 0) reflink = reflink_supported(state_fd);
  if (opts.snapshot == SnapshotMode::Reflink && !reflink) {
    if (opts.read_only)
      std::fprintf(stderr, "deferfs: snapshot=reflink: not with ro (the clones live in %s/.deferfs, "
                           "which a read-only mount does not write)\n", opts.source.c_str());
    else
      std::fprintf(stderr, "deferfs: snapshot=reflink: %s cannot clone files (FICLONE): use snapshot=guard or auto\n",
                   opts.source.c_str());
    if (state_fd >= 0) close(state_fd);
    close(root_fd);
    return 2;
  }
  Daemon daemon(opts, root_fd, state_fd, reflink, instance ? instance->id() : std::string());
  if (!opts.read_only) daemon.recover_persisted();
  const fuse_lowlevel_ops ops = make_fuse_ops();
  fuse_session* se = fuse_session_new(&args, &ops, sizeof ops, &daemon);
  if (!se) {
    std::fprintf(stderr, "deferfs: the FUSE options were refused (see the message above)\n");
    return 2;
  }
  daemon.set_session(se);
  int status = 1;
  std::unique_ptr<Transport> transport;
  if (fuse_set_signal_handlers(se) != 0) {
    fuse_session_destroy(se);
    return 1;
  }
  if (fuse_session_mount(se, opts.mountpoint.c_str()) != 0) {
    std::fprintf(stderr, "deferfs: cannot mount on %s\n", opts.mountpoint.c_str());
    fuse_remove_signal_handlers(se);
    fuse_session_destroy(se);
    return 1;
  }
  raise_readahead(opts.mountpoint);
  if (fuse_daemonize(opts.foreground || opts.debug) != 0) {
    fuse_session_unmount(se);
    fuse_remove_signal_handlers(se);
    fuse_session_destroy(se);
    return 1;
  }
  // The lock is the parent's until it exits: the daemon takes it over.
  if (instance)
    if (int rc = instance->relock_after_fork(); rc < 0)
      log_error("%s/.deferfs: cannot lock this mount's instance file: %s", opts.source.c_str(), std::strerror(-rc));
  log_to_syslog(!(opts.foreground || opts.debug));
  log_set_debug(opts.debug);
  try {
    daemon.start_threads();
    log_info("serving %s on %s (page size %llu, %s snapshots)", opts.source.c_str(), opts.mountpoint.c_str(),
             static_cast<unsigned long long>(opts.page_size), reflink ? "reflink" : "guarded");
    transport = std::make_unique<Transport>(se, opts.transport);
    daemon.set_transport(transport.get());
    status = transport->serve();
    // Unmounted (umount, fusermount3 -u) or signalled: commit what is staged.
    daemon.final_sync();
  } catch (const std::exception& e) {
    log_error("%s", e.what());
    status = 1;
  }
  daemon.stop_threads();
  fuse_session_unmount(se);
  fuse_remove_signal_handlers(se);
  daemon.set_session(nullptr);
  daemon.set_transport(nullptr);
  fuse_session_destroy(se);
  transport.reset();  // after the session: no hook runs any more
  fuse_opt_free_args(&args);
  return status;
}

}  // namespace deferfs
