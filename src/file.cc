#include "deferfs/file.h"

#include <fcntl.h>
#include <syslog.h>
#include <unistd.h>
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

File::File(std::unique_ptr<Source> source, uint64_t page_size, Counters& counters, std::string name,
           const PersistConfig* persist)
    : page_size_(page_size), source_(std::move(source)), counters_(counters), name_(std::move(name)) {
  if (page_size_ < 4096 || page_size_ > kMaxPageSize || (page_size_ & (page_size_ - 1)))
    throw std::invalid_argument("page size must be a power of two in 4k..2M");
  int rc = source_->identity(identity_);
  if (rc < 0) throw std::system_error(-rc, std::generic_category(), "fstat of " + name_);
  base_size_ = size_ = cut_ = identity_.size;
  if (persist) {
    source_root_ = persist->source_root;
    try {
      meta_ = PersistMeta::create(persist->prefix + ".meta", div_up(size_, page_size_));
      segment_ = std::make_unique<Segment>(persist->prefix + ".seg", size_, false);
    } catch (const std::system_error& e) {
      log_error("%s: staged pages cannot outlive the daemon (%s); keeping them in private memory",
                name_.c_str(), e.what());
      meta_.reset();
      segment_.reset();
    }
  }
  if (!segment_) segment_ = std::make_unique<Segment>(name_, size_);
  persist_header_locked();
}

File::File(std::unique_ptr<Source> source, Counters& counters, std::string name,
           std::unique_ptr<PersistMeta> meta, const std::string& segment_path, uint64_t& restored)
    : page_size_(meta->header().page_size),
      source_(std::move(source)),
      counters_(counters),
      name_(std::move(name)),
      meta_(std::move(meta)) {
  if (page_size_ < 4096 || page_size_ > kMaxPageSize || (page_size_ & (page_size_ - 1)))
    throw std::system_error(EINVAL, std::generic_category(), "bad page size in " + meta_->path());
  const PersistedHeader& h = meta_->header();
  identity_.dev = static_cast<dev_t>(h.dev);
  identity_.ino = static_cast<ino_t>(h.ino);
  identity_.size = h.id_size;
  identity_.mtime = {static_cast<time_t>(h.id_mtime_sec), static_cast<long>(h.id_mtime_nsec)};
  identity_.ctime = {static_cast<time_t>(h.id_ctime_sec), static_cast<long>(h.id_ctime_nsec)};
  base_size_ = h.base_size;
  size_ = h.size;
  cut_ = std::min({h.cut, base_size_, size_});
  staged_mtime_ = {static_cast<time_t>(h.staged_mtime_sec), static_cast<long>(h.staged_mtime_nsec)};
  explicit_mtime_ = h.explicit_mtime != 0;
  source_root_.assign(h.source_root, strnlen(h.source_root, sizeof h.source_root));
  segment_ = std::make_unique<Segment>(segment_path, size_, true);
  // Rebuild the staged pages; everything else in the segment (clean pages
  // of the old daemon, unknown now) is given back.
  std::lock_guard lk(mutex_);
  uint64_t next_free = 0;
  restored = 0;
  for (uint64_t p : meta_->staged_pages()) {
    if (p * page_size_ >= size_) {
      meta_->set(p, PersistedPage::None);
      continue;
    }
    if (meta_->get(p) == PersistedPage::InSegment) {
      set_page_state(p, PageState::Dirty);
      if (p > next_free) punch_locked(next_free * page_size_, (p - next_free) * page_size_);
      next_free = p + 1;
    } else {
      set_page_state(p, PageState::Spilled);
    }
    ++restored;
  }
  punch_locked(next_free * page_size_, segment_->capacity() - std::min(segment_->capacity(), next_free * page_size_));
  meta_->keep(false);
}

File::~File() {
  std::lock_guard lk(mutex_);
  // Staged data outlives us (spec 6.5: a failed sync at unmount): keep the
  // named segment, metadata and spill file for the next mount.
  const bool keep = meta_ && has_staged_locked();
  if (meta_) meta_->keep(keep);
  segment_->keep(keep);
  if (!keep && spill_remover_ && map_.count(PageState::Spilled) == 0) spill_remover_();
  // Detach the metadata first: the loop below must not record those pages
  // as unstaged in a file kept for the next mount.
  std::unique_ptr<PersistMeta> meta = std::move(meta_);
  // Give the memory back to the gauges: the segment goes with us.
  for (uint64_t p : map_.collect(0, std::numeric_limits<uint64_t>::max(),
                                 [](const PageEntry&) { return true; })) {
    PageState st = map_.state(p);
    if (st == PageState::Loading) continue;  // impossible: loaders hold a reference
    set_page_state(p, PageState::Absent);
  }
  if (spill_fd_ >= 0) close(spill_fd_);
}

