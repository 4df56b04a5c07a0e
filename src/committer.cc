#include "deferfs/committer.h"

#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <shared_mutex>

#include "deferfs/instance.h"
#include "deferfs/journal.h"
#include "deferfs/log.h"

namespace deferfs {

namespace {
constexpr uint64_t kBatchBytes = uint64_t{1} << 20;  // compare/write in 1 MiB runs
// Resident clean pages rechecked against the source after a commit (64 MiB
// of 4 KiB pages); beyond that the check is skipped (see LIMITS).
constexpr uint64_t kRecheckPages = 16384;

// Milliseconds between the phases of one sync, for its log line.
class PhaseClock {
 public:
  double lap() {
    const auto now = std::chrono::steady_clock::now();
    const double ms = std::chrono::duration<double, std::milli>(now - last_).count();
    last_ = now;
    return ms;
  }

 private:
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};
}

struct Committer::Job {
  const CommitTarget* target;
  std::unique_lock<Mutex> commit_lock;
  std::unique_lock<SharedMutex> gate;  // held from prepare to end_commit
  CommitPlan plan;
  bool forced = false;
  SourceIdentity ours;  // the source as our own last step left it
  CommitResult result;
};

// Applies the journal to the live files: each step checks that the source is
// still as our own last step left it (an outside writer does not take our
// io_gate), and takes its identity anew after each change.
//
// Page writes are gathered into batches (ascending, non-overlapping, up to
// kWriteBatchBytes) written by one Source::write_batch, straight from the
// replay's window of the journal (no copy); the check and the new identity
// then frame the whole batch. Every other step, and the window moving on
// (release), flushes the batch first, so the journal's order holds between
// kinds of steps.
class Committer::LiveTarget : public JournalTarget {
 public:
  explicit LiveTarget(std::vector<Job*> jobs) : jobs_(std::move(jobs)) {}
  int open(const std::string& path, dev_t, ino_t) override {
    if (int rc = flush(); rc < 0) return rc;
    cur_ = nullptr;
    for (Job* j : jobs_)
      if (j->target->path == path) cur_ = j;
    return cur_ ? 0 : -EINVAL;
  }
  int zero(uint64_t off, uint64_t len) override {
    if (int rc = flush(); rc < 0) return rc;
    return change([&] { return cur_->target->file->source().zero(off, len); });
  }
  int write(uint64_t off, const char* data, uint64_t len) override {
    // The data stays in the replay's window until release(): gathered as is.
    const bool ascending = batch_.empty() || off >= batch_.back().off + batch_.back().len;
    if (!ascending || batch_bytes_ + len > kWriteBatchBytes || batch_.size() >= kWriteBatchCount)
      if (int rc = flush(); rc < 0) return rc;
    batch_.push_back({data, static_cast<size_t>(len), off});
    batch_bytes_ += len;
    return 0;
  }
  int release() override { return flush(); }
  int finish(uint64_t final_size, const struct timespec* mtime) override {
    if (int rc = flush(); rc < 0) return rc;
    Source& src = cur_->target->file->source();
    if (final_size != cur_->ours.size)
      if (int rc = change([&] { return src.truncate(final_size); }); rc < 0) return rc;
    if (mtime)
      if (int rc = change([&] { return src.set_mtime(*mtime); }); rc < 0) return rc;
    PhaseClock fsync_clock;
    if (int rc = src.sync(); rc < 0) return rc;
    sync_ms += fsync_clock.lap();
    if (unchanged() == -ESTALE && (outside_seen.empty() || outside_seen.back() != cur_))
      outside_seen.push_back(cur_);
    return 0;
  }
  Job* failed() const { return cur_; }
  // Files where an outside change was seen while the decided sync was
  // applied: the replay went on (the journal decides), they get a new
  // snapshot afterwards.
  std::vector<Job*> outside_seen;
  double sync_ms = 0;  // spent in the files' fsyncs
  double write_ms = 0;  // spent in the batches of page writes

