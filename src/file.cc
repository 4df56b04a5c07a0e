#include "deferfs/file.h"

#include <syslog.h>
#include <time.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <system_error>

#include "deferfs/log.h"

namespace deferfs {

namespace {

constexpr uint64_t kMaxPageSize = uint64_t{2} << 20;
// Served for holes and cut pages; never written.
alignas(4096) const char kZeros[kMaxPageSize] = {};

uint64_t div_up(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

bool all_zero(const char* p, size_t n) {
  return n == 0 || (p[0] == 0 && std::memcmp(p, p + 1, n - 1) == 0);
}

uint32_t hash32(const char* p, size_t n) { return static_cast<uint32_t>(XXH3_64bits(p, n)); }

struct timespec now_realtime() {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return ts;
}

}  // namespace

File::File(std::unique_ptr<Source> source, uint64_t page_size, Counters& counters, std::string name)
    : page_size_(page_size),
      source_(std::move(source)),
      counters_(counters),
      name_(std::move(name)),
      segment_(name_, 0) {
  if (page_size_ < 4096 || page_size_ > kMaxPageSize || (page_size_ & (page_size_ - 1)))
    throw std::invalid_argument("page size must be a power of two in 4k..2M");
  int rc = source_->identity(identity_);
  if (rc < 0) throw std::system_error(-rc, std::generic_category(), "fstat of " + name_);
  base_size_ = size_ = cut_ = identity_.size;
  rc = segment_.reserve(size_);
  if (rc < 0) throw std::system_error(-rc, std::generic_category(), "segment for " + name_);
}

File::~File() = default;

void File::set_name(std::string name) {
  std::lock_guard lk(mutex_);
  name_ = std::move(name);
}

void File::set_invalidate_hook(std::function<void()> hook) {
  std::lock_guard lk(mutex_);
  invalidate_hook_ = std::move(hook);
}

const char* File::page_bytes(uint64_t page) const { return segment_.data() + page * page_size_; }

bool File::page_is_zero(uint64_t page) const { return all_zero(page_bytes(page), page_size_); }

uint64_t File::page_hash(uint64_t page) const { return hash32(page_bytes(page), page_size_); }

void File::drop_page(uint64_t page) {
  PageState st = map_.state(page);
  map_.set_state(page, PageState::Absent);
  if (is_resident(st) || is_loading(st)) segment_.punch(page * page_size_, page_size_);
}

void File::touch_staged() { staged_mtime_ = now_realtime(); }

uint64_t File::implicit_zero_pages_locked() const {
  uint64_t first = div_up(cut_, page_size_);
  uint64_t last = div_up(std::min(size_, base_size_), page_size_);
  if (last <= first) return 0;
  uint64_t entries = map_.collect(first, last, [](const PageEntry&) { return true; }).size();
  return (last - first) - entries;
}

bool File::has_staged_locked() const {
  return map_.count(PageState::Dirty) + map_.count(PageState::Writeback) > 0 ||
         size_ != base_size_ || implicit_zero_pages_locked() > 0;
}

bool File::has_staged() {
  std::lock_guard lk(mutex_);
  return has_staged_locked();
}

bool File::in_conflict() {
  std::lock_guard lk(mutex_);
  return conflict_;
}

// ---------------------------------------------------------------- loading

int File::load_run(uint64_t first, uint64_t count, uint64_t base_size, std::vector<char>& hole) {
  const uint64_t ps = page_size_;
  uint64_t off = first * ps;
  const uint64_t end = std::min((first + count) * ps, base_size);
  char* seg = segment_.data();
  while (off < end) {
    int64_t d = source_->next_data(off);
    if (d < 0) return static_cast<int>(d);
    uint64_t data = std::max<uint64_t>(static_cast<uint64_t>(d), off);
    // Whole pages in [off, data) are holes: zeros, never read, nothing resident.
    for (uint64_t p = div_up(off, ps); (p + 1) * ps <= std::min(data, end) && p < first + count; ++p)
      hole[p - first] = 1;
    if (data >= end) break;
    int64_t h = source_->next_hole(data);
    if (h < 0) return static_cast<int>(h);
    uint64_t read_start = std::max(off, data / ps * ps);
    uint64_t read_end = std::min(end, div_up(std::max<uint64_t>(static_cast<uint64_t>(h), data + 1), ps) * ps);
    ssize_t n = source_->read(seg + read_start, read_end - read_start, read_start);
    if (n < 0) return static_cast<int>(n);
    if (static_cast<uint64_t>(n) < read_end - read_start) return -ESTALE;  // source shrank
    counters_.loaded_bytes.fetch_add(static_cast<uint64_t>(n), std::memory_order_relaxed);
    off = read_end;
  }
  return 0;
}

int File::ensure_loaded(std::unique_lock<std::mutex>& lk, uint64_t first, uint64_t last) {
  const uint64_t ps = page_size_;
  for (;;) {
    std::vector<uint64_t> mine;
    bool others_loading = false;
    for (uint64_t p = first; p < last; ++p) {
      PageState st = map_.state(p);
      if (st == PageState::Absent && p * ps < cut_)
        mine.push_back(p);
      else if (is_loading(st))
        others_loading = true;
    }
    if (mine.empty() && !others_loading) return 0;
    if (mine.empty()) {
      loaded_cv_.wait(lk);
      continue;
    }
    if (conflict_) {
      log_error("%s: changed outside the mount while it has staged changes; "
                "refusing to read pages of the new source (conflict)", name_.c_str());
      return -EIO;
    }
    for (uint64_t p : mine) map_.set_state(p, PageState::Loading);
    const SourceIdentity expected = identity_;
    const uint64_t base_size = base_size_;

    // I/O with the lock released; I5: only we write these pages' bytes.
    lk.unlock();
    std::vector<char> hole(mine.size(), 0);
    int rc = 0;
    {
      std::shared_lock gate(io_gate_);
      for (size_t i = 0; i < mine.size() && rc == 0;) {
        size_t j = i + 1;
        while (j < mine.size() && mine[j] == mine[j - 1] + 1) ++j;
        std::vector<char> run_hole(j - i, 0);
        rc = load_run(mine[i], j - i, base_size, run_hole);
        std::copy(run_hole.begin(), run_hole.end(), hole.begin() + static_cast<long>(i));
        i = j;
      }
      // The guard of spec 5.2: trust what was read only if the source is
      // still the snapshot's version.
      SourceIdentity now;
      if (rc == 0 && (rc = source_->identity(now)) == 0 && now != expected) rc = -ESTALE;
    }
    lk.lock();

    for (size_t i = 0; i < mine.size(); ++i) {
      uint64_t p = mine[i];
      if (rc < 0 || map_.state(p) == PageState::LoadingInvalidated) {
        drop_page(p);
      } else if (hole[i]) {
        map_.set_state(p, PageState::Hole);
        segment_.punch(p * ps, ps);
      } else {
        map_.set_state(p, PageState::Clean);
      }
    }
    loaded_cv_.notify_all();
    if (rc == -ESTALE) {
      if (!source_changed_locked()) return -EIO;
      continue;  // re-snapshotted: load from the new source
    }
    if (rc < 0) {
      log_error("%s: reading the source failed: %s", name_.c_str(), std::strerror(-rc));
      return rc;
    }
  }
}

bool File::source_changed_locked() {
  SourceIdentity now;
  if (source_->identity(now) < 0) return false;
  if (now == identity_) return true;
  if (has_staged_locked()) {
    if (!conflict_)
      log_error("%s: changed outside the mount while it has staged changes (conflict): "
                "`deferfs sync --force` writes the staged pages over it, "
                "`deferfs discard` drops them", name_.c_str());
    conflict_ = true;
    return false;
  }
  resnapshot_locked(now);
  return true;
}

void File::resnapshot_locked(const SourceIdentity& now) {
  log_info("%s: changed outside the mount; taking a new snapshot", name_.c_str());
  std::vector<uint64_t> all = map_.collect(0, std::numeric_limits<uint64_t>::max(),
                                           [](const PageEntry&) { return true; });
  for (uint64_t p : all) {
    PageState st = map_.state(p);
    if (st == PageState::Loading)
      map_.set_state(p, PageState::LoadingInvalidated);
    else if (st != PageState::LoadingInvalidated)
      drop_page(p);
  }
  identity_ = now;
  base_size_ = size_ = cut_ = now.size;
  segment_.reserve(size_);
  ++generation_;
  conflict_ = false;
  staged_mtime_ = {};
  if (invalidate_hook_) invalidate_hook_();
}

File::Validity File::revalidate() {
  std::lock_guard lk(mutex_);
  SourceIdentity now;
  if (source_->identity(now) < 0) return conflict_ ? Validity::Conflict : Validity::Unchanged;
  if (now == identity_) return conflict_ ? Validity::Conflict : Validity::Unchanged;
  if (!source_changed_locked()) return Validity::Conflict;
  return Validity::Resnapshotted;
}

// ---------------------------------------------------------------- reading

ssize_t File::read(uint64_t off, size_t len, std::vector<iovec>& out) {
  const uint64_t ps = page_size_;
  std::unique_lock lk(mutex_);
  if (off >= size_ || len == 0) return 0;
  len = static_cast<size_t>(std::min<uint64_t>(len, size_ - off));
  const uint64_t first = off / ps, last = div_up(off + len, ps);
  int rc = ensure_loaded(lk, first, last);
  if (rc < 0) return rc;
  // ensure_loaded may have dropped the lock: the size may have changed.
  if (off >= size_) return 0;
  len = static_cast<size_t>(std::min<uint64_t>(len, size_ - off));
  char* seg = segment_.data();
  for (uint64_t p = first; p * ps < off + len; ++p) {
    uint64_t a = std::max(off, p * ps), b = std::min(off + len, (p + 1) * ps);
    const char* src = is_resident(map_.state(p)) ? seg + a : kZeros + (a - p * ps);
    if (!out.empty() && static_cast<char*>(out.back().iov_base) + out.back().iov_len == src)
      out.back().iov_len += b - a;
    else
      out.push_back({const_cast<char*>(src), b - a});
  }
  return static_cast<ssize_t>(len);
}

// ---------------------------------------------------------------- writing

void File::dirty_clean_page(uint64_t page) {
  uint32_t h = hash32(page_bytes(page), page_size_);
  PageEntry* e = map_.set_state(page, PageState::Dirty);
  e->has_base_hash = true;
  e->base_hash = h;
}

ssize_t File::write(const char* buf, size_t len, uint64_t off) {
  const uint64_t ps = page_size_;
  if (len == 0) return 0;
  if (off > std::numeric_limits<uint64_t>::max() - len) return -EFBIG;
  const uint64_t end = off + len;
  std::unique_lock lk(mutex_);
  int rc = segment_.reserve(end);
  if (rc < 0) return rc;
  const uint64_t first = off / ps, last = div_up(end, ps);

  // Make the partially written pages resident (their other bytes must be
  // kept) and wait out loads of any page in the range (I5). Repeat until it
  // holds with the lock held, as ensure_loaded may drop it.
  for (;;) {
    if (off % ps && (rc = ensure_loaded(lk, first, first + 1)) < 0) return rc;
    if (end % ps && (rc = ensure_loaded(lk, last - 1, last)) < 0) return rc;
    bool busy = false;
    for (uint64_t p = first; p < last && !busy; ++p) {
      PageState st = map_.state(p);
      bool partial = (p == first && off % ps) || (p == last - 1 && end % ps);
      busy = is_loading(st) || (partial && st == PageState::Absent && p * ps < cut_);
    }
    if (!busy) break;
    loaded_cv_.wait(lk);
  }

  char* seg = segment_.data();
  std::vector<uint64_t> candidates;  // pages that may equal the base again
  const uint32_t zero_hash = hash32(kZeros, ps);
  for (uint64_t p = first; p < last; ++p) {
    const uint64_t a = std::max(off, p * ps), b = std::min(end, (p + 1) * ps);
    const char* src = buf + (a - off);
    char* dst = seg + a;
    const PageState st = map_.state(p);
    if (is_resident(st)) {
      if (std::memcmp(dst, src, b - a) == 0) {
        counters_.skipped_pages.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      if (st == PageState::Clean)
        dirty_clean_page(p);
      else if (st == PageState::Writeback)
        map_.set_state(p, PageState::Dirty);
      std::memcpy(dst, src, b - a);
      const PageEntry* e = map_.find(p);
      if (!e->has_base_hash || hash32(seg + p * ps, ps) == e->base_hash) candidates.push_back(p);
      continue;
    }
    // Hole, or Absent: zeros above the cut; below the cut only a full-page
    // write gets here (partial ones were loaded), and its old bytes do not
    // matter.
    const bool zero_now = st == PageState::Hole || p * ps >= cut_;
    if (zero_now && all_zero(src, b - a)) {
      counters_.skipped_pages.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    std::memcpy(dst, src, b - a);  // the rest of the page is zero (punched)
    PageEntry* e = map_.set_state(p, PageState::Dirty);
    if (st == PageState::Hole || p * ps >= base_size_) {
      e->has_base_hash = true;  // the base is zeros
      e->base_hash = zero_hash;
      if (all_zero(seg + p * ps, ps)) candidates.push_back(p);
    } else {
      e->has_base_hash = false;  // base unknown until compared with the source
      candidates.push_back(p);
    }
  }
  if (end > size_) size_ = end;
  touch_staged();
  if (!candidates.empty()) settle_candidates(lk, candidates);
  return static_cast<ssize_t>(len);
}

void File::settle_candidates(std::unique_lock<std::mutex>& lk, const std::vector<uint64_t>& pages) {
  const uint64_t ps = page_size_;
  const uint64_t gen = generation_;
  const uint64_t base_size = base_size_;
  const SourceIdentity expected = identity_;
  lk.unlock();
  std::vector<char> base(pages.size() * ps, 0);
  bool ok = true;
  {
    std::shared_lock gate(io_gate_);
    for (size_t i = 0; i < pages.size() && ok;) {
      size_t j = i + 1;
      while (j < pages.size() && pages[j] == pages[j - 1] + 1) ++j;
      uint64_t from = pages[i] * ps;
      if (from < base_size) {
        size_t want = static_cast<size_t>(std::min<uint64_t>((j - i) * ps, base_size - from));
        ssize_t n = source_->read(base.data() + i * ps, want, from);
        ok = n == static_cast<ssize_t>(want);
      }
      i = j;
    }
    SourceIdentity now;
    ok = ok && source_->identity(now) == 0 && now == expected;
  }
  lk.lock();
  // Leaving a page Dirty is always safe: sync compares with the source again.
  if (!ok || generation_ != gen) return;
  for (size_t i = 0; i < pages.size(); ++i) {
    uint64_t p = pages[i];
    PageEntry* e = map_.find(p);
    if (!e || e->state != PageState::Dirty) continue;
    const char* b = base.data() + i * ps;
    if (std::memcmp(page_bytes(p), b, ps) == 0) {
      map_.set_state(p, PageState::Clean);
      counters_.skipped_pages.fetch_add(1, std::memory_order_relaxed);
    } else {
      e->has_base_hash = true;
      e->base_hash = hash32(b, ps);
    }
  }
}

int File::truncate(uint64_t new_size) {
  const uint64_t ps = page_size_;
  std::lock_guard cm(commit_mutex_);
  std::unique_lock lk(mutex_);
  if (new_size == size_) return 0;
  int rc = segment_.reserve(new_size);
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
      if ((rc = ensure_loaded(lk, pp, pp + 1)) < 0) return rc;
      if (!is_loading(map_.state(pp))) break;
      loaded_cv_.wait(lk);
    }
    const PageState st = map_.state(pp);
    char* tail = segment_.data() + new_size;
    const size_t tail_len = static_cast<size_t>((pp + 1) * ps - new_size);
    if (is_resident(st) && !all_zero(tail, tail_len)) {
      if (st == PageState::Clean)
        dirty_clean_page(pp);
      else if (st == PageState::Writeback)
        map_.set_state(pp, PageState::Dirty);
      std::memset(tail, 0, tail_len);
    }
  }
  const uint64_t fp = div_up(new_size, ps);
  for (uint64_t p : map_.collect(fp, std::numeric_limits<uint64_t>::max(),
                                 [](const PageEntry&) { return true; })) {
    PageState st = map_.state(p);
    if (st == PageState::Loading)
      map_.set_state(p, PageState::LoadingInvalidated);
    else if (st != PageState::LoadingInvalidated)
      drop_page(p);
  }
  segment_.punch(fp * ps, segment_.capacity() - std::min(segment_.capacity(), fp * ps));
  cut_ = std::min(cut_, new_size);
  size_ = new_size;
  touch_staged();
  return 0;
}

// ---------------------------------------------------------------- commit

CommitPlan File::begin_commit() {
  const uint64_t ps = page_size_;
  std::lock_guard lk(mutex_);
  CommitPlan plan;
  plan.final_size = size_;
  plan.source_size = base_size_;
  plan.pages = map_.collect(0, div_up(size_, ps),
                            [](const PageEntry& e) { return e.state == PageState::Dirty; });
  for (uint64_t p : plan.pages) map_.set_state(p, PageState::Writeback);
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

void File::end_commit(const CommitPlan& plan, bool ok, bool forced) {
  std::lock_guard lk(mutex_);
  for (uint64_t p : plan.pages) {
    PageEntry* e = map_.find(p);
    if (!e) continue;  // cut by a truncate meanwhile (not possible under commit_mutex)
    if (e->state == PageState::Writeback) {
      map_.set_state(p, ok ? PageState::Clean : PageState::Dirty);
    } else if (ok && e->state == PageState::Dirty) {
      e->has_base_hash = false;  // the source holds whatever the commit wrote
    }
  }
  SourceIdentity now;
  if (source_->identity(now) == 0) {
    // Our own writes changed the source's mtime; the snapshot follows them.
    identity_ = now;
  }
  if (!ok) return;
  base_size_ = plan.final_size;
  cut_ = std::min(size_, plan.final_size);
  ++generation_;
  if (forced && conflict_) {
    // Pages loaded from the old source are not the new base: drop them.
    for (uint64_t p : map_.collect(0, std::numeric_limits<uint64_t>::max(), [](const PageEntry& e) {
           return e.state == PageState::Clean || e.state == PageState::Hole;
         }))
      drop_page(p);
  }
  conflict_ = false;
  if (!has_staged_locked()) staged_mtime_ = {};
}

uint64_t File::discard() {
  const uint64_t ps = page_size_;
  std::lock_guard cm(commit_mutex_);
  std::unique_lock lk(mutex_);
  uint64_t dropped = map_.count(PageState::Dirty) + map_.count(PageState::Writeback) +
                     implicit_zero_pages_locked();
  const uint64_t beyond = div_up(base_size_, ps);
  for (uint64_t p : map_.collect(0, std::numeric_limits<uint64_t>::max(),
                                 [](const PageEntry& e) { return is_staged(e.state); }))
    drop_page(p);
  for (uint64_t p : map_.collect(beyond, std::numeric_limits<uint64_t>::max(),
                                 [](const PageEntry& e) { return !is_loading(e.state); }))
    drop_page(p);
  segment_.punch(beyond * ps, segment_.capacity() - std::min(segment_.capacity(), beyond * ps));
  size_ = cut_ = base_size_;
  staged_mtime_ = {};
  if (conflict_) {
    SourceIdentity now;
    if (source_->identity(now) == 0) resnapshot_locked(now);
  }
  return dropped;
}

File::Info File::info() {
  std::lock_guard lk(mutex_);
  Info i;
  i.size = size_;
  i.dirty_pages = map_.count(PageState::Dirty) + map_.count(PageState::Writeback) +
                  implicit_zero_pages_locked();
  i.resident_pages = map_.count(PageState::Clean) + map_.count(PageState::Dirty) +
                     map_.count(PageState::Writeback);
  i.staged = has_staged_locked();
  i.conflict = conflict_;
  i.staged_mtime = staged_mtime_;
  i.map_bytes = map_.memory_bytes();
  i.resident_bytes = segment_.resident_bytes();
  return i;
}

}  // namespace deferfs
