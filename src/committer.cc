#include "deferfs/committer.h"

#include <algorithm>
#include <cstring>

#include "deferfs/log.h"

namespace deferfs {

namespace {
constexpr uint64_t kBatchBytes = uint64_t{1} << 20;  // compare/write in 1 MiB runs
}

SyncReport Committer::commit(const std::vector<CommitTarget>& targets, bool force,
                             const Progress& progress) {
  SyncReport report;
  std::lock_guard serial(sync_mutex_);

  struct Job {
    const CommitTarget* target;
    std::unique_lock<std::mutex> lock;
    CommitPlan plan;
    bool forced = false;
  };
  std::vector<Job> jobs;
  uint64_t total = 0;
  for (const CommitTarget& t : targets) {
    Job job{&t, std::unique_lock(t.file->commit_mutex()), {}, false};
    if (!t.file->has_staged()) continue;
    if (t.file->revalidate() == File::Validity::Conflict) {
      if (!force) {
        log_error("%s: not synced: changed outside the mount since its snapshot "
                  "(use `deferfs sync --force` to write the staged pages over it, "
                  "or `deferfs discard`)", t.path.c_str());
        report.conflicts.push_back(t.path);
        continue;
      }
      job.forced = true;
    }
    job.plan = t.file->begin_commit();
    total += job.plan.pages.size() + job.plan.spilled.size();
    jobs.push_back(std::move(job));
  }

  uint64_t done = 0;
  for (Job& job : jobs) {
    File& f = *job.target->file;
    CommitResult r;
    SourceIdentity ours;
    int rc;
    {
      std::unique_lock gate(f.io_gate());
      rc = apply(f, job.plan, job.forced, ours, r, done, total, progress);
    }
    if (rc == -ESTALE) {
      // Changed outside while we committed: keep everything staged, keep the
      // old identity, and say conflict.
      f.end_commit(job.plan, false, job.forced, nullptr);
      f.mark_conflict();
      report.conflicts.push_back(job.target->path);
      continue;
    }
    f.end_commit(job.plan, rc == 0, job.forced, &ours);
    if (rc < 0) {
      log_error("%s: sync failed: %s; its staged pages are kept", job.target->path.c_str(),
                std::strerror(-rc));
      report.failed.push_back({job.target->path, std::strerror(-rc)});
      continue;
    }
    ++report.files;
    report.pages_written += r.pages_written;
    report.pages_skipped += r.pages_skipped;
    report.bytes_written += r.bytes_written;
    counters_.synced_bytes.fetch_add(r.bytes_written, std::memory_order_relaxed);
    counters_.skipped_pages.fetch_add(r.pages_skipped, std::memory_order_relaxed);
  }
  if (progress) progress(total, total);
  return report;
}

int Committer::apply(File& file, const CommitPlan& given, bool forced, SourceIdentity& ours,
                     CommitResult& result, uint64_t& done, uint64_t total, const Progress& progress) {
  Source& src = file.source();
  // Guard of spec 5.2 during the commit: the source must stay as our own
  // last step left it. An outside writer does not take our io_gate, so
  // check its identity (dev, ino, size, mtime, ctime) before every step and
  // take it anew after each of our own changes. (The window left between a
  // write of ours and the fstat after it is closed only by reflink
  // snapshots, see LIMITS.)
  if (int rc = src.identity(ours); rc < 0) return rc;
  if (!forced && ours != file.identity()) return -ESTALE;
  CommitPlan plan = given;
  plan.source_size = ours.size;  // what is really there (a forced sync over a shrunk source)
  auto unchanged = [&]() -> int {
    SourceIdentity now;
    if (int rc = src.identity(now); rc < 0) return rc;
    return now == ours ? 0 : -ESTALE;
  };
  auto after_change = [&]() -> int { return src.identity(ours); };
  const uint64_t ps = file.page_size();
  const uint64_t batch_pages = std::max<uint64_t>(1, kBatchBytes / ps);
  std::vector<char> old(batch_pages * ps);
  std::vector<char> spilled_bytes;

  // Staged pages, in runs of consecutive pages: read the source's bytes,
  // write only the pages that differ, coalescing neighbours into one write.
  // Writeback pages are read from the segment, Spilled ones from the spill
  // file.
  auto commit_pages = [&](const std::vector<uint64_t>& pages, bool spilled) -> int {
    for (size_t i = 0; i < pages.size();) {
      size_t j = i + 1;
      while (j < pages.size() && j - i < batch_pages && pages[j] == pages[j - 1] + 1) ++j;
      const uint64_t off = pages[i] * ps;
      const uint64_t len = std::min<uint64_t>((j - i) * ps, plan.final_size - off);
      std::memset(old.data(), 0, len);
      if (off < plan.source_size) {
        uint64_t want = std::min(len, plan.source_size - off);
        ssize_t n = src.read(old.data(), want, off);
        if (n < 0) return static_cast<int>(n);
      }
      if (int rc = unchanged(); rc < 0) return rc;
      const char* now = file.page_bytes(pages[i]);
      if (spilled) {
        spilled_bytes.resize((j - i) * ps);
        for (size_t k = i; k < j; ++k)
          if (int rc = file.read_spilled(pages[k], spilled_bytes.data() + (k - i) * ps); rc < 0) return rc;
        now = spilled_bytes.data();
      }
      uint64_t run_start = 0, run_len = 0;
      auto flush = [&]() -> int {
        if (run_len == 0) return 0;
        if (int rc = unchanged(); rc < 0) return rc;
        int rc = src.write(now + run_start, run_len, off + run_start);
        if (rc < 0) return rc;
        if ((rc = after_change()) < 0) return rc;
        result.bytes_written += run_len;
        run_len = 0;
        return 0;
      };
      for (uint64_t a = 0; a < len; a += ps) {
        uint64_t b = std::min(a + ps, len);
        if (std::memcmp(now + a, old.data() + a, b - a) == 0) {
          ++result.pages_skipped;
          if (int rc = flush(); rc < 0) return rc;
          continue;
        }
        ++result.pages_written;
        if (run_len == 0) run_start = a;
        run_len = b - run_start;
      }
      if (int rc = flush(); rc < 0) return rc;
      done += j - i;
      if (progress) progress(done, total);
      i = j;
    }
    return 0;
  };
  if (int rc = commit_pages(plan.pages, false); rc < 0) return rc;
  if (int rc = commit_pages(plan.spilled, true); rc < 0) return rc;

  // Cut pages: must read as zeros. Skip ranges that hold no data already.
  const uint64_t zero_end = std::min(plan.final_size, plan.source_size);
  for (const auto& [first, count] : plan.zero_runs) {
    uint64_t off = first * ps;
    uint64_t end = std::min((first + count) * ps, zero_end);
    if (off >= end) continue;
    int64_t d = src.next_data(off);
    if (d < 0) return static_cast<int>(d);
    if (static_cast<uint64_t>(d) >= end) {
      result.pages_skipped += count;
      continue;
    }
    if (int rc = unchanged(); rc < 0) return rc;
    if (int rc = src.zero(off, end - off); rc < 0) return rc;
    if (int rc = after_change(); rc < 0) return rc;
    result.pages_written += count;
  }

  if (plan.size_change()) {
    if (int rc = unchanged(); rc < 0) return rc;
    if (int rc = src.truncate(plan.final_size); rc < 0) return rc;
    if (int rc = after_change(); rc < 0) return rc;
  }
  if (int rc = src.sync(); rc < 0) return rc;
  return unchanged();
}

}  // namespace deferfs
