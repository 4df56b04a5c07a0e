// The Daemon's control operations (the ControlHandler the control socket
// calls): sync, status, discard, stats, umount, and the final sync at exit.
#include "deferfs/daemon.h"

#include <spawn.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <unordered_set>

#include "deferfs/log.h"
#include "deferfs/transport.h"

extern char** environ;

namespace deferfs {

namespace {

uint64_t rss_bytes() {
  std::ifstream statm("/proc/self/statm");
  uint64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

}  // namespace

std::vector<CommitTarget> Daemon::targets(const std::vector<std::string>& paths, bool staged_only) {
  std::vector<CommitTarget> out;
  for (const auto& inode : inodes_.with_files()) {
    std::shared_ptr<File> file;
    {
      MutexLock lk(inode->m);
      file = inode->file;
    }
    if (!file || (staged_only && !file->has_staged_now())) continue;
    std::string rel = rel_path(*inode);
    if (!matches(rel, paths)) continue;
    file->set_name(rel);
    out.push_back({file, rel});
  }
  std::sort(out.begin(), out.end(),
            [](const CommitTarget& a, const CommitTarget& b) { return a.path < b.path; });
  return out;
}

SyncReport Daemon::sync(const std::vector<std::string>& paths, bool force, const Progress& progress) {
  flush_kernel_writes();  // what was written through a mapping is committed too
  std::vector<CommitTarget> committed = targets(paths, true);
  std::unordered_set<const File*> touched;
  for (const CommitTarget& t : committed) touched.insert(t.file.get());
  SyncReport r = committer_.commit(committed, force, progress);
  for (const auto& inode : inodes_.with_files()) {
    std::shared_ptr<File> file;
    {
      MutexLock lk(inode->m);
      file = inode->file;
    }
    if (!file) continue;
    if (file->take_stale_kernel_cache()) {
      // Its base changed under the kernel's cache (committed over an outside
      // change, or re-snapshotted): drop its pages before returning.
      refresh_kernel_view(*inode);
    } else if (touched.count(file.get())) {
      // Committed: stat now shows the source's own times, which the kernel
      // may hold cached from the staged view (regular files' attributes are
      // cached for a second).
      invalidate_attributes(*inode);
    }
  }
  for (const auto& inode : inodes_.with_files()) inodes_.prune(*inode);
  return r;
}

StatusReport Daemon::status(const std::vector<std::string>& paths) {
  flush_kernel_writes();  // pages written through a mapping are staged too
  StatusReport r;
  const uint64_t ps = opts_.page_size;
  for (const CommitTarget& t : targets(paths, true)) {
    // Pages written back to their old bytes are not staged (spec 6.1).
    if (!t.file->has_staged()) continue;
    t.file->revalidate();  // status says what conflicts now (spec 2)
    File::Info i = t.file->info();
    StatusEntry e;
    e.path = t.path;
    e.size = i.size;
    e.dirty_pages = i.dirty_pages;
    e.dirty_bytes = i.dirty_pages * ps;
    e.state = i.conflict ? FileState::Conflict : FileState::Staged;
    r.dirty_pages += e.dirty_pages;
    r.dirty_bytes += e.dirty_bytes;
    r.files.push_back(std::move(e));
  }
  r.orphans = orphans();
  return r;
}

DiscardReport Daemon::discard(const std::vector<std::string>& paths) {
  DiscardReport r;
  // One still in flight would stage its page again after the discard.
  flush_kernel_writes();
  for (const auto& inode : inodes_.with_files()) {
    std::shared_ptr<File> file;
    {
      MutexLock lk(inode->m);
      file = inode->file;
    }
    if (!file || !file->has_staged()) continue;
    if (!matches(rel_path(*inode), paths)) continue;
    // Dirty pages the kernel still holds (mmap writes) are written back when
    // its cache is invalidated: let that happen first, so they are dropped
    // with the rest instead of staged again after the discard.
    invalidate_now(*inode);
    r.pages_dropped += file->discard();
    ++r.files;
    // The kernel's cached pages and size show staged bytes: drop them before
    // the command returns (this is the control thread, not a FUSE request).
    refresh_kernel_view(*inode);
    file->take_stale_kernel_cache();
    inodes_.prune(*inode);
  }
  return r;
}

StatsReport Daemon::stats() {
  StatsReport s;
  s.page_size = opts_.page_size;
  for (const auto& inode : inodes_.with_files()) {
    std::shared_ptr<File> file;
    {
      MutexLock lk(inode->m);
      file = inode->file;
    }
    if (!file) continue;
    file->settle_pending();  // dirty_pages counts no page equal to the snapshot (spec 6.1)
    File::Info i = file->info();
    ++s.snapshots;
    s.files_open += static_cast<uint64_t>(std::max(0, file->handles.load()));
    s.materialized_bytes += i.resident_bytes;
    s.dirty_pages += i.dirty_pages;
    s.dirty_bytes += i.dirty_pages * opts_.page_size;
  }
  for (const auto& file : kept_.files()) {
    ++s.snapshots;
    ++s.snapshots_kept;
    s.materialized_bytes += file->info().resident_bytes;
  }
  s.loaded_bytes = counters_.loaded_bytes.load();
  s.skipped_pages = counters_.skipped_pages.load();
  s.synced_bytes = counters_.synced_bytes.load();
  s.evicted_bytes = counters_.evicted_bytes.load();
  s.cache_limit_bytes = cache_.cache_limit();
  s.dirty_limit_bytes = cache_.dirty_limit();
  s.spilled_bytes = static_cast<uint64_t>(std::max<int64_t>(0, counters_.spilled_bytes.load()));
  s.spilled_total_bytes = counters_.spilled_total_bytes.load();
  s.daemon_rss_bytes = rss_bytes();
  s.pid = getpid();
  s.source = opts_.source;
  s.mountpoint = opts_.mountpoint;
  const Transport* tr = transport_.load();
  TransportInfo t = tr ? tr->info() : TransportInfo{"dev", "", {}};
  s.transport = t.name;
  s.transport_reason = t.reason;
  s.transport_queue_requests = t.queue_requests;
  s.transport_sched_raised = t.sched_raised;
  return s;
}

int Daemon::unmount_now() {
  if (umount2(opts_.mountpoint.c_str(), 0) == 0) return 0;
  if (errno != EPERM) return -errno;
  // Not root: the setuid helper does it.
  pid_t pid;
  const char* argv[] = {"fusermount3", "-u", "-q", opts_.mountpoint.c_str(), nullptr};
  int rc = posix_spawnp(&pid, "fusermount3", nullptr, nullptr, const_cast<char**>(argv), environ);
  if (rc != 0) return -rc;
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -EBUSY;
}

SyncReport Daemon::umount(bool discard_staged) {
  SyncReport r;
  if (discard_staged) {
    discard({});
    discard_on_exit_ = true;
  } else {
    r = sync({}, false, {});
    if (!r.ok()) return r;  // nothing is lost: the mount stays
  }
  if (int rc = unmount_now(); rc < 0) {
    r.failed.push_back({"", std::string("cannot unmount ") + opts_.mountpoint + ": " + std::strerror(-rc)});
    discard_on_exit_ = false;
  }
  return r;
}

void Daemon::final_sync() {
  if (discard_on_exit_) return;
  SyncReport r = committer_.commit(targets({}, true), false, {});
  if (r.files) log_info("synced %llu files at exit", static_cast<unsigned long long>(r.files));
  for (const auto& c : r.conflicts)
    log_error("%s: staged changes NOT committed at exit: conflict with an outside change", c.c_str());
  for (const auto& f : r.failed)
    log_error("%s: staged changes NOT committed at exit: %s; they are kept for the next mount of %s",
              f.path.c_str(), f.error.c_str(), opts_.source.c_str());
}


}  // namespace deferfs
