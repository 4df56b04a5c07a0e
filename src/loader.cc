// File's loader: absent pages below the cut are read from the source (or
// spilled ones from the spill file) with the lock released, concurrent
// faults on a page merged, waiters woken when their pages settle;
// readahead of sequential reads.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "deferfs/file.h"
#include "deferfs/loader.h"
#include "deferfs/log.h"
#include "deferfs/segment_fill.h"
#include "file_internal.h"

namespace deferfs {

using namespace file_detail;

// ---------------------------------------------------------------- the parts that know nothing of File

namespace {
constexpr uint64_t kPopulateMin = 64 << 10;
}  // namespace

bool source_is_dense(Source& source, uint64_t base_size) {
  if (base_size == 0) return true;
  const int64_t d = source.next_data(0);
  if (d != 0) return false;
  const int64_t h = source.next_hole(0);
  return h >= 0 && static_cast<uint64_t>(h) >= base_size;
}

int load_run(Source& source, Segment& segment, uint64_t page_size, uint64_t first, uint64_t count,
             uint64_t base_size, std::vector<char>& hole, uint64_t& loaded, bool via_fd, bool dense) {
  const uint64_t ps = page_size;
  uint64_t off = first * ps;
  const uint64_t end = std::min((first + count) * ps, base_size);
  char* seg = segment.data();
  while (off < end) {
    int64_t d = dense ? static_cast<int64_t>(off) : source.next_data(off);
    if (d < 0) return static_cast<int>(d);
    uint64_t data = std::max<uint64_t>(static_cast<uint64_t>(d), off);
    // Pages whose bytes (up to the end of the file) all lie in [off, data)
    // are holes: zeros, never read, nothing resident.
    for (uint64_t p = div_up(off, ps); p < first + count && p * ps < std::min(data, end); ++p)
      if (std::min((p + 1) * ps, base_size) <= data) hole[p - first] = 1;
    if (data >= end) break;
    int64_t h = dense ? static_cast<int64_t>(end) : source.next_hole(data);
    if (h < 0) return static_cast<int>(h);
    uint64_t read_start = std::max(off, data / ps * ps);
    uint64_t read_end = std::min(end, div_up(std::max<uint64_t>(static_cast<uint64_t>(h), data + 1), ps) * ps);
    // Allocate the segment's pages and map them in one call: left to the
    // read's copy, each 4 KiB page costs a page fault (profile of a cold
    // sequential read: a quarter of the daemon's time).
    // With views mapping the segment, pages must come into existence only
    // once written whole: pwrite through the segment's fd (segment_fill.h),
    // no populate, no O_DIRECT into the mapping.
    ssize_t n;
    if (via_fd) {
      n = read_for_views(source, segment.fd(), read_start, read_end - read_start);
    } else {
      // A short load is faulted in by the read itself: populating it
      // would be one more system call for the same work.
      if (read_end - read_start >= kPopulateMin) segment.populate(read_start, div_up(read_end, ps) * ps - read_start);
      n = source.load(seg + read_start, read_end - read_start, read_start);
    }
    if (n < 0) return static_cast<int>(n);
    if (static_cast<uint64_t>(n) < read_end - read_start) return -ESTALE;  // source shrank
    // The last page past the end of the file reads as zeros, whatever its
    // memory held (a punch may still be deferred).
    if (read_end % ps) std::memset(seg + read_end, 0, ps - read_end % ps);
    loaded += static_cast<uint64_t>(n);
    off = read_end;
  }
  return 0;
}

LoadWaiters::~LoadWaiters() {
  if (!list_.empty()) {  // a waiter holds a reference to the file: impossible
    std::fprintf(stderr, "deferfs: BUG: a file went away with %zu requests waiting for its pages\n", list_.size());
    std::abort();
  }
}

void LoadWaiters::wait(Mutex& mu, uint64_t first, uint64_t last) {
  Waiter w;
  w.first = first;
  w.last = last;
  list_.push_back(w);
  // wake() unlinks us before it signals, under mu: once woken, w is ours.
  while (!w.woken) w.cv.wait(mu);
}

void LoadWaiters::wake(const std::vector<uint64_t>& settled) {
  if (settled.empty()) return;
  for (auto it = list_.begin(); it != list_.end();) {
    Waiter& w = *it;
    auto hit = std::lower_bound(settled.begin(), settled.end(), w.first);
    if (hit != settled.end() && *hit < w.last) {
      it = list_.erase(it);
      w.woken = true;
      w.cv.notify_one();
    } else {
      ++it;
    }
  }
}

void Readahead::touched_within(uint64_t off) {
  if (next_ != ~uint64_t{0} && off >= next_ && off <= issued_) next_ = off;
}

std::pair<uint64_t, uint64_t> Readahead::follow(uint64_t off, uint64_t len, uint64_t limit) {
  const uint64_t end = off + len;
  if (off == next_) {
    window_ = window_ ? std::min(window_ * 2, max_) : std::min<uint64_t>(128 << 10, max_);
  } else {
    window_ = 0;  // a seek: random access loads only what it touches
    issued_ = 0;
  }
  next_ = end;
  if (window_ == 0) return {0, 0};
  // The window past this read, less what was handed out already.
  const uint64_t from = std::max(end, issued_);
  const uint64_t to = std::min(end + window_, limit);
  if (from >= to) return {0, 0};
  issued_ = to;
  return {from, to};
}

// ---------------------------------------------------------------- File's loading

int File::ensure_loaded(uint64_t first, uint64_t last, bool touch) {
  const uint64_t ps = page_size_;
  for (;;) {
    std::vector<uint64_t> mine;
    std::vector<char> from_spill;
    bool others_loading = false, from_source = false;
    for (uint64_t p = first; p < last; ++p) {
      PageState st = map_.state(p);
      if ((st == PageState::Absent && p * ps < cut_) || st == PageState::Spilled) {
        mine.push_back(p);
        from_spill.push_back(st == PageState::Spilled);
        from_source |= st == PageState::Absent;
      } else if (is_loading(st)) {
        others_loading = true;
      }
    }
    if (mine.empty() && !others_loading) return 0;
    if (mine.empty()) {
      waiters_.wait(mutex_, first, last);
      continue;
    }
    if (conflict_ && from_source && !source_->stable()) {
      log_error("%s: changed outside the mount while it has staged changes; "
                "refusing to read pages of the new source (conflict)", name_.c_str());
      return -EIO;
    }
    for (size_t i = 0; i < mine.size(); ++i) {
      PageEntry* e = set_page_state(mine[i], PageState::Loading);
      if (from_spill[i]) e->flags |= PageEntry::kFromSpill;
    }
    const SourceIdentity expected = identity_;
    const uint64_t base_size = base_size_;
    const uint64_t generation = generation_;
    const bool density_known = density_generation_ == generation;
    bool dense = density_known && dense_;
    const int spill_fd = spill_fd_;

    // I/O with the lock released; I5: only we write these pages' bytes.
    std::vector<char> hole(mine.size(), 0);
    int rc = 0, spill_rc = 0;
    uint64_t loaded = 0;
    {
      MutexUnlock unlocked(mutex_);
      for (size_t i = 0; i < mine.size(); ++i) {
        if (!from_spill[i]) continue;
        ssize_t n = views.load(std::memory_order_acquire)
                        ? read_for_views(spill_fd, segment_->fd(), mine[i] * ps, ps)
                        : pread(spill_fd, segment_->data() + mine[i] * ps, ps, static_cast<off_t>(mine[i] * ps));
        if (n != static_cast<ssize_t>(ps)) spill_rc = n < 0 ? -errno : -EIO;
      }
      if (from_source) {
        ReaderLock gate(io_gate_);
        // Read under the gate: add_view() counts a view, then waits for the
        // loads holding the gate, so every later load sees it.
        const bool via_fd = views.load(std::memory_order_acquire) > 0;
        if (!density_known) dense = source_is_dense(*source_, base_size);
        for (size_t i = 0; i < mine.size() && rc == 0;) {
          if (from_spill[i]) {
            ++i;
            continue;
          }
          size_t j = i + 1;
          while (j < mine.size() && !from_spill[j] && mine[j] == mine[j - 1] + 1) ++j;
          std::vector<char> run_hole(j - i, 0);
          rc = load_run(*source_, *segment_, ps, mine[i], j - i, base_size, run_hole, loaded, via_fd, dense);
          std::copy(run_hole.begin(), run_hole.end(), hole.begin() + static_cast<long>(i));
          i = j;
        }
        // The guard of spec 5.2: trust what was read only if the source is
        // still the snapshot's version (a reflink clone cannot change).
        SourceIdentity now;
        if (rc == 0 && !source_->stable() && (rc = source_->identity(now)) == 0 && now != expected) rc = -ESTALE;
      }
    }
    counters_.loaded_bytes.fetch_add(loaded, std::memory_order_relaxed);
    // Known for this base only: a commit or a new snapshot bumps the
    // generation; an outside change fails the guard above.
    if (from_source && rc == 0 && !density_known && generation_ == generation) {
      density_generation_ = generation;
      dense_ = dense;
    }

    for (size_t i = 0; i < mine.size(); ++i) {
      const uint64_t p = mine[i];
      const bool invalidated = map_.state(p) == PageState::LoadingInvalidated;
      if (from_spill[i]) {
        if (invalidated) {
          drop_page(p);
          if (spill_fd_ >= 0)
            fallocate(spill_fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      static_cast<off_t>(p * ps), static_cast<off_t>(ps));
        } else if (spill_rc < 0) {
          set_page_state(p, PageState::Spilled);  // still staged in the spill file
          punch_locked(p * ps, ps);
        } else {
          PageEntry* e = set_page_state(p, PageState::Dirty);
          if (touch) e->flags |= PageEntry::kReferenced;
        }
      } else if (rc < 0 || invalidated) {
        drop_page(p);
      } else if (hole[i]) {
        set_page_state(p, PageState::Hole);
        punch_locked(p * ps, ps);
      } else {
        PageEntry* e = set_page_state(p, PageState::Clean);
        if (touch) e->flags |= PageEntry::kReferenced;
      }
    }
    waiters_.wake(mine);
    if (spill_rc < 0) {
      log_error("%s: reading staged pages back from the spill file failed: %s", name_.c_str(),
                std::strerror(-spill_rc));
      return spill_rc;
    }
    if (rc == -ESTALE) {
      SourceIdentity now;
      if (source_->identity(now) == 0 && now == identity_) {
        // A short read of a source whose identity did not change: the file
        // is shorter than its snapshot says. Never retry forever.
        log_error("%s: the source is shorter than its snapshot (%llu bytes)", name_.c_str(),
                  static_cast<unsigned long long>(base_size_));
        return -EIO;
      }
      if (!source_changed_locked()) return -EIO;
      continue;  // re-snapshotted: load from the new source
    }
    if (rc < 0) {
      log_error("%s: reading the source failed: %s", name_.c_str(), std::strerror(-rc));
      return rc;
    }
  }
}

void File::set_readahead(uint64_t max, PrefetchHook prefetch) {
  MutexLock lk(mutex_);
  readahead_.set_max(max);
  prefetch_hook_ = std::move(prefetch);
}

void File::note_read_locked(uint64_t off, uint64_t len) {
  if (readahead_.max() == 0 || !prefetch_hook_) return;
  const uint64_t ps = page_size_;
  const auto [from, to] = readahead_.follow(off, len, cut_);
  if (from >= to) return;
  uint64_t first = from / ps, last = div_up(to, ps);
  bool any_absent = false;
  for (uint64_t p = first; p < last && !any_absent; ++p) any_absent = map_.state(p) == PageState::Absent;
  if (any_absent) prefetch_hook_(weak_from_this(), first, last);
}

int File::prefetch(uint64_t first, uint64_t last) {
  MutexLock lk(mutex_);
  if (conflict_) return -EIO;
  return ensure_loaded(first, last, /*touch=*/false);
}

// ---------------------------------------------------------------- views

void File::add_view() {
  views.fetch_add(1, std::memory_order_acq_rel);
  // Loads from the source that started before see no view: wait for them.
  WriterLock gate(io_gate_);
}

int File::load_for_view(uint64_t off, uint64_t len) {
  const uint64_t ps = page_size_;
  constexpr uint64_t kSysPage = 4096;
  MutexLock lk(mutex_);
  for (;;) {
    if (off / kSysPage * kSysPage >= size_) return -EFAULT;  // a mapped file's SIGBUS
    const uint64_t end = std::min(off + std::max<uint64_t>(len, 1), size_);
    const uint64_t first = off / ps, last = div_up(end, ps);
    if (int rc = ensure_loaded(first, last); rc < 0) return rc;
    if (off / kSysPage * kSysPage >= size_) return -EFAULT;  // the lock was dropped
    bool again = false;
    for (uint64_t p = first; p < last && p * ps < size_; ++p) {
      PageEntry* e = map_.find(p);
      const PageState st = e ? e->state : PageState::Absent;
      if (is_loading(st) || (st == PageState::Absent && p * ps < cut_)) {
        again = true;  // evicted or taken by a loader meanwhile
        break;
      }
      if (!is_resident(st)) {
        // Zeros: a Hole or a page past the snapshot's end equals the base
        // (Clean); a page cut by a truncate holds staged zeros (Dirty).
        if (int rc = segment_->reserve((p + 1) * ps); rc < 0) return rc;
        std::memset(segment_->data() + p * ps, 0, ps);
        const bool base_zero = st == PageState::Hole || p * ps >= base_size_;
        e = set_page_state(p, base_zero ? PageState::Clean : PageState::Dirty);
      }
      e->flags |= PageEntry::kReferenced;
    }
    if (again) continue;
    // Readahead: a view faults only where the last window ended, so a touch
    // inside the window handed out counts as sequential.
    readahead_.touched_within(first * ps);
    note_read_locked(first * ps, (last - first) * ps);
    return 0;
  }
}

}  // namespace deferfs