PageEntry* File::set_page_state(uint64_t page, PageState to) {
  const PageState from = map_.state(page);
  PageEntry* e = map_.set_state(page, to);
  if (from == to) return e;
  if (e && !(from == PageState::Dirty && to == PageState::Writeback))  // nullptr: now Absent
    e->flags &= static_cast<uint8_t>(~PageEntry::kDiffers);
  const int64_t ps = static_cast<int64_t>(page_size_);
  auto gauge = [&](PageState s, int64_t sign) {
    if (s == PageState::Clean)
      counters_.clean_bytes.fetch_add(sign * ps, std::memory_order_relaxed);
    else if (s == PageState::Dirty || s == PageState::Writeback)
      counters_.dirty_mem_bytes.fetch_add(sign * ps, std::memory_order_relaxed);
    else if (s == PageState::Spilled)
      counters_.spilled_bytes.fetch_add(sign * ps, std::memory_order_relaxed);
  };
  gauge(from, -1);
  gauge(to, +1);
  if (meta_) {
    PersistedPage v = PersistedPage::None;
    if (to == PageState::Dirty || to == PageState::Writeback)
      v = PersistedPage::InSegment;
    else if (to == PageState::Spilled || (to == PageState::Loading && from == PageState::Spilled))
      v = PersistedPage::InSpill;
    if (v != PersistedPage::None && meta_->reserve(page + 1) < 0) {
      log_error("%s: cannot record a staged page for recovery", name_.c_str());
    }
    meta_->set(page, v);
  }
  return e;
}

void File::persist_header_locked() {
  if (!meta_) return;
  PersistedHeader& h = meta_->header();
  h.page_size = static_cast<uint32_t>(page_size_);
  h.dev = identity_.dev;
  h.ino = identity_.ino;
  h.id_size = identity_.size;
  h.id_mtime_sec = identity_.mtime.tv_sec;
  h.id_mtime_nsec = identity_.mtime.tv_nsec;
  h.id_ctime_sec = identity_.ctime.tv_sec;
  h.id_ctime_nsec = identity_.ctime.tv_nsec;
  h.base_size = base_size_;
  h.size = size_;
  h.cut = cut_;
  h.staged_mtime_sec = staged_mtime_.tv_sec;
  h.staged_mtime_nsec = staged_mtime_.tv_nsec;
  h.explicit_mtime = explicit_mtime_;
  size_t n = std::min(name_.size(), sizeof h.path - 1);
  std::memcpy(h.path, name_.data(), n);
  h.path[n] = 0;
  h.path_len = static_cast<uint32_t>(n);
  n = std::min(source_root_.size(), sizeof h.source_root - 1);
  std::memcpy(h.source_root, source_root_.data(), n);
  h.source_root[n] = 0;
}

