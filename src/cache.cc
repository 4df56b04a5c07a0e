#include "deferfs/cache.h"

#include <algorithm>

namespace deferfs {

namespace {
// Work in batches so a balancer frees a useful amount per lock taken, and
// stop a little under the limit (hysteresis) so not every request balances.
constexpr uint64_t kBatchBytes = uint64_t{4} << 20;
}  // namespace

Cache::~Cache() {
  MutexLock lk(files_mutex_);
  // Files that outlive the Cache (none in a Daemon: it declares the Cache
  // first) must not come back to it.
  files_.clear_and_dispose([](File* f) { f->cache = nullptr; });
}

void Cache::add(const std::shared_ptr<File>& file) {
  MutexLock lk(files_mutex_);
  if (file->cache_hook.is_linked()) return;
  file->cache = this;
  files_.push_back(*file);
}

void Cache::remove(File& file) {
  MutexLock lk(files_mutex_);
  if (file.cache_hook.is_linked()) files_.erase(files_.iterator_to(file));
}

std::vector<std::shared_ptr<File>> Cache::live_files() {
  MutexLock lk(files_mutex_);
  std::vector<std::shared_ptr<File>> out;
  out.reserve(files_.size());
  // A File whose last reference just went is still listed until its
  // destructor takes this lock: lock() fails for it.
  for (File& f : files_)
    if (auto live = f.weak_from_this().lock()) out.push_back(std::move(live));
  // The next balancer starts one file further (round robin).
  if (files_.size() > 1) files_.splice(files_.end(), files_, files_.begin());
  return out;
}

void Cache::balance(File* hint) {
  int64_t clean = counters_.clean_bytes.load(std::memory_order_relaxed);
  int64_t dirty = counters_.dirty_mem_bytes.load(std::memory_order_relaxed);
  bool over_cache = cache_limit_ && clean > static_cast<int64_t>(cache_limit_);
  bool over_dirty = dirty_limit_ && dirty > static_cast<int64_t>(dirty_limit_);
  if (!over_cache && !over_dirty) return;
  MutexLock serial(balance_mutex_);
  clean = counters_.clean_bytes.load(std::memory_order_relaxed);
  dirty = counters_.dirty_mem_bytes.load(std::memory_order_relaxed);
  const int64_t slack_c = static_cast<int64_t>(std::min(kBatchBytes, cache_limit_ / 8));
  const int64_t slack_d = static_cast<int64_t>(std::min(kBatchBytes, dirty_limit_ / 8));
  if (cache_limit_ && clean > static_cast<int64_t>(cache_limit_))
    evict(static_cast<uint64_t>(clean - static_cast<int64_t>(cache_limit_) + slack_c), hint);
  if (dirty_limit_ && dirty > static_cast<int64_t>(dirty_limit_))
    spill(static_cast<uint64_t>(dirty - static_cast<int64_t>(dirty_limit_) + slack_d));
}

void Cache::evict(uint64_t bytes, File* hint) {
  std::vector<std::shared_ptr<File>> files = live_files();
  uint64_t freed = 0;
  // A file holding more than half the cache pays first, whichever file's
  // request pushed memory over (the hint is looked at first): one reader
  // cannot take the whole cache. With requests served concurrently (ring
  // workers), the balance after a small file's read often runs while a
  // streaming file's loads are in flight; left to the shares below, the
  // small file would pay as much as the stream.
  if (hint)
    std::stable_partition(files.begin(), files.end(), [hint](const auto& f) { return f.get() == hint; });
  for (auto& f : files) {
    if (freed >= bytes) break;
    uint64_t ps = f->page_size();
    if (f->clean_pages() * ps > cache_limit_ / 2) freed += f->evict_clean((bytes - freed + ps - 1) / ps) * ps;
  }
  // Then every file in turn, a share each, until enough is free; pages
  // touched since the last turn get a second chance inside evict_clean.
  for (int round = 0; round < 4 && freed < bytes && !files.empty(); ++round) {
    uint64_t share = std::max<uint64_t>((bytes - freed) / files.size(), 1);
    for (auto& f : files) {
      if (freed >= bytes) break;
      uint64_t ps = f->page_size();
      freed += f->evict_clean((share + ps - 1) / ps) * ps;
    }
  }
}

void Cache::spill(uint64_t bytes) {
  std::vector<std::shared_ptr<File>> files = live_files();
  // Largest staged-in-memory files first.
  std::vector<std::pair<uint64_t, File*>> order;
  for (auto& f : files) order.push_back({f->dirty_resident_pages() * f->page_size(), f.get()});
  std::sort(order.begin(), order.end(), [](auto& a, auto& b) { return a.first > b.first; });
  uint64_t done = 0;
  for (auto& [resident, f] : order) {
    if (done >= bytes || resident == 0) break;
    uint64_t ps = f->page_size();
    int64_t n = f->spill_dirty((std::min(bytes - done, resident) + ps - 1) / ps);
    if (n > 0) done += static_cast<uint64_t>(n) * ps;
  }
}

}  // namespace deferfs
