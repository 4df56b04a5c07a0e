// The memory budget of a mount (spec 3 cache_size and dirty_limit, spec 7.2).
//
// Clean pages above cache_size are evicted, by a clock over each file's own
// page table (second chance for touched pages; no list hooks, so the page
// map stays within 1% of materialized bytes, see page_map.h), files taken in
// turn. Staged pages above dirty_limit are spilled to the files' spill files
// on the source filesystem. Both happen in the thread whose request pushed
// memory over the limit, after its reply, with no lock held.
#pragma once

#include <boost/intrusive/list.hpp>

#include <cstdint>
#include <memory>
#include <vector>

#include "deferfs/file.h"
#include "deferfs/mutex.h"

namespace deferfs {

class Cache {
 public:
  Cache(Counters& counters, uint64_t cache_limit, uint64_t dirty_limit)
      : counters_(counters), cache_limit_(cache_limit), dirty_limit_(dirty_limit) {}
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;

  uint64_t cache_limit() const { return cache_limit_; }
  uint64_t dirty_limit() const { return dirty_limit_; }

  ~Cache();

  // Registers a File to be balanced (not owned: it leaves the list as it
  // ends, File::~File calling remove()).
  void add(const std::shared_ptr<File>& file) EXCLUDES(files_mutex_);
  void remove(File& file) EXCLUDES(files_mutex_);

  // Brings memory back under the limits. `hint` is the file the caller just
  // used: a file holding more than half the cache gives pages back first, so
  // one reader cannot take the whole cache. Call with no lock held.
  void balance(File* hint) EXCLUDES(balance_mutex_);

 private:
  void evict(uint64_t bytes, File* hint) REQUIRES(balance_mutex_);
  void spill(uint64_t bytes) REQUIRES(balance_mutex_);
  std::vector<std::shared_ptr<File>> live_files() EXCLUDES(files_mutex_);

  Counters& counters_;
  const uint64_t cache_limit_;
  const uint64_t dirty_limit_;
  Mutex balance_mutex_;  // one balancer at a time; taken before any File lock
  Mutex files_mutex_;
  // The files, hooked into the Files themselves (Boost.Intrusive); the
  // front is where the next balancer starts (round robin).
  using FileList = boost::intrusive::list<
      File, boost::intrusive::member_hook<File, boost::intrusive::list_member_hook<>, &File::cache_hook>>;
  FileList files_ GUARDED_BY(files_mutex_);
};

}  // namespace deferfs