void File::set_spill_opener(std::function<int()> opener, std::function<void()> remover) {
  std::lock_guard lk(mutex_);
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

void File::set_name(std::string name) {
  std::lock_guard lk(mutex_);
  name_ = std::move(name);
  persist_header_locked();
}

void File::set_invalidate_hook(std::function<void()> hook) {
  std::lock_guard lk(mutex_);
  invalidate_hook_ = std::move(hook);
}

const char* File::page_bytes(uint64_t page) const { return segment_->data() + page * page_size_; }

bool File::page_is_zero(uint64_t page) const { return all_zero(page_bytes(page), page_size_); }


void File::punch_locked(uint64_t off, uint64_t len) {
  if (pins_ == 0) {
    segment_->punch(off, len);
    return;
  }
  pending_punch_.push_back({off, len});
}

ssize_t File::load_for_read_locked(std::unique_lock<std::mutex>& lk, uint64_t off, size_t len) {
  if (off >= size_ || len == 0) return 0;
  len = static_cast<size_t>(std::min<uint64_t>(len, size_ - off));
  int rc = ensure_loaded(lk, off / page_size_, div_up(off + len, page_size_));
  if (rc < 0) return rc;
  if (off >= size_) return 0;  // ensure_loaded may have dropped the lock
  return static_cast<ssize_t>(std::min<uint64_t>(len, size_ - off));
}

ssize_t File::read_pinned(uint64_t off, size_t len, std::vector<Extent>& out) {
  const uint64_t ps = page_size_;
  std::unique_lock lk(mutex_);
  const ssize_t got = load_for_read_locked(lk, off, len);
  if (got <= 0) return got;
  len = static_cast<size_t>(got);
  for (uint64_t p = off / ps; p * ps < off + len; ++p) {
    uint64_t a = std::max(off, p * ps), b = std::min(off + len, (p + 1) * ps);
    PageEntry* e = map_.find(p);
    if (e) e->flags |= PageEntry::kReferenced;
    const bool zeros = !(e && is_resident(e->state));
    if (!out.empty() && out.back().zeros == zeros && (zeros || out.back().off + out.back().len == a))
      out.back().len += b - a;
    else
      out.push_back({zeros, a, b - a, zeros ? nullptr : segment_->data() + a});
  }
  ++pins_;
  note_read_locked(off, len);
  return static_cast<ssize_t>(len);
}

void File::set_readahead(uint64_t max, PrefetchHook prefetch) {
  std::lock_guard lk(mutex_);
  ra_max_ = max;
  prefetch_hook_ = std::move(prefetch);
}

void File::note_read_locked(uint64_t off, uint64_t len) {
  if (ra_max_ == 0 || !prefetch_hook_) return;
  const uint64_t ps = page_size_;
  const uint64_t end = off + len;
  if (off == ra_next_) {
    ra_window_ = ra_window_ ? std::min(ra_window_ * 2, ra_max_) : std::min<uint64_t>(128 << 10, ra_max_);
  } else {
    ra_window_ = 0;  // a seek: random access loads only what it touches
    ra_issued_ = 0;
  }
  ra_next_ = end;
  if (ra_window_ == 0) return;
  // The window past this read, less what was handed out already; only the
  // source's part (below the cut) needs loading.
  const uint64_t from = std::max(end, ra_issued_);
  const uint64_t to = std::min(end + ra_window_, cut_);
  if (from >= to) return;
  uint64_t first = from / ps, last = div_up(to, ps);
  bool any_absent = false;
  for (uint64_t p = first; p < last && !any_absent; ++p) any_absent = map_.state(p) == PageState::Absent;
  ra_issued_ = to;
  if (any_absent) prefetch_hook_(weak_from_this(), first, last);
}

int File::prefetch(uint64_t first, uint64_t last) {
  std::unique_lock lk(mutex_);
  if (conflict_) return -EIO;
  return ensure_loaded(lk, first, last, /*touch=*/false);
}

void File::unpin() {
  std::lock_guard lk(mutex_);
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
    std::lock_guard lk(mutex_);
    fd = spill_fd_;
  }
  if (fd < 0) return -EIO;
  ssize_t n = pread(fd, out, page_size_, static_cast<off_t>(page * page_size_));
  if (n < 0) return -errno;
  if (static_cast<uint64_t>(n) < page_size_) std::memset(out + n, 0, page_size_ - static_cast<size_t>(n));
  return 0;
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
  std::lock_guard lk(mutex_);
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

bool File::has_staged_locked() const {
  return map_.count(PageState::Dirty) + map_.count(PageState::Writeback) +
                 map_.count(PageState::Spilled) > 0 ||
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
  char* seg = segment_->data();
  while (off < end) {
    int64_t d = source_->next_data(off);
    if (d < 0) return static_cast<int>(d);
    uint64_t data = std::max<uint64_t>(static_cast<uint64_t>(d), off);
    // Pages whose bytes (up to the end of the file) all lie in [off, data)
    // are holes: zeros, never read, nothing resident.
    for (uint64_t p = div_up(off, ps); p < first + count && p * ps < std::min(data, end); ++p)
      if (std::min((p + 1) * ps, base_size) <= data) hole[p - first] = 1;
    if (data >= end) break;
    int64_t h = source_->next_hole(data);
    if (h < 0) return static_cast<int>(h);
    uint64_t read_start = std::max(off, data / ps * ps);
    uint64_t read_end = std::min(end, div_up(std::max<uint64_t>(static_cast<uint64_t>(h), data + 1), ps) * ps);
    ssize_t n = source_->read(seg + read_start, read_end - read_start, read_start);
    if (n < 0) return static_cast<int>(n);
    if (static_cast<uint64_t>(n) < read_end - read_start) return -ESTALE;  // source shrank
    // The last page past the end of the file reads as zeros, whatever its
    // memory held (a punch may still be deferred).
    if (read_end % ps) std::memset(seg + read_end, 0, ps - read_end % ps);
    counters_.loaded_bytes.fetch_add(static_cast<uint64_t>(n), std::memory_order_relaxed);
    off = read_end;
  }
  return 0;
}

int File::ensure_loaded(std::unique_lock<std::mutex>& lk, uint64_t first, uint64_t last, bool touch) {
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
      loaded_cv_.wait(lk);
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
    const int spill_fd = spill_fd_;

    // I/O with the lock released; I5: only we write these pages' bytes.
    lk.unlock();
    std::vector<char> hole(mine.size(), 0);
    int rc = 0, spill_rc = 0;
    for (size_t i = 0; i < mine.size(); ++i) {
      if (!from_spill[i]) continue;
      ssize_t n = pread(spill_fd, segment_->data() + mine[i] * ps, ps, static_cast<off_t>(mine[i] * ps));
      if (n != static_cast<ssize_t>(ps)) spill_rc = n < 0 ? -errno : -EIO;
    }
    if (from_source) {
      std::shared_lock gate(io_gate_);
      for (size_t i = 0; i < mine.size() && rc == 0;) {
        if (from_spill[i]) {
          ++i;
          continue;
        }
        size_t j = i + 1;
        while (j < mine.size() && !from_spill[j] && mine[j] == mine[j - 1] + 1) ++j;
        std::vector<char> run_hole(j - i, 0);
        rc = load_run(mine[i], j - i, base_size, run_hole);
        std::copy(run_hole.begin(), run_hole.end(), hole.begin() + static_cast<long>(i));
        i = j;
      }
      // The guard of spec 5.2: trust what was read only if the source is
      // still the snapshot's version (a reflink clone cannot change).
      SourceIdentity now;
      if (rc == 0 && !source_->stable() && (rc = source_->identity(now)) == 0 && now != expected) rc = -ESTALE;
    }
    lk.lock();

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
    loaded_cv_.notify_all();
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
      set_page_state(p, PageState::LoadingInvalidated);
    else if (st != PageState::LoadingInvalidated)
      drop_page(p);
  }
  identity_ = now;
  base_size_ = size_ = cut_ = now.size;
  if (int rc = source_->refresh(); rc < 0)
    log_error("%s: cannot take a new reflink snapshot: %s", name_.c_str(), std::strerror(-rc));
  segment_->reserve(size_);
  ++generation_;
  conflict_ = false;
  staged_mtime_ = {};
  stale_kernel_cache_ = true;
  persist_header_locked();
  if (invalidate_hook_) invalidate_hook_();
}