 private:
  int unchanged() {
    SourceIdentity now;
    if (int rc = cur_->target->file->source().identity(now); rc < 0) return rc;
    return now == cur_->ours ? 0 : -ESTALE;
  }
  // Writes the gathered page writes as one batch.
  int flush() {
    if (batch_.empty()) return 0;
    PhaseClock c;
    int rc = change([&] { return cur_->target->file->source().write_batch(batch_); });
    write_ms += c.lap();
    batch_.clear();
    batch_bytes_ = 0;
    return rc;
  }
  template <typename F>
  int change(F&& op) {
    if (int rc = unchanged(); rc == -ESTALE) {
      if (outside_seen.empty() || outside_seen.back() != cur_) outside_seen.push_back(cur_);
    } else if (rc < 0) {
      return rc;
    }
    // Even a failed step (a batch) may have changed the source: the identity
    // follows what our own writes left.
    const int rc = op();
    const int id = cur_->target->file->source().identity(cur_->ours);
    return rc < 0 ? rc : id;
  }
  static constexpr size_t kWriteBatchBytes = size_t{16} << 20;
  static constexpr size_t kWriteBatchCount = 1024;
  std::vector<Job*> jobs_;
  Job* cur_ = nullptr;
  std::vector<WriteRequest> batch_;  // gathered writes of cur_, pointing into the replay's window
  uint64_t batch_bytes_ = 0;
};

Committer::Committer(Counters& counters, int source_root_fd, int journal_dir_fd, std::string journal_name)
    : counters_(counters),
      source_root_fd_(source_root_fd),
      journal_dir_fd_(journal_dir_fd),
      journal_name_(std::move(journal_name)) {
  if (journal_name_.rfind("journal.", 0) == 0) own_id_ = journal_name_.substr(8);
  // A mount without its .deferfs directory gets no journal (syncs fail with
  // a message): a journal elsewhere would not be found after a crash.
  if (journal_dir_fd_ >= 0 || source_root_fd_ >= 0) return;
  char tmpl[] = "/tmp/deferfs-journal.XXXXXX";
  if (mkdtemp(tmpl)) {
    temp_dir_ = tmpl;
    journal_dir_fd_ = ::open(tmpl, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  }
}

Committer::~Committer() {
  if (temp_dir_.empty()) return;
  unlinkat(journal_dir_fd_, journal_name_.c_str(), 0);
  close(journal_dir_fd_);
  rmdir(temp_dir_.c_str());
}

int Committer::recover(int source_root_fd, int journal_dir_fd, uint64_t* files_out, uint64_t* bytes_out,
                       const std::string& name) {
  if (files_out) *files_out = 0;
  if (bytes_out) *bytes_out = 0;
  std::string why;
  switch (check_journal(journal_dir_fd, name, why)) {
    case JournalCheck::Missing:
      return 0;
    case JournalCheck::Incomplete:
      log_info("found an interrupted sync that had not committed (%s): ignoring it; "
               "the source files are unchanged by it", why.c_str());
      unlinkat(journal_dir_fd, name.c_str(), 0);
      return 0;
    case JournalCheck::Complete:
      break;
  }
  PathJournalTarget target(source_root_fd);
  uint64_t files = 0, bytes = 0;
  int rc = replay_journal(journal_dir_fd, name, target, &files, &bytes);
  if (files_out) *files_out = files;
  if (bytes_out) *bytes_out = bytes;
  if (rc < 0) {
    log_error("cannot finish an interrupted sync: %s; its journal is kept and will be "
              "replayed again", std::strerror(-rc));
    return rc;
  }
  for (const std::string& p : target.skipped)
    log_error("%s: named by an interrupted sync but gone or replaced; not changed", p.c_str());
  unlinkat(journal_dir_fd, name.c_str(), 0);
  fsync(journal_dir_fd);
  log_info("finished an interrupted sync: %llu files committed", static_cast<unsigned long long>(files));
  return 0;
}

int Committer::recover_dead(int source_root_fd, int journal_dir_fd, const std::string& own_id,
                            bool remove_clones) {
  int handled = 0;
  // A journal of a deferfs from before instances: nobody can own it now.
  std::string why;
  if (check_journal(journal_dir_fd, kJournalName, why) != JournalCheck::Missing) {
    recover(source_root_fd, journal_dir_fd, nullptr, nullptr, kJournalName);
    ++handled;
  }
  for (const std::string& id : instances_in(journal_dir_fd, own_id)) {
    const std::string jname = journal_name(id);
    const bool has_journal = faccessat(journal_dir_fd, jname.c_str(), F_OK, AT_SYMLINK_NOFOLLOW) == 0;
    if (!has_journal && !remove_clones) continue;
    std::unique_ptr<DeadInstance> dead = DeadInstance::claim(journal_dir_fd, id);
    if (!dead) continue;  // alive: its files are its own
    if (has_journal) {
      log_info("instance %s of this source is gone (its lock is free): finishing its interrupted sync",
               id.c_str());
      if (recover(source_root_fd, journal_dir_fd, nullptr, nullptr, jname) < 0) continue;
      ++handled;
    }
    if (!remove_clones) continue;
    // Its clones (never staged data) go; its spill files stay for the
    // restore of its staged files (Daemon::recover_persisted), which retires it.
    DIR* d = reopen_dir(journal_dir_fd);
    if (!d) continue;
    const std::string snap = "snap." + id + ".";
    std::vector<std::string> clones;
    while (dirent* e = readdir(d))
      if (std::strncmp(e->d_name, snap.c_str(), snap.size()) == 0) clones.push_back(e->d_name);
    closedir(d);
    for (const std::string& c : clones) unlinkat(journal_dir_fd, c.c_str(), 0);
  }
  return handled;
}

int Committer::prepare(Job& job, JournalWriter& journal, uint64_t& done, uint64_t total,
                       const Progress& progress) {
  File& file = *job.target->file;
  Source& src = file.source();
  CommitPlan& plan = job.plan;
  CommitResult& result = job.result;
  const uint64_t ps = file.page_size();

  // Guard of spec 5.2 during the commit (see LiveTarget), under the lock
  // across mounts: asked of the filesystem, not of a cache of attributes.
  if (int rc = src.fresh_identity(job.ours); rc < 0) return rc;
  if (!job.forced && job.ours != file.identity()) return -ESTALE;
  plan.source_size = job.ours.size;  // what is really there (a forced sync over a changed source)
  auto unchanged = [&]() -> int {
    SourceIdentity now;
    if (int rc = src.identity(now); rc < 0) return rc;
    return now == job.ours ? 0 : -ESTALE;
  };

  journal.begin_file(job.target->path, job.ours.dev, job.ours.ino, plan.final_size);

  // Cut pages must read as zeros: journal the ranges that hold data.
  const uint64_t zero_end = std::min(plan.final_size, plan.source_size);
  for (const auto& [first, count] : plan.zero_runs) {
    uint64_t off = first * ps;
    uint64_t end = std::min((first + count) * ps, zero_end);
    if (off >= end) continue;
    int64_t d = src.next_data_live(off);
    if (d < 0) return static_cast<int>(d);
    if (static_cast<uint64_t>(d) >= end) {
      result.pages_skipped += count;
      continue;
    }
    journal.zero(off, end - off);
    result.pages_written += count;
  }

  // Staged pages, in runs of consecutive pages: read the source's bytes and
  // journal only the pages that differ, neighbours coalesced. Writeback
  // pages come from the segment, Spilled ones from the spill file. The
  // source is read a window of runs at a time, in one batch (io_uring), so
  // scattered pages do not cost one synchronous read each.
  const uint64_t batch_pages = std::max<uint64_t>(1, kBatchBytes / ps);
  constexpr size_t kWindowRuns = 64;
  constexpr uint64_t kWindowBytes = uint64_t{16} << 20;
  std::vector<char> spilled_bytes;
  struct Run {
    size_t i, j;  // pages[i..j)
    uint64_t off, len;
  };
  // Pages known to differ from the snapshot need no compare when the source
  // is the snapshot (not a forced sync over an outside change).
  const std::vector<uint8_t> no_knowledge;
  auto journal_pages = [&](const std::vector<uint64_t>& pages, bool spilled) -> int {
    const std::vector<uint8_t>& known =
        !spilled && !job.forced && plan.known_changed.size() == pages.size() ? plan.known_changed : no_knowledge;
    auto known_changed = [&](size_t q) { return !known.empty() && known[q]; };
    auto needs_compare = [&](const Run& run) {
      for (size_t q = run.i; q < run.j; ++q)
        if (!known_changed(q)) return true;
      return false;
    };
    auto needs_source = [&](const Run& run) { return run.off < plan.source_size && needs_compare(run); };
    std::vector<Run> runs;
    for (size_t i = 0; i < pages.size();) {
      size_t j = i + 1;
      while (j < pages.size() && j - i < batch_pages && pages[j] == pages[j - 1] + 1) ++j;
      const uint64_t off = pages[i] * ps;
      runs.push_back({i, j, off, std::min<uint64_t>((j - i) * ps, plan.final_size - off)});
      i = j;
    }
    std::vector<char> window;
    std::vector<ReadRequest> reads;
    for (size_t w = 0; w < runs.size();) {
      // A window of runs: read their source bytes together.
      size_t we = w;
      uint64_t bytes = 0;
      while (we < runs.size() && we - w < kWindowRuns && (bytes == 0 || bytes + runs[we].len <= kWindowBytes))
        bytes += runs[we++].len;
      // The source's bytes (zeros past its end) for the runs to compare.
      bool compare = false;
      for (size_t k = w; k < we && !compare; ++k) compare = needs_compare(runs[k]);
      if (compare) window.assign(bytes, 0);
      reads.clear();
      uint64_t at = 0;
      for (size_t k = w; k < we; ++k) {
        const Run& run = runs[k];
        if (needs_source(run))
          reads.push_back({window.data() + at, static_cast<size_t>(std::min(run.len, plan.source_size - run.off)),
                           run.off});
        at += run.len;
      }
      if (!reads.empty())
        if (int rc = src.read_batch_live(reads); rc < 0) return rc;
      if (int rc = unchanged(); rc < 0) return rc;
      at = 0;
      for (size_t k = w; k < we; ++k) {
        const Run& run = runs[k];
        const char* old = compare ? window.data() + at : nullptr;  // read only where compared
        at += run.len;
        const char* now = file.page_bytes(pages[run.i]);
        if (spilled) {
          spilled_bytes.resize((run.j - run.i) * ps);
          for (size_t q = run.i; q < run.j; ++q)
            if (int rc = file.read_spilled(pages[q], spilled_bytes.data() + (q - run.i) * ps); rc < 0) return rc;
          now = spilled_bytes.data();
        }
        uint64_t run_start = 0, run_len = 0;
        auto flush = [&] {
          if (run_len) journal.write(run.off + run_start, now + run_start, run_len);
          result.bytes_written += run_len;
          run_len = 0;
        };
        for (uint64_t a = 0; a < run.len; a += ps) {
          uint64_t b = std::min(a + ps, run.len);
          if (!known_changed(run.i + a / ps) && std::memcmp(now + a, old + a, b - a) == 0) {
            ++result.pages_skipped;
            flush();
            continue;
          }
          ++result.pages_written;
          if (run_len == 0) run_start = a;
          run_len = b - run_start;
        }
        flush();
        done += run.j - run.i;
      }
      if (journal.error()) return journal.error();
      if (progress) progress(done, total);
      w = we;
    }
    return 0;
  };
  if (int rc = journal_pages(plan.pages, false); rc < 0) return rc;
  if (int rc = journal_pages(plan.spilled, true); rc < 0) return rc;
  if (plan.has_mtime) journal.mtime(plan.mtime);
  journal.end_file();
  if (journal.error()) return journal.error();
  return unchanged();
}

SyncReport Committer::commit(const std::vector<CommitTarget>& targets, bool force,
                             const Progress& progress) {
  SyncReport report;
  MutexLock serial(sync_mutex_);
  PhaseClock clock;

  // A journal left by a sync whose replay failed: finish it first, so this
  // sync compares against the source as that one decided it.
  // Its bytes count in this sync's report: they are committed now.
  if (source_root_fd_ >= 0) {
    uint64_t files = 0, bytes = 0;
    // Another mount's sync, decided and interrupted by its death, is
    // finished before this one compares (its files stay whole).
    if (journal_dir_fd_ >= 0) recover_dead(source_root_fd_, journal_dir_fd_, own_id_, false);
    recover(source_root_fd_, journal_dir_fd_, &files, &bytes, journal_name_);
    const uint64_t ps = targets.empty() ? 4096 : targets.front().file->page_size();
    report.bytes_written += bytes;
    report.pages_written += (bytes + ps - 1) / ps;
    counters_.synced_bytes.fetch_add(bytes, std::memory_order_relaxed);
  }

  std::vector<std::unique_ptr<Job>> jobs;
  uint64_t total = 0;
  for (const CommitTarget& t : targets) {
    auto job = std::make_unique<Job>();
    job->target = &t;
    job->commit_lock = std::unique_lock(t.file->commit_mutex());
    // Pages a write may have left equal to the snapshot are decided first;
    // those found equal are this sync's skipped pages too.
    report.pages_skipped += t.file->settle_pending();
    if (!t.file->has_staged_now()) continue;
    if (t.file->revalidate() == File::Validity::Conflict) {
      if (!force) {
        log_error("%s: not synced: changed outside the mount since its snapshot "
                  "(use `deferfs sync --force` to write the staged pages over it, "
                  "or `deferfs discard`)", t.path.c_str());
        report.conflicts.push_back(t.path);
        continue;
      }
      job->forced = true;
    }
    job->plan = t.file->begin_commit();
    total += job->plan.pages.size() + job->plan.spilled.size();
    jobs.push_back(std::move(job));
  }
  if (jobs.empty()) return report;

  // Every file is ended exactly once: committed, or back to staged. On
  // failure, `culprit` (if any) is the file that caused it: in conflict when
  // `conflict`, else failed with `cause`; the others are "not committed".
  int fail_code = EIO;  // the errno of the failure being reported
  auto end_all = [&](bool ok, const std::string& cause, const Job* culprit, bool conflict) {
    for (auto& job : jobs) {
      File& f = *job->target->file;
      const bool is_culprit = culprit == job.get();
      if (job->gate.owns_lock()) job->gate.unlock();
      // A job that never got to prepare() has no identity of ours to adopt.
      const bool prepared = job->ours.ino != 0 || job->ours.dev != 0;
      f.end_commit(job->plan, ok, job->forced, (is_culprit && conflict) || !prepared ? nullptr : &job->ours);
      if (ok) {
        ++report.files;
        report.pages_written += job->result.pages_written;
        report.pages_skipped += job->result.pages_skipped;
        report.bytes_written += job->result.bytes_written;
        counters_.synced_bytes.fetch_add(job->result.bytes_written, std::memory_order_relaxed);
        counters_.skipped_pages.fetch_add(job->result.pages_skipped, std::memory_order_relaxed);
        continue;
      }
      if (is_culprit && conflict) {
        f.mark_conflict();
        report.conflicts.push_back(job->target->path);
        continue;
      }
      std::string why = is_culprit || !culprit ? cause : "not committed: " + cause;
      log_error("%s: sync failed: %s; its staged pages are kept", job->target->path.c_str(), why.c_str());
      report.failed.push_back({job->target->path, why, fail_code});
    }
  };

  for (auto& job : jobs) job->gate = std::unique_lock(job->target->file->io_gate());
  if (journal_dir_fd_ < 0) {
    end_all(false, "no place for the sync journal (the source's .deferfs directory)", nullptr, false);
    return report;
  }

  const double plan_ms = clock.lap();
  // 1. Compare and journal.
  // Across mounts: the apply of a file is serialized by an OFD lock on the
  // source file itself (it lives on the shared filesystem), taken in path
  // order so that two mounts syncing overlapping sets cannot deadlock.
  // prepare() checks the identity under it.
  std::vector<Job*> by_path;
  for (auto& job : jobs) by_path.push_back(job.get());
  std::sort(by_path.begin(), by_path.end(),
            [](const Job* a, const Job* b) { return a->target->path < b->target->path; });
  std::vector<int> locked;
  struct Unlock {
    std::vector<int>& fds;
    ~Unlock() {
      for (int fd : fds) {
        struct flock fl = {};
        fl.l_type = F_UNLCK;
        fl.l_whence = SEEK_SET;
        fcntl(fd, F_OFD_SETLK, &fl);
      }
    }
  } unlock{locked};
  for (Job* job : by_path) {
    const int fd = job->target->file->source().lock_fd();
    if (fd < 0) continue;
    struct flock fl = {};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    int rc;
    while ((rc = fcntl(fd, F_OFD_SETLKW, &fl)) < 0 && errno == EINTR) {
    }
    if (rc == 0) {
      locked.push_back(fd);
    } else if (errno != EBADF && errno != ENOLCK && errno != EOPNOTSUPP && errno != EINVAL) {
      fail_code = errno;
      end_all(false, std::string("locking the source file: ") + std::strerror(errno), job, false);
      return report;
    }
    // A source opened read-only (EBADF) fails in prepare; a filesystem
    // without locks (ENOLCK) gets no serialization across mounts.
  }

  JournalWriter journal(journal_dir_fd_, journal_name_);
  uint64_t done = 0;
  for (auto& job : jobs) {
    int rc = journal.error() ? journal.error() : prepare(*job, journal, done, total, progress);
    if (rc == -ESTALE) {
      end_all(false, job->target->path + " changed outside the mount during the sync", job.get(), true);
      return report;
    }
    if (rc < 0) {
      fail_code = -rc;
      const bool journal_failed = journal.error() != 0;
      end_all(false, std::string(std::strerror(-rc)) +
                         (journal_failed ? " (writing the sync journal)" : " (reading the source)"),
              journal_failed ? nullptr : job.get(), false);
      return report;
    }
  }
  const double journal_ms = clock.lap();
  // 2. Decide.
  if (int rc = journal.commit(); rc < 0) {
    fail_code = -rc;
    end_all(false, std::string(std::strerror(-rc)) + " (writing the sync journal)", nullptr, false);
    return report;
  }
  const double decide_ms = clock.lap();
  // 3. Apply in place, then retire the journal.
  std::vector<Job*> live;
  for (auto& job : jobs) live.push_back(job.get());
  LiveTarget target(live);
  // The journal was written and fsynced just now by this process, under
  // sync_mutex_: its checksum is not read back again.
  int rc = replay_journal(journal_dir_fd_, journal_name_, target, nullptr, nullptr, /*verify_sum=*/false);
  if (rc == -ESTALE) {
    // Decided but not fully applied: the journal stays and the next sync or
    // mount finishes it; the staged pages stay too.
    end_all(false, "a file changed outside the mount while the sync was applied; the next sync finishes it",
            target.failed(), true);
    return report;
  }
  if (rc < 0) {
    fail_code = -rc;
    end_all(false, std::string(std::strerror(-rc)) + " (applying the sync; the next sync finishes it)",
            target.failed(), false);
    return report;
  }
  const double apply_ms = clock.lap();
  journal.retire();
  end_all(true, "", nullptr, false);
  log_debug("sync of %zu files, %llu bytes of journal: plan %.1f ms, journal %.1f ms, its fsync %.1f ms, "
            "apply %.1f ms (of which fsync %.1f ms, writes %.1f ms), retire %.1f ms",
            jobs.size(), static_cast<unsigned long long>(journal.bytes()), plan_ms, journal_ms, decide_ms,
            apply_ms, target.sync_ms, target.write_ms, clock.lap());
  // Guard: an outside change seen while the decided sync was applied, or
  // one that slipped between a write of ours and the fstat after it (then
  // only the resident pages can tell): the file takes a new snapshot, so
  // nothing stale is served.
  for (auto& job : jobs) {
    bool seen = std::find(target.outside_seen.begin(), target.outside_seen.end(), job.get()) !=
                target.outside_seen.end();
    if (job->target->file->recheck_after_commit(kRecheckPages, seen))
      log_info("%s: committed; it was also changed outside the mount during the sync", job->target->path.c_str());
  }
  if (progress) progress(total, total);
  return report;
}

}  // namespace deferfs
