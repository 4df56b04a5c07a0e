// File: construction and restore, page-state bookkeeping, persistence of
// the header, snapshot validity, and reading resident pages out (see file.h
// for which part owns what).
#include "deferfs/file.h"

#include <fcntl.h>
#include <syslog.h>
#include <unistd.h>
#include <time.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <system_error>

#include "deferfs/cache.h"
#include "deferfs/log.h"
#include "file_internal.h"

namespace deferfs {

using namespace file_detail;

namespace file_detail {
alignas(4096) const char kZeros[kMaxPageSize] = {};
}  // namespace file_detail

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
      PersistedHeader& h = meta_->header();
      std::snprintf(h.instance, sizeof h.instance, "%s", persist->instance.c_str());
      h.file_id = persist->file_id;
      h.root_id = persist->root_id;
      segment_ = std::make_unique<Segment>(persist->prefix + ".seg", size_, false);
    } catch (const std::system_error& e) {
      log_error("%s: staged pages cannot outlive the daemon (%s); keeping them in private memory",
                name_.c_str(), e.what());
      meta_.reset();
      segment_.reset();
    }
  }
  if (!segment_) segment_ = std::make_unique<Segment>(name_, size_);
  MutexLock lk(mutex_);
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
  MutexLock lk(mutex_);
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
  if (cache) cache->remove(*this);
  MutexLock lk(mutex_);
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
  PageState from;
  PageEntry* e = map_.set_state(page, to, from);
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

std::string File::name() const {
  MutexLock lk(mutex_);
  return name_;
}

void File::set_name(std::string name) {
  MutexLock lk(mutex_);
  name_ = std::move(name);
  persist_header_locked();
}

void File::set_invalidate_hook(std::function<void()> hook) {
  MutexLock lk(mutex_);
  invalidate_hook_ = std::move(hook);
}

const char* File::page_bytes(uint64_t page) const { return segment_->data() + page * page_size_; }

bool File::page_is_zero(uint64_t page) const { return all_zero(page_bytes(page), page_size_); }

ssize_t File::load_for_read_locked(uint64_t off, size_t len) {
  if (off >= size_ || len == 0) return 0;
  len = static_cast<size_t>(std::min<uint64_t>(len, size_ - off));
  int rc = ensure_loaded(off / page_size_, div_up(off + len, page_size_));
  if (rc < 0) return rc;
  if (off >= size_) return 0;  // ensure_loaded may have dropped the lock
  return static_cast<ssize_t>(std::min<uint64_t>(len, size_ - off));
}

ssize_t File::read_pinned(uint64_t off, size_t len, std::vector<Extent>& out) {
  const uint64_t ps = page_size_;
  MutexLock lk(mutex_);
  const ssize_t got = load_for_read_locked(off, len);
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

bool File::access_waits(uint64_t off, size_t len, bool for_write) {
  const uint64_t ps = page_size_;
  MutexLock lk(mutex_);
  if (len == 0 || (!for_write && off >= size_) || off > UINT64_MAX - len) return false;
  // A read stops at the end of the file; a write's pages past the cut mark
  // are zeros, never read.
  const uint64_t end = for_write ? off + len : std::min<uint64_t>(off + len, size_);
  const uint64_t first = off / ps, last = div_up(end, ps);
  for (uint64_t p = first; p < last; ++p) {
    const bool partial = (p == first && off % ps) || (p == last - 1 && end % ps);
    const PageState st = map_.state(p);
    if (is_loading(st)) return true;
    if ((!for_write || partial) && ((st == PageState::Absent && p * ps < cut_) || st == PageState::Spilled))
      return true;
  }
  return false;
}

bool File::has_staged_locked() const {
  return map_.count(PageState::Dirty) + map_.count(PageState::Writeback) +
                 map_.count(PageState::Spilled) > 0 ||
         size_ != base_size_ || implicit_zero_pages_locked() > 0;
}

bool File::has_staged() {
  settle_pending();
  return has_staged_now();
}

bool File::has_staged_now() {
  MutexLock lk(mutex_);
  return has_staged_locked();
}

bool File::in_conflict() {
  MutexLock lk(mutex_);
  return conflict_;
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
  // Every page is forgotten. Pages being loaded are marked invalidated (their loader
  // drops them); the others are forgotten, and their memory punched in the
  // runs between the loading ones: one fallocate for the common case, not
  // one per page (a 1 GiB file: 262,144 system calls under the lock).
  std::vector<uint64_t> all = map_.collect(0, std::numeric_limits<uint64_t>::max(),
                                           [](const PageEntry&) { return true; });
  const uint64_t ps = page_size_;
  uint64_t next_free = 0;
  for (uint64_t p : all) {
    const PageState st = map_.state(p);
    if (is_loading(st)) {
      if (st == PageState::Loading) set_page_state(p, PageState::LoadingInvalidated);
      if (p > next_free) punch_locked(next_free * ps, (p - next_free) * ps);
      next_free = p + 1;
    } else if (st == PageState::Spilled) {
      drop_page(p);  // its spill file's block too (a discard of a conflict)
    } else {
      set_page_state(p, PageState::Absent);
    }
  }
  punch_locked(next_free * ps, segment_->capacity() - std::min(segment_->capacity(), next_free * ps));
  identity_ = now;
  base_size_ = size_ = cut_ = now.size;
  source_->forget_cached();  // a network client may still cache the old pages
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
  MutexLock lk(mutex_);
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

ssize_t File::read(uint64_t off, size_t len, std::vector<iovec>& out) {
  const uint64_t ps = page_size_;
  MutexLock lk(mutex_);
  if (off >= size_ || len == 0) return 0;
  len = static_cast<size_t>(std::min<uint64_t>(len, size_ - off));
  const uint64_t first = off / ps, last = div_up(off + len, ps);
  int rc = ensure_loaded(first, last);
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
  MutexLock lk(mutex_);
  const ssize_t got = load_for_read_locked(off, len);
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

File::Info File::info() {
  MutexLock lk(mutex_);
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