File::Validity File::revalidate() {
  std::lock_guard lk(mutex_);
  SourceIdentity now;
  if (source_->identity(now) < 0) return conflict_ ? Validity::Conflict : Validity::Unchanged;
  if (now == identity_) return conflict_ ? Validity::Conflict : Validity::Unchanged;
  if (source_->stable() && !has_staged_locked() && handles.load() > 0) {
    // A reflink snapshot in use keeps showing its version (spec 5.1: a new
    // snapshot is taken at an open while none is live).
    return Validity::Unchanged;
  }
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
  char* seg = segment_->data();
  for (uint64_t p = first; p * ps < off + len; ++p) {
    uint64_t a = std::max(off, p * ps), b = std::min(off + len, (p + 1) * ps);
    PageEntry* e = map_.find(p);
    if (e) e->flags |= PageEntry::kReferenced;
    const char* src = e && is_resident(e->state) ? seg + a : kZeros + (a - p * ps);
    if (!out.empty() && static_cast<char*>(out.back().iov_base) + out.back().iov_len == src)
      out.back().iov_len += b - a;
    else
      out.push_back({const_cast<char*>(src), b - a});
  }
  return static_cast<ssize_t>(len);
}

ssize_t File::read_into(uint64_t off, size_t len, char* out) {
  std::unique_lock lk(mutex_);
  const ssize_t got = load_for_read_locked(lk, off, len);
  if (got <= 0) return got;
  len = static_cast<size_t>(got);
  copy_out_locked(off, len, out);
  note_read_locked(off, len);
  return static_cast<ssize_t>(len);
}

