// File's side of a commit (sync): the plan of what to write, its end, the
// recheck against the live source, and the identity the snapshot adopts.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>

#include "deferfs/file.h"
#include "deferfs/log.h"
#include "file_internal.h"

namespace deferfs {

using namespace file_detail;

CommitPlan File::begin_commit() {
  const uint64_t ps = page_size_;
  MutexLock lk(mutex_);
  CommitPlan plan;
  plan.final_size = size_;
  plan.source_size = base_size_;
  plan.has_mtime = explicit_mtime_;
  plan.mtime = staged_mtime_;
  plan.pages = map_.collect(0, div_up(size_, ps),
                            [](const PageEntry& e) { return e.state == PageState::Dirty; });
  plan.known_changed.resize(plan.pages.size());
  for (size_t i = 0; i < plan.pages.size(); ++i) {
    const uint64_t p = plan.pages[i];
    PageEntry* e = set_page_state(p, PageState::Writeback);
    plan.known_changed[i] = e->flags & PageEntry::kDiffers ? 1 : 0;
  }
  plan.spilled = map_.collect(0, div_up(size_, ps),
                              [](const PageEntry& e) { return e.state == PageState::Spilled; });
  for (uint64_t p : plan.spilled) map_.find(p)->flags |= PageEntry::kCommitting;
  // Cut pages without an entry must read as zeros on the source.
  uint64_t zfirst = div_up(cut_, ps);
  uint64_t zlast = div_up(std::min(size_, base_size_), ps);
  if (zlast > zfirst) {
    std::vector<uint64_t> present =
        map_.collect(zfirst, zlast, [](const PageEntry&) { return true; });
    size_t k = 0;
    for (uint64_t p = zfirst; p < zlast; ++p) {
      if (k < present.size() && present[k] == p) {
        ++k;
        continue;
      }
      if (!plan.zero_runs.empty() && plan.zero_runs.back().first + plan.zero_runs.back().second == p)
        ++plan.zero_runs.back().second;
      else
        plan.zero_runs.push_back({p, 1});
    }
  }
  return plan;
}

void File::end_commit(const CommitPlan& plan, bool ok, bool forced, const SourceIdentity* ours) {
  MutexLock lk(mutex_);
  for (uint64_t p : plan.pages) {
    PageEntry* e = map_.find(p);
    if (!e) continue;  // cut by a truncate meanwhile (not possible under commit_mutex)
    if (e->state == PageState::Writeback) e = set_page_state(p, ok ? PageState::Clean : PageState::Dirty);
    // Committed, or maybe partly (a failed sync may have applied some pages):
    // the source holds whatever the commit wrote, not the snapshot's bytes,
    // so a staged page's base is unknown until compared again.
    if (e->state == PageState::Dirty) {
      e->has_base_hash = false;
      e->flags &= static_cast<uint8_t>(~PageEntry::kDiffers);
    }
  }
  for (uint64_t p : plan.spilled) {
    PageEntry* e = map_.find(p);
    // Committed and untouched since: the source holds it now (p is below the
    // new cut), so the spill copy goes.
    if (ok && e && e->state == PageState::Spilled && (e->flags & PageEntry::kCommitting)) drop_page(p);
    else if (e && e->state == PageState::Spilled) e->flags &= static_cast<uint8_t>(~PageEntry::kCommitting);
  }
  // Our own writes changed the source's mtime; the snapshot follows them,
  // but never an outside change (ours == nullptr then).
  if (ours) identity_ = *ours;
  if (!ok) {
    persist_header_locked();
    return;
  }
  base_size_ = plan.final_size;
  cut_ = std::min(size_, plan.final_size);
  ++generation_;
  // A reflink snapshot follows the commit: the source is the new base.
  if (int rc = source_->refresh(); rc < 0)
    log_error("%s: cannot take a new reflink snapshot after sync: %s", name_.c_str(), std::strerror(-rc));
  if (forced && conflict_) {
    stale_kernel_cache_ = true;  // the kernel may hold pages of the old source too
    // Pages loaded from the old source are not the new base: drop them.
    for (uint64_t p : map_.collect(0, std::numeric_limits<uint64_t>::max(), [](const PageEntry& e) {
           return e.state == PageState::Clean || e.state == PageState::Hole;
         }))
      drop_page(p);
  }
  conflict_ = false;
  if (!has_staged_locked()) {
    staged_mtime_ = {};
    explicit_mtime_ = false;
  }
  persist_header_locked();
}

bool File::recheck_after_commit(uint64_t max_pages, bool force) {
  const uint64_t ps = page_size_;
  MutexLock lk(mutex_);
  bool changed = force;
  if (!changed) {
    std::vector<uint64_t> clean = map_.collect(0, std::numeric_limits<uint64_t>::max(), [](const PageEntry& e) {
      return e.state == PageState::Clean;
    });
    if (clean.empty() || clean.size() > max_pages) return false;
    const uint64_t gen = generation_;
    std::vector<char> bytes(clean.size() * ps, 0);
    std::vector<ReadRequest> reads;
    for (size_t i = 0; i < clean.size(); ++i) reads.push_back({bytes.data() + i * ps, ps, clean[i] * ps});
    int rc;
    {
      MutexUnlock unlocked(mutex_);
      rc = source_->read_batch_live(reads);
    }
    if (rc < 0 || generation_ != gen) return false;
    for (size_t i = 0; i < clean.size() && !changed; ++i) {
      if (map_.state(clean[i]) != PageState::Clean) continue;  // changed by a write meanwhile
      const size_t have = static_cast<size_t>(std::max<ssize_t>(0, reads[i].result));
      changed = std::memcmp(page_bytes(clean[i]), bytes.data() + i * ps, have) != 0;
    }
  }
  if (!changed) return false;
  SourceIdentity now;
  if (source_->identity(now) < 0) return false;
  if (has_staged_locked()) {
    if (!conflict_)
      log_error("%s: changed outside the mount during a sync (conflict)", name_.c_str());
    conflict_ = true;
  } else {
    log_info("%s: changed outside the mount during a sync; taking a new snapshot", name_.c_str());
    resnapshot_locked(now);
  }
  stale_kernel_cache_ = true;
  return true;
}

bool File::take_stale_kernel_cache() {
  MutexLock lk(mutex_);
  bool stale = stale_kernel_cache_;
  stale_kernel_cache_ = false;
  return stale;
}

SourceIdentity File::identity() {
  MutexLock lk(mutex_);
  return identity_;
}

void File::mark_conflict() {
  MutexLock lk(mutex_);
  if (!conflict_)
    log_error("%s: changed outside the mount during a sync (conflict): "
              "`deferfs sync --force` writes the staged pages over it, "
              "`deferfs discard` drops them", name_.c_str());
  conflict_ = true;
}

void File::adopt_metadata_change(bool times_set) {
  MutexLock lk(mutex_);
  SourceIdentity now;
  if (source_->identity(now) < 0 || now == identity_) return;
  const bool same_data = now.dev == identity_.dev && now.ino == identity_.ino && now.size == identity_.size &&
                         (times_set || (now.mtime.tv_sec == identity_.mtime.tv_sec &&
                                        now.mtime.tv_nsec == identity_.mtime.tv_nsec));
  if (same_data) identity_ = now;
  persist_header_locked();
}

}  // namespace deferfs
