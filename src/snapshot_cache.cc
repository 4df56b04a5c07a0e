#include "deferfs/snapshot_cache.h"

#include <sys/resource.h>

#include <algorithm>
#include <vector>

namespace deferfs {

namespace {
// Every so many keeps, look for kept snapshots whose source lost its last
// name from outside the mount (their fd would hold the blocks).
constexpr size_t kSweepEvery = 256;
}  // namespace

size_t SnapshotCache::default_max_files() {
  struct rlimit rl {};
  rlim_t nofile = getrlimit(RLIMIT_NOFILE, &rl) == 0 ? rl.rlim_cur : 1024;
  if (nofile == RLIM_INFINITY) nofile = 1 << 20;
  return std::clamp<size_t>(static_cast<size_t>(nofile / 4), 16, 1024);
}

void SnapshotCache::keep(dev_t dev, ino_t ino, std::shared_ptr<File> file) {
  std::vector<std::shared_ptr<File>> dead;  // destroyed after the lock
  MutexLock lk(mutex_);
  const Key key{dev, ino};
  if (auto it = entries_.find(key); it != entries_.end()) {
    // A second snapshot of the same source (opened while the first was on
    // its way here): the newer one is kept.
    dead.push_back(std::move(it->second.file));
    order_.erase(it->second.age);
    entries_.erase(it);
  }
  if (max_files_ == 0) {
    dead.push_back(std::move(file));
    return;
  }
  while (entries_.size() >= max_files_) {
    auto oldest = entries_.find(order_.front());
    dead.push_back(std::move(oldest->second.file));
    entries_.erase(oldest);
    order_.pop_front();
  }
  order_.push_back(key);
  entries_.emplace(key, Entry{std::move(file), std::prev(order_.end())});
  if (++keeps_since_sweep_ >= kSweepEvery) sweep_locked(dead);
}

std::shared_ptr<File> SnapshotCache::take(dev_t dev, ino_t ino) {
  MutexLock lk(mutex_);
  auto it = entries_.find({dev, ino});
  if (it == entries_.end()) return nullptr;
  std::shared_ptr<File> file = std::move(it->second.file);
  order_.erase(it->second.age);
  entries_.erase(it);
  return file;
}

void SnapshotCache::drop(dev_t dev, ino_t ino) {
  std::shared_ptr<File> dead = take(dev, ino);  // destroyed after the lock
}

size_t SnapshotCache::size() {
  MutexLock lk(mutex_);
  return entries_.size();
}

std::vector<std::shared_ptr<File>> SnapshotCache::files() {
  MutexLock lk(mutex_);
  std::vector<std::shared_ptr<File>> out;
  out.reserve(entries_.size());
  for (auto& [key, e] : entries_) out.push_back(e.file);
  return out;
}

void SnapshotCache::sweep_locked(std::vector<std::shared_ptr<File>>& dead) {
  keeps_since_sweep_ = 0;
  for (auto it = entries_.begin(); it != entries_.end();) {
    SourceIdentity now;
    if (it->second.file->source().identity(now) == 0 && now.nlink == 0) {
      dead.push_back(std::move(it->second.file));
      order_.erase(it->second.age);
      it = entries_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace deferfs