void File::copy_out_locked(uint64_t off, size_t len, char* out) {
  const uint64_t ps = page_size_;
  const char* seg = segment_->data();
  for (uint64_t p = off / ps; p * ps < off + len; ++p) {
    uint64_t a = std::max(off, p * ps), b = std::min(off + len, (p + 1) * ps);
    PageEntry* e = map_.find(p);
    if (e) e->flags |= PageEntry::kReferenced;
    if (e && is_resident(e->state))
      std::memcpy(out + (a - off), seg + a, b - a);
    else
      std::memset(out + (a - off), 0, b - a);
  }
}

// ---------------------------------------------------------------- writing

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

ssize_t File::write(const char* buf, size_t len, uint64_t off, bool writeback) {
  const uint64_t ps = page_size_;
  if (len == 0) return 0;
  if (off > std::numeric_limits<uint64_t>::max() - len) return -EFBIG;
  std::unique_lock lk(mutex_);
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
    if (off % ps && (rc = ensure_loaded(lk, first, first + 1)) < 0) return rc;
    if (end % ps && (rc = ensure_loaded(lk, last - 1, last)) < 0) return rc;
    bool busy = false;
    for (uint64_t p = first; p < last && !busy; ++p) {
      PageState st = map_.state(p);
      bool partial = (p == first && off % ps) || (p == last - 1 && end % ps);
      busy = is_loading(st) ||
             (partial && ((st == PageState::Absent && p * ps < cut_) || st == PageState::Spilled));
    }
    if (!busy) break;
    loaded_cv_.wait(lk);
  }

  char* seg = segment_->data();
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
    const bool zero_now = st == PageState::Hole || p * ps >= cut_;
    if (zero_now && all_zero(src, b - a)) {
      counters_.skipped_pages.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    // The page reads as zeros: make its memory say so explicitly (a punch of
    // it may still be deferred while a reply is pinned), then copy in.
    std::memset(seg + p * ps, 0, ps);
    std::memcpy(dst, src, b - a);
    PageEntry* e = set_page_state(p, PageState::Dirty);
    if (st == PageState::Hole || p * ps >= base_size_) {
      e->has_base_hash = true;  // the base is zeros
      e->base_hash = zero_hash;
      if (all_zero(seg + p * ps, ps))
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
  if (!candidates.empty()) settle_candidates(lk, candidates);
  raise_cut_locked();
  return static_cast<ssize_t>(asked);
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
    ok = ok && (source_->stable() || (source_->identity(now) == 0 && now == expected));
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
      set_page_state(p, PageState::Clean)->flags &= static_cast<uint8_t>(~PageEntry::kSpilling);
      counters_.skipped_pages.fetch_add(1, std::memory_order_relaxed);
    } else {
      e->has_base_hash = true;
      e->base_hash = hash32(b, ps);
      e->flags |= PageEntry::kDiffers;  // just compared, under the lock
    }
  }
}

