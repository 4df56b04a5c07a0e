// The loader's parts that know nothing of File (design.md: the loader knows
// only a source and a segment): the read of a run of pages from the source
// into the segment, the list of requests waiting for pages being loaded,
// and the readahead window. File's loading (File::ensure_loaded, in
// src/loader.cc) drives them under the file's lock.
#pragma once

#include <boost/intrusive/list.hpp>

#include <cstdint>
#include <utility>
#include <vector>

#include "deferfs/mutex.h"
#include "deferfs/segment.h"
#include "deferfs/source.h"

namespace deferfs {

// Reads pages [first, first+count) of the snapshot (its bytes below
// `base_size`) from `source` into `segment` at their own offsets. Pages the
// source has as holes (SEEK_DATA/SEEK_HOLE) are not read: hole[i] is set
// for them. Adds the bytes read to `loaded`. Called with no lock held; the
// caller owns the pages (they are Loading: invariant I5 of file.h).
// Returns 0, -ESTALE if the source is shorter than `base_size` says, or the
// source's -errno. `via_fd`: views map the segment, so the pages are filled
// with pwrite through its fd (segment_fill.h) rather than through the
// mapping, where a view could see a page half read.
// `dense`: the caller knows the source has no hole below `base_size`
// (source_is_dense for this base): the hole queries are skipped.
int load_run(Source& source, Segment& segment, uint64_t page_size, uint64_t first, uint64_t count,
             uint64_t base_size, std::vector<char>& hole, uint64_t& loaded, bool via_fd = false,
             bool dense = false);

// Whether `source` has data, and no hole, everywhere below `base_size`:
// then a load needs no SEEK_DATA/SEEK_HOLE of its own (two system calls and
// two extent lookups of every random 4 KiB load). Called with no lock held.
bool source_is_dense(Source& source, uint64_t base_size);

// The requests waiting for pages that another thread is loading. Each
// waiter lives on its own stack and is hooked into the list while it waits
// (Boost.Intrusive: no allocation per link); a loader that settles a run of
// pages wakes only the waiters whose range holds one of them, each on its
// own condition variable: nobody wakes to look at pages it does not need.
//
// Every function is called with the owning file's lock held (`mu`, the
// same Mutex for all calls); the list is guarded by it.
class LoadWaiters {
 public:
  LoadWaiters() = default;
  LoadWaiters(const LoadWaiters&) = delete;
  LoadWaiters& operator=(const LoadWaiters&) = delete;
  ~LoadWaiters();  // the list is empty: a waiter holds a reference to the file

  // Waits until a page of [first, last) settles (stops being Loading).
  // Releases `mu` while waiting. The caller looks its pages up again.
  void wait(Mutex& mu, uint64_t first, uint64_t last) REQUIRES(mu);
  // The pages in `settled` (ascending) stopped being Loading: wakes and
  // unlinks each waiter whose range holds one of them.
  void wake(const std::vector<uint64_t>& settled);
  size_t waiting() const { return list_.size(); }

 private:
  struct Waiter : boost::intrusive::list_base_hook<> {
    uint64_t first, last;
    bool woken = false;
    CondVar cv;
  };
  boost::intrusive::list<Waiter, boost::intrusive::constant_time_size<true>> list_;
};

// The readahead window of one file (spec 3 readahead=, issue 3). A read that
// starts where the last one ended grows the window (128 KiB, doubling on
// each sequential read, at most the cap); a seek resets it. Guarded by the
// owning file's lock.
class Readahead {
 public:
  void set_max(uint64_t max) { max_ = max; }
  uint64_t max() const { return max_; }
  // Follows the read [off, off+len). Returns the bytes [from, to) of the
  // window past it not handed out before, clipped below `limit` (only the
  // source's part, below the cut, needs loading); from >= to when there is
  // nothing to load ahead.
  std::pair<uint64_t, uint64_t> follow(uint64_t off, uint64_t len, uint64_t limit);
  // A touch at `off` inside the window already handed out (a view faults
  // only where the last window's pages end): it counts as sequential.
  void touched_within(uint64_t off);

 private:
  uint64_t max_ = 0;               // the cap (0: no readahead)
  uint64_t window_ = 0;            // the current window
  uint64_t next_ = ~uint64_t{0};   // where a sequential read would start
  uint64_t issued_ = 0;            // end of the last window handed out
};

}  // namespace deferfs
