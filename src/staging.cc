// File's staging: writes (with the skip-unchanged decision), truncation,
// the cut mark, discard.
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

ssize_t File::write(const char* buf, size_t len, uint64_t off, bool writeback) {
  const uint64_t ps = page_size_;
  if (len == 0) return 0;
  if (off > std::numeric_limits<uint64_t>::max() - len) return -EFBIG;
  MutexLock lk(mutex_);
  const size_t asked = len;
  if (writeback) {
    if (off >= size_) return static_cast<ssize_t>(asked);  // all past the end: nothing to keep
    len = static_cast<size_t>(std::min<uint64_t>(len, size_ - off));
  }
  const uint64_t end = off + len;
  int rc = segment_->reserve(end);
  if (rc < 0) return rc;
  const uint64_t first = off / ps, last = div_up(end, ps);

  // Make the partially written pages resident (their other bytes must be
  // kept) and wait out loads of any page in the range (I5). Repeat until it
  // holds with the lock held, as ensure_loaded may drop it.
  for (;;) {
    if (off % ps && (rc = ensure_loaded(first, first + 1)) < 0) return rc;
    if (end % ps && (rc = ensure_loaded(last - 1, last)) < 0) return rc;
    bool loading = false, unloaded = false;
    for (uint64_t p = first; p < last && !loading; ++p) {
      PageState st = map_.state(p);
      bool partial = (p == first && off % ps) || (p == last - 1 && end % ps);
      loading = is_loading(st);
      unloaded |= partial && ((st == PageState::Absent && p * ps < cut_) || st == PageState::Spilled);
    }
    if (loading)
      waiters_.wait(mutex_, first, last);  // a load of a page in the range settles
    else if (!unloaded)
      break;
    // else a partial page went away while the lock was dropped: load it again
  }

  char* seg = segment_->data();
  // Whole pages that hold nothing yet (Absent, Hole, past the cut) and take
  // bytes other than zeros over zeros: written through the segment's fd in
  // runs, before any state changes, so a failure (ENOSPC in /dev/shm)
  // changes nothing. by_fd[p - first] says which pages went that way.
  thread_local std::vector<uint8_t> by_fd;  // reused: no allocation per write
  by_fd.assign(last - first, 0);
  {
    uint64_t run = 0, run_len = 0;  // [run, run + run_len) of the segment
    auto flush = [&]() -> int {
      if (run_len == 0) return 0;
      const int frc = segment_->write(run, buf + (run - off), run_len);
      run_len = 0;
      if (frc < 0)  // none of these pages is resident: make them zeros again
        for (uint64_t q = first; q < last; ++q)
          if (by_fd[q - first]) segment_->punch(q * ps, ps);
      return frc;
    };
    for (uint64_t p = first; p < last; ++p) {
      const uint64_t a = std::max(off, p * ps), b = std::min(end, (p + 1) * ps);
      const PageState st = map_.state(p);
      const bool zero_now = st == PageState::Hole || p * ps >= cut_;
      const bool absent = !is_resident(st) && st != PageState::Spilled;
      if (!absent || b - a != ps || (zero_now && all_zero(buf + (a - off), ps))) {
        if ((rc = flush()) < 0) return rc;
        continue;
      }
      by_fd[p - first] = 1;
      if (run_len == 0) run = a;
      run_len += ps;
    }
    if ((rc = flush()) < 0) return rc;
  }

  std::vector<uint64_t> candidates;  // pages that may equal the base again
  const uint32_t zero_hash = hash32(kZeros, ps);
  for (uint64_t p = first; p < last; ++p) {
    const uint64_t a = std::max(off, p * ps), b = std::min(end, (p + 1) * ps);
    const char* src = buf + (a - off);
    char* dst = seg + a;
    const PageState st = map_.state(p);
    if (st == PageState::Spilled) {  // whole-page overwrite of a spilled page
      PageEntry* e = set_page_state(p, PageState::Dirty);
      e->flags |= PageEntry::kReferenced;
      std::memcpy(dst, src, b - a);
      if (!note_differs(p, e)) candidates.push_back(p);
      continue;
    }
    if (is_resident(st)) {
      if (std::memcmp(dst, src, b - a) == 0) {
        counters_.skipped_pages.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      if (st == PageState::Clean)
        dirty_clean_page(p);
      else if (st == PageState::Writeback)
        set_page_state(p, PageState::Dirty);
      std::memcpy(dst, src, b - a);
      PageEntry* e = map_.find(p);
      e->flags = static_cast<uint8_t>((e->flags | PageEntry::kReferenced) & ~PageEntry::kSpilling);
      if (!note_differs(p, e)) candidates.push_back(p);
      continue;
    }
    // Hole, or Absent: zeros above the cut; below the cut only a full-page
    // write gets here (partial ones were loaded), and its old bytes do not
    // matter.
    const bool whole = by_fd[p - first] != 0;  // its bytes are in the segment already
    const bool zero_now = st == PageState::Hole || p * ps >= cut_;
    if (!whole && zero_now && all_zero(src, b - a)) {
      counters_.skipped_pages.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    if (!whole) {
      // The page reads as zeros: make its memory say so explicitly (a punch
      // of it may still be deferred while a reply is pinned), then copy in.
      std::memset(seg + p * ps, 0, ps);
      std::memcpy(dst, src, b - a);
    }
    PageEntry* e = set_page_state(p, PageState::Dirty);
    if (st == PageState::Hole || p * ps >= base_size_) {
      e->has_base_hash = true;  // the base is zeros
      e->base_hash = zero_hash;
      // A whole page written by fd is not all zeros over zeros (see above);
      // a page written whole over a base of zeros below the cut may be.
      if (whole ? (!zero_now && all_zero(src, ps)) : all_zero(seg + p * ps, ps))
        candidates.push_back(p);
      else
        e->flags |= PageEntry::kDiffers;
    } else {
      e->has_base_hash = false;  // base unknown until compared with the source
      candidates.push_back(p);
    }
  }
  if (end > size_) size_ = end;
  touch_staged();
  for (uint64_t p : candidates) {
    if (p * ps < base_size_) {
      unsettled_ = true;  // the base must be read: left to settle_pending()
      continue;
    }
    // Past the snapshot's end the base is zeros: decided here, no I/O.
    if (page_is_zero(p)) {
      set_page_state(p, PageState::Clean)->flags &= static_cast<uint8_t>(~PageEntry::kSpilling);
      counters_.skipped_pages.fetch_add(1, std::memory_order_relaxed);
    } else {
      PageEntry* e = map_.find(p);
      e->has_base_hash = true;
      e->base_hash = zero_hash;
      e->flags |= PageEntry::kDiffers;
    }
  }
  raise_cut_locked();
  return static_cast<ssize_t>(asked);
}

bool File::note_differs(uint64_t page, PageEntry* e) {
  const bool differs = e->has_base_hash && hash32(page_bytes(page), page_size_) != e->base_hash;
  if (differs)
    e->flags |= PageEntry::kDiffers;
  else
    e->flags &= static_cast<uint8_t>(~PageEntry::kDiffers);
  return differs;
}

void File::dirty_clean_page(uint64_t page) {
  uint32_t h = hash32(page_bytes(page), page_size_);
  PageEntry* e = set_page_state(page, PageState::Dirty);
  e->has_base_hash = true;
  e->base_hash = h;
}

uint64_t File::settle_pending() {
  // Pages per batch: bounds the buffer the base bytes are read into (2 MiB
  // of 4 KiB pages: the daemon's memory stays within its limits, spec 7.2,
  // and one io_uring batch still covers many runs).
  constexpr size_t kBatchPages = 512;
  MutexLock lk(mutex_);
  if (!unsettled_) return 0;
  unsettled_ = false;  // a write from now on sets it again
  const std::vector<uint64_t> pages = map_.collect(0, std::numeric_limits<uint64_t>::max(), [](const PageEntry& e) {
    return e.state == PageState::Dirty && !(e.flags & PageEntry::kDiffers);
  });
  uint64_t equal = 0;
  for (size_t i = 0; i < pages.size(); i += kBatchPages) {
    const auto from = pages.begin() + static_cast<long>(i);
    const std::vector<uint64_t> batch(from, from + static_cast<long>(std::min(kBatchPages, pages.size() - i)));
    const int64_t n = settle_candidates(batch);
    if (n < 0) {
      unsettled_ = true;  // try again at the next look
      break;
    }
    equal += static_cast<uint64_t>(n);
  }
  return equal;
}

int64_t File::settle_candidates(const std::vector<uint64_t>& pages) {
  const uint64_t ps = page_size_;
  const uint64_t gen = generation_;
  const uint64_t base_size = base_size_;
  const SourceIdentity expected = identity_;
  std::vector<char> base(pages.size() * ps, 0);
  bool ok = true;
  {
    MutexUnlock unlocked(mutex_);
    ReaderLock gate(io_gate_);
    // One read per run of consecutive pages, all of them in one batch.
    std::vector<ReadRequest> reads;
    for (size_t i = 0; i < pages.size();) {
      size_t j = i + 1;
      while (j < pages.size() && pages[j] == pages[j - 1] + 1) ++j;
      const uint64_t from = pages[i] * ps;
      if (from < base_size)
        reads.push_back({base.data() + i * ps, static_cast<size_t>(std::min<uint64_t>((j - i) * ps, base_size - from)),
                         from});
      i = j;
    }
    ok = source_->read_batch(reads) == 0;
    for (const ReadRequest& r : reads) ok = ok && r.result == static_cast<ssize_t>(r.len);
    SourceIdentity now;
    ok = ok && (source_->stable() || (source_->identity(now) == 0 && now == expected));
  }
  // Leaving a page Dirty is always safe: sync compares with the source again.
  if (!ok || generation_ != gen) return -1;
  int64_t equal = 0;
  for (size_t i = 0; i < pages.size(); ++i) {
    uint64_t p = pages[i];
    PageEntry* e = map_.find(p);
    if (!e || e->state != PageState::Dirty) continue;
    const char* b = base.data() + i * ps;
    if (std::memcmp(page_bytes(p), b, ps) == 0) {
      set_page_state(p, PageState::Clean)->flags &= static_cast<uint8_t>(~PageEntry::kSpilling);
      counters_.skipped_pages.fetch_add(1, std::memory_order_relaxed);
      ++equal;
    } else {
      e->has_base_hash = true;
      e->base_hash = hash32(b, ps);
      e->flags |= PageEntry::kDiffers;  // just compared, under the lock
    }
  }
  return equal;
}

int File::truncate(uint64_t new_size) {
  const uint64_t ps = page_size_;
  MutexLock cm(commit_mutex_);
  MutexLock lk(mutex_);
  if (new_size == size_) return 0;
  int rc = segment_->reserve(new_size);
  if (rc < 0) return rc;
  if (new_size > size_) {  // pages past the old size read as zeros already (I2)
    size_ = new_size;
    touch_staged();
    return 0;
  }
  // The page that will hold the new end keeps its head: make it resident.
  if (new_size % ps) {
    const uint64_t pp = new_size / ps;
    for (;;) {
      if ((rc = ensure_loaded(pp, pp + 1)) < 0) return rc;
      if (!is_loading(map_.state(pp))) break;
      waiters_.wait(mutex_, pp, pp + 1);
    }
    const PageState st = map_.state(pp);
    char* tail = segment_->data() + new_size;
    const size_t tail_len = static_cast<size_t>((pp + 1) * ps - new_size);
    if (is_resident(st) && !all_zero(tail, tail_len)) {
      if (st == PageState::Clean)
        dirty_clean_page(pp);
      else if (st == PageState::Writeback)
        set_page_state(pp, PageState::Dirty);
      map_.find(pp)->flags &= static_cast<uint8_t>(~(PageEntry::kSpilling | PageEntry::kDiffers));
      std::memset(tail, 0, tail_len);
    }
  }
  const uint64_t fp = div_up(new_size, ps);
  for (uint64_t p : map_.collect(fp, std::numeric_limits<uint64_t>::max(),
                                 [](const PageEntry&) { return true; })) {
    PageState st = map_.state(p);
    if (st == PageState::Loading)
      set_page_state(p, PageState::LoadingInvalidated);
    else if (st != PageState::LoadingInvalidated)
      drop_page(p);
  }
  punch_locked(fp * ps, segment_->capacity() - std::min(segment_->capacity(), fp * ps));
  cut_ = std::min(cut_, new_size);
  size_ = new_size;
  touch_staged();
  return 0;
}

uint64_t File::discard() {
  const uint64_t ps = page_size_;
  MutexLock cm(commit_mutex_);
  MutexLock lk(mutex_);
  uint64_t dropped = map_.count(PageState::Dirty) + map_.count(PageState::Writeback) +
                     map_.count(PageState::Spilled) + implicit_zero_pages_locked();
  const uint64_t beyond = div_up(base_size_, ps);
  for (uint64_t p : map_.collect(0, std::numeric_limits<uint64_t>::max(),
                                 [](const PageEntry& e) { return is_staged(e.state); }))
    drop_page(p);
  for (uint64_t p : map_.collect(beyond, std::numeric_limits<uint64_t>::max(),
                                 [](const PageEntry& e) { return !is_loading(e.state); }))
    drop_page(p);
  punch_locked(beyond * ps, segment_->capacity() - std::min(segment_->capacity(), beyond * ps));
  size_ = cut_ = base_size_;
  staged_mtime_ = {};
  explicit_mtime_ = false;
  if (conflict_) {
    SourceIdentity now;
    if (source_->identity(now) == 0) resnapshot_locked(now);
  }
  persist_header_locked();
  return dropped;
}

void File::raise_cut_locked() {
  const uint64_t limit = std::min(size_, base_size_);
  while (cut_ < limit) {
    uint64_t p = cut_ / page_size_;
    if (map_.state(p) == PageState::Absent) break;
    cut_ = std::min((p + 1) * page_size_, limit);
  }
}

void File::touch_staged() {
  staged_mtime_ = now_realtime();
  explicit_mtime_ = false;
  persist_header_locked();
}

void File::set_explicit_mtime(const struct timespec& mtime) {
  MutexLock lk(mutex_);
  if (!has_staged_locked()) return;
  staged_mtime_ = mtime;
  explicit_mtime_ = true;
  persist_header_locked();
}

uint64_t File::implicit_zero_pages_locked() const {
  // Pages in [cut, min(size, base_size)) without an entry read as zeros. They
  // differ from the snapshot only where the source has data there: a hole
  // of the source is zeros too (a sparse file copied over itself stages
  // nothing). The source's data extents come from SEEK_DATA/SEEK_HOLE
  // (metadata only).
  const uint64_t ps = page_size_;
  uint64_t first = div_up(cut_, ps);
  uint64_t last = div_up(std::min(size_, base_size_), ps);
  if (last <= first) return 0;
  std::vector<std::pair<uint64_t, uint64_t>> data;  // page ranges [a, b) with source data
  uint64_t data_pages = 0;
  for (uint64_t off = first * ps; off < std::min(size_, base_size_);) {
    int64_t d = source_->next_data(off);
    if (d < 0) {  // cannot tell: assume data everywhere
      data.assign(1, {first, last});
      data_pages = last - first;
      break;
    }
    if (static_cast<uint64_t>(d) >= base_size_) break;
    int64_t h = source_->next_hole(static_cast<uint64_t>(d));
    uint64_t hole = h < 0 || static_cast<uint64_t>(h) <= static_cast<uint64_t>(d) ? base_size_ : static_cast<uint64_t>(h);
    uint64_t a = std::max(first, static_cast<uint64_t>(d) / ps), b = std::min(last, div_up(hole, ps));
    if (b > a) {
      data.push_back({a, b});
      data_pages += b - a;
    }
    if (hole <= off) break;
    off = hole;
  }
  if (data_pages == 0) return 0;
  uint64_t with_entry = 0;
  for (uint64_t p : map_.collect(first, last, [](const PageEntry&) { return true; })) {
    auto it = std::upper_bound(data.begin(), data.end(), std::make_pair(p, ~uint64_t{0}));
    if (it != data.begin() && p < std::prev(it)->second) ++with_entry;
  }
  return data_pages - with_entry;
}

}  // namespace deferfs