int File::truncate(uint64_t new_size) {
  const uint64_t ps = page_size_;
  std::lock_guard cm(commit_mutex_);
  std::unique_lock lk(mutex_);
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
      if ((rc = ensure_loaded(lk, pp, pp + 1)) < 0) return rc;
      if (!is_loading(map_.state(pp))) break;
      loaded_cv_.wait(lk);
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

// ---------------------------------------------------------------- commit

CommitPlan File::begin_commit() {
  const uint64_t ps = page_size_;
  std::lock_guard lk(mutex_);
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

bool File::recheck_after_commit(uint64_t max_pages, bool force) {
  const uint64_t ps = page_size_;
  std::unique_lock lk(mutex_);
  bool changed = force;
  if (!changed) {
    std::vector<uint64_t> clean = map_.collect(0, std::numeric_limits<uint64_t>::max(), [](const PageEntry& e) {
      return e.state == PageState::Clean;
    });
    if (clean.empty() || clean.size() > max_pages) return false;
    const uint64_t gen = generation_;
    lk.unlock();
    std::vector<char> bytes(clean.size() * ps, 0);
    std::vector<ReadRequest> reads;
    for (size_t i = 0; i < clean.size(); ++i) reads.push_back({bytes.data() + i * ps, ps, clean[i] * ps});
    int rc = source_->read_batch_live(reads);
    lk.lock();
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
  std::lock_guard lk(mutex_);
  bool stale = stale_kernel_cache_;
  stale_kernel_cache_ = false;
  return stale;
}

SourceIdentity File::identity() {
  std::lock_guard lk(mutex_);
  return identity_;
}

void File::mark_conflict() {
  std::lock_guard lk(mutex_);
  if (!conflict_)
    log_error("%s: changed outside the mount during a sync (conflict): "
              "`deferfs sync --force` writes the staged pages over it, "
              "`deferfs discard` drops them", name_.c_str());
  conflict_ = true;
}

void File::adopt_metadata_change(bool times_set) {
  std::lock_guard lk(mutex_);
  SourceIdentity now;
  if (source_->identity(now) < 0 || now == identity_) return;
  const bool same_data = now.dev == identity_.dev && now.ino == identity_.ino && now.size == identity_.size &&
                         (times_set || (now.mtime.tv_sec == identity_.mtime.tv_sec &&
                                        now.mtime.tv_nsec == identity_.mtime.tv_nsec));
  if (same_data) identity_ = now;
  persist_header_locked();
}

void File::end_commit(const CommitPlan& plan, bool ok, bool forced, const SourceIdentity* ours) {
  std::lock_guard lk(mutex_);
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

uint64_t File::discard() {
  const uint64_t ps = page_size_;
  std::lock_guard cm(commit_mutex_);
  std::unique_lock lk(mutex_);
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

// ---------------------------------------------------------------- memory

uint64_t File::clean_pages() {
  std::lock_guard lk(mutex_);
  return map_.count(PageState::Clean);
}

uint64_t File::dirty_resident_pages() {
  std::lock_guard lk(mutex_);
  return map_.count(PageState::Dirty);
}

uint64_t File::evict_clean(uint64_t max_pages) {
  const uint64_t ps = page_size_;
  std::lock_guard lk(mutex_);
  std::vector<uint64_t> victims;
  // Two turns of the clock at most: the first clears reference bits.
  size_t budget = map_.capacity() * 2;
  while (victims.size() < max_pages && budget > 0) {
    size_t step = std::min<size_t>(budget, 4096);
    budget -= map_.sweep(clock_hand_, step, [&](uint64_t p, PageEntry& e) {
      // A Clean page at or above the cut would read as zeros once Absent.
      if (victims.size() >= max_pages || e.state != PageState::Clean || p * ps >= cut_) return;
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
  std::unique_lock lk(mutex_);
  if (int rc = ensure_spill_file_locked(); rc < 0) return rc;
  std::vector<uint64_t> victims = map_.collect(0, std::numeric_limits<uint64_t>::max(), [](const PageEntry& e) {
    return e.state == PageState::Dirty && !(e.flags & PageEntry::kSpilling);
  });
  if (victims.size() > max_pages) victims.resize(max_pages);
  if (victims.empty()) return 0;
  for (uint64_t p : victims) map_.find(p)->flags |= PageEntry::kSpilling;
  const int fd = spill_fd_;
  lk.unlock();
  // Copy out with the lock released; a write meanwhile clears kSpilling and
  // the page then stays Dirty in memory (the copy is stale, never used).
  int rc = 0;
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
  lk.lock();
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

File::Info File::info() {
  std::lock_guard lk(mutex_);
  Info i;
  i.size = size_;
  i.dirty_pages = map_.count(PageState::Dirty) + map_.count(PageState::Writeback) +
                  map_.count(PageState::Spilled) + implicit_zero_pages_locked();
  i.spilled_pages = map_.count(PageState::Spilled);
  i.resident_pages = map_.count(PageState::Clean) + map_.count(PageState::Dirty) +
                     map_.count(PageState::Writeback);
  i.staged = has_staged_locked();
  i.conflict = conflict_;
  i.staged_mtime = staged_mtime_;
  i.explicit_mtime = explicit_mtime_;
  i.map_bytes = map_.memory_bytes();
  i.resident_bytes = segment_->resident_bytes();
  return i;
}

}  // namespace deferfs
