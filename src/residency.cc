// File's residency: clock eviction of Clean pages, spilling of Dirty pages
// to the spill file, reply pins and the punches they defer.
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

void File::punch_locked(uint64_t off, uint64_t len) {
  if (pins_ == 0) {
    segment_->punch(off, len);
    return;
  }
  pending_punch_.push_back({off, len});
}

void File::unpin() {
  MutexLock lk(mutex_);
  if (--pins_ > 0 || pending_punch_.empty()) return;
  // Nobody sends from the segment now: free what was deferred, except pages
  // that became resident (or are being loaded) again meanwhile.
  const uint64_t ps = page_size_;
  for (const auto& [off, len] : pending_punch_) {
    const uint64_t end = std::min(off + len, segment_->capacity());
    // Punch the gaps between the pages that must stay (O(entries), not O(range)).
    std::vector<uint64_t> keep = map_.collect(off / ps, div_up(end, ps), [](const PageEntry& e) {
      return is_resident(e.state) || is_loading(e.state);
    });
    uint64_t from = off;
    for (uint64_t p : keep) {
      if (p * ps > from) segment_->punch(from, p * ps - from);
      from = std::max(from, (p + 1) * ps);
    }
    if (end > from) segment_->punch(from, end - from);
  }
  pending_punch_.clear();
}

void File::drop_page(uint64_t page) {
  PageState st = map_.state(page);
  set_page_state(page, PageState::Absent);
  if (is_resident(st) || is_loading(st)) punch_locked(page * page_size_, page_size_);
  if (st == PageState::Spilled && spill_fd_ >= 0)
    fallocate(spill_fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
              static_cast<off_t>(page * page_size_), static_cast<off_t>(page_size_));
}

int File::read_spilled(uint64_t page, char* out) {
  int fd;
  {
    MutexLock lk(mutex_);
    fd = spill_fd_;
  }
  if (fd < 0) return -EIO;
  ssize_t n = pread(fd, out, page_size_, static_cast<off_t>(page * page_size_));
  if (n < 0) return -errno;
  if (static_cast<uint64_t>(n) < page_size_) std::memset(out + n, 0, page_size_ - static_cast<size_t>(n));
  return 0;
}

void File::set_spill_opener(std::function<int()> opener, std::function<void()> remover) {
  MutexLock lk(mutex_);
  spill_opener_ = std::move(opener);
  spill_remover_ = std::move(remover);
  if (map_.count(PageState::Spilled) > 0 && ensure_spill_file_locked() < 0)
    log_error("%s: the spill file of its restored staged pages cannot be opened", name_.c_str());
}

int File::ensure_spill_file_locked() {
  if (spill_fd_ >= 0) return 0;
  if (!spill_opener_) return -ENOSPC;
  int fd = spill_opener_();
  if (fd < 0) return fd;
  spill_fd_ = fd;
  return 0;
}

uint64_t File::clean_pages() {
  MutexLock lk(mutex_);
  return map_.count(PageState::Clean);
}

uint64_t File::dirty_resident_pages() {
  MutexLock lk(mutex_);
  return map_.count(PageState::Dirty);
}

uint64_t File::evict_clean(uint64_t max_pages) {
  const uint64_t ps = page_size_;
  MutexLock lk(mutex_);
  std::vector<uint64_t> victims;
  // Two turns of the clock at most: the first clears reference bits.
  size_t budget = map_.capacity() * 2;
  const uint64_t cut = cut_;  // the sweep's callback runs under our lock, but the analysis cannot see it
  while (victims.size() < max_pages && budget > 0) {
    size_t step = std::min<size_t>(budget, 4096);
    budget -= map_.sweep(clock_hand_, step, [&](uint64_t p, PageEntry& e) {
      // A Clean page at or above the cut would read as zeros once Absent.
      if (victims.size() >= max_pages || e.state != PageState::Clean || p * ps >= cut) return;
      if (e.flags & PageEntry::kReferenced)
        e.flags &= static_cast<uint8_t>(~PageEntry::kReferenced);
      else
        victims.push_back(p);
    });
  }
  for (uint64_t p : victims) drop_page(p);
  counters_.evicted_bytes.fetch_add(victims.size() * ps, std::memory_order_relaxed);
  return victims.size();
}

int64_t File::spill_dirty(uint64_t max_pages) {
  const uint64_t ps = page_size_;
  settle_pending();  // pages equal to the snapshot are not worth a spill
  MutexLock lk(mutex_);
  if (int rc = ensure_spill_file_locked(); rc < 0) return rc;
  std::vector<uint64_t> victims = map_.collect(0, std::numeric_limits<uint64_t>::max(), [](const PageEntry& e) {
    return e.state == PageState::Dirty && !(e.flags & PageEntry::kSpilling);
  });
  if (victims.size() > max_pages) victims.resize(max_pages);
  if (victims.empty()) return 0;
  for (uint64_t p : victims) map_.find(p)->flags |= PageEntry::kSpilling;
  const int fd = spill_fd_;
  // Copy out with the lock released; a write meanwhile clears kSpilling and
  // the page then stays Dirty in memory (the copy is stale, never used).
  int rc = 0;
  {
    MutexUnlock unlocked(mutex_);
    for (size_t i = 0; i < victims.size() && rc == 0;) {
      size_t j = i + 1;
      while (j < victims.size() && j - i < 256 && victims[j] == victims[j - 1] + 1) ++j;
      const char* from = page_bytes(victims[i]);
      size_t len = (j - i) * ps;
      for (size_t done = 0; done < len;) {
        ssize_t n = pwrite(fd, from + done, len - done, static_cast<off_t>(victims[i] * ps + done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
          rc = n < 0 ? -errno : -EIO;
          break;
        }
        done += static_cast<size_t>(n);
      }
      i = j;
    }
  }
  int64_t spilled = 0;
  for (uint64_t p : victims) {
    PageEntry* e = map_.find(p);
    if (!e) continue;
    bool intact = e->state == PageState::Dirty && (e->flags & PageEntry::kSpilling);
    e->flags &= static_cast<uint8_t>(~PageEntry::kSpilling);
    if (rc == 0 && intact) {
      set_page_state(p, PageState::Spilled);
      punch_locked(p * ps, ps);
      ++spilled;
    }
  }
  if (rc < 0) {
    log_error("%s: cannot spill staged pages to disk: %s; they stay in memory", name_.c_str(),
              std::strerror(-rc));
    return rc;
  }
  counters_.spilled_total_bytes.fetch_add(static_cast<uint64_t>(spilled) * ps, std::memory_order_relaxed);
  return spilled;
}

}  // namespace deferfs
