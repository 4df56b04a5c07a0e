// One regular file's snapshot: its segment, page map and source, its staged
// size and dirty pages, behind one lock.
//
// Content model. The snapshot's bytes ("base") are the source's at the
// moment of the snapshot (or of the last commit), zeros past base_size_. The
// file as seen through the mount has size size_ and, for page p:
//   - a resident entry (Clean, Dirty, Writeback): the segment's bytes;
//   - Hole: zeros (equal to base);
//   - Absent below the cut mark: the base bytes (loaded on touch);
//   - Absent at or above the cut mark: zeros.
// The cut mark cut_ is the lowest size the file has had since the snapshot
// (cut_ <= base_size_). Invariants, all under mutex_:
//   I1  cut_ <= base_size_ and cut_ <= size_.
//   I2  segment bytes of resident pages at or past size_ are zero.
//   I3  if cut_ is not page-aligned, the page holding it is not Absent unless
//       it is Clean-equivalent (its base bytes past cut_ are zero).
//   I4  Clean pages equal the base; Dirty pages were different when last
//       compared (a write that restores a page's base bytes makes it Clean).
//   I5  only the loader that set a page Loading writes that page's bytes.
//
// Parts. File is one class whose functions live in five files, one job
// each: file.cc (the core: construction, page states, persistence, snapshot
// validity, reads), loader.cc (loading and readahead), staging.cc (writes,
// truncate, the skip-unchanged decision, discard), residency.cc (eviction,
// spilling, pins and deferred punches), file_commit.cc (the commit's plan,
// end and recheck). The members below are grouped by the part that owns
// them (see "members, by part").
//
// Lock rules (checked by clang's -Wthread-safety: GUARDED_BY, REQUIRES,
// EXCLUDES). mutex_ guards everything marked GUARDED_BY; it is never held
// across source I/O. Loads mark pages Loading, drop the lock, read, retake it
// and look the page up again (wendelin's loadblk / VM_RETRY). commit_mutex_
// serializes sync, discard and truncate against each other; lock order:
// commit_mutex_ before mutex_. io_gate_ is held shared by loads and exclusive
// by a commit's write phase, so a load never sees the source mid-commit.
#pragma once

#include <sys/uio.h>

#include <boost/intrusive/list_hook.hpp>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "deferfs/loader.h"
#include "deferfs/mutex.h"
#include "deferfs/page_map.h"
#include "deferfs/persist.h"
#include "deferfs/segment.h"
#include "deferfs/source.h"

namespace deferfs {

class Cache;

// Mount-wide counters (spec 2.1) and the memory accounting the Cache
// balances. Relaxed atomics: figures, not invariants. Files update the
// *_bytes gauges on every page state change (File::set_page_state).
struct Counters {
  std::atomic<uint64_t> loaded_bytes{0};
  std::atomic<uint64_t> skipped_pages{0};
  std::atomic<uint64_t> synced_bytes{0};
  std::atomic<uint64_t> evicted_bytes{0};
  std::atomic<uint64_t> spilled_total_bytes{0};  // moved to spill files since mount
  std::atomic<int64_t> clean_bytes{0};           // gauge: Clean pages in segments
  std::atomic<int64_t> dirty_mem_bytes{0};       // gauge: Dirty/Writeback pages in segments
  std::atomic<int64_t> spilled_bytes{0};         // gauge: Spilled pages on disk
};

// Pages of one file that a commit must write, taken by File::begin_commit.
struct CommitPlan {
  uint64_t final_size = 0;            // the size the source must end with
  uint64_t source_size = 0;           // the source's size when the plan was made
  std::vector<uint64_t> pages;        // Writeback pages (sorted), bytes in the segment
  // Per entry of `pages`: 1 when the page is known to differ from the
  // snapshot (PageEntry::kDiffers), so the commit need
  // not read the source to compare it (the source is the snapshot unless the
  // sync is forced). Empty: nothing known.
  std::vector<uint8_t> known_changed;
  std::vector<uint64_t> spilled;      // Spilled pages (sorted), bytes in the spill file
  // Runs (first page, count) of cut pages below min(final, source) size that
  // have no entry: they must read as zeros on the source.
  std::vector<std::pair<uint64_t, uint64_t>> zero_runs;
  bool has_mtime = false;             // a time set through the mount, applied after the data
  struct timespec mtime = {};
  bool size_change() const { return final_size != source_size; }
  bool empty() const {
    return pages.empty() && spilled.empty() && zero_runs.empty() && !size_change();
  }
};

struct CommitResult {
  uint64_t pages_written = 0;
  uint64_t pages_skipped = 0;
  uint64_t bytes_written = 0;
};

// Where a File keeps the staged state that must outlive the daemon
// (persist.h): `prefix` + ".seg" and ".meta".
struct PersistConfig {
  std::string prefix;
  std::string source_root;  // recorded for a person reading the files
  std::string instance;     // the owning mount's instance id (instance.h)
  FileIdentity file_id;     // proof of the file staged for (file_identity.h)
  FileIdentity root_id;     // and of the source root
};

class File : public std::enable_shared_from_this<File> {
 public:
  // `name` is for logs and segment names only. Takes the snapshot: records
  // the source's identity; no data is read. With `persist`, the segment and
  // the staged state live in named shared memory (spec 6.5); without it (or
  // if that fails) in a memfd. Throws std::system_error.
  File(std::unique_ptr<Source> source, uint64_t page_size, Counters& counters, std::string name,
       const PersistConfig* persist = nullptr);

  // Restores a file a previous daemon left staged: its segment and metadata
  // (locked by `meta`). The snapshot is the one that daemon had; revalidate()
  // then tells whether the source changed since. `restored` counts the
  // staged pages found. Throws std::system_error.
  File(std::unique_ptr<Source> source, Counters& counters, std::string name,
       std::unique_ptr<PersistMeta> meta, const std::string& segment_path, uint64_t& restored);
  ~File();
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  // ---- client I/O (any thread, no lock held by the caller) ----

  // Reads up to `len` bytes at `off` as seen through the mount, loading absent
  // pages. On success appends iovecs to `out` that point into the segment
  // (valid for the File's life) or into a static zero page, and returns the
  // byte count (short at end of file). Returns -errno on failure (EIO for a
  // conflict, the source's errno for a failed load).
  // The pointers are valid only until the pages are evicted: for tests and
  // single-threaded use. The FUSE layer uses read_into.
  ssize_t read(uint64_t off, size_t len, std::vector<iovec>& out) EXCLUDES(mutex_);

  // Like read, but copies the bytes into `out` (at least `len` bytes) under
  // the lock, so eviction can never free them mid-reply.
  ssize_t read_into(uint64_t off, size_t len, char* out) EXCLUDES(mutex_);

  // A read to be replied straight from the segment's memory: the ranges to
  // send in order, each either bytes of the segment at `off` (mapped at
  // `data` in this process; a mapping stays valid while the File lives) or
  // zeros. The file stays pinned until unpin(): memory a pinned reply may
  // still be sending is not punched (eviction, truncate, spill defer their
  // punches).
  struct Extent {
    bool zeros;
    uint64_t off;  // segment offset (== file offset) when !zeros
    uint64_t len;
    const char* data;  // segment memory of `off` when !zeros
  };
  // Returns the byte count (short at end of file) or -errno; on success the
  // caller must call unpin() once the reply is sent.
  ssize_t read_pinned(uint64_t off, size_t len, std::vector<Extent>& out) EXCLUDES(mutex_);
  void unpin() EXCLUDES(mutex_);

  // Whether reading [off, off+len), or writing it (`for_write`: only pages
  // the write covers in part are read), would wait for the source, a spill
  // file or another thread's load now: a hint for a caller that must not
  // block (a ring thread), stale as soon as the lock is dropped.
  bool access_waits(uint64_t off, size_t len, bool for_write) EXCLUDES(mutex_);

  // Stages a write. Pages whose bytes do not change are counted as skipped
  // and stay as they were. Returns `len` or -errno. `writeback`: the kernel
  // writing back its cached pages (mmap): that never extends the file, and
  // is clipped to the current size (a page cached before a truncate or a
  // discard may be written back after it).
  ssize_t write(const char* buf, size_t len, uint64_t off, bool writeback = false) EXCLUDES(mutex_);

  // Stages a size change (truncate or extend). 0 or -errno.
  int truncate(uint64_t new_size) EXCLUDES(commit_mutex_, mutex_);

  // ---- views (spec 9; view_server.cc) ----

  // A view touched the byte at `off` (or reads [off, off+len)): makes its
  // pages resident in the segment
  // as a read would (merged with every other load of it; readahead follows
  // sequential touches). A page that reads as zeros (a hole, a page past the
  // snapshot's end or cut by a truncate) gets zero bytes in the segment, so
  // later writes reach the views that map it. Returns 0, -EFAULT when `off`
  // lies in a system page wholly past the end of the file, or -errno.
  int load_for_view(uint64_t off, uint64_t len = 1) EXCLUDES(mutex_);
  // The segment's descriptor (read-write; views get a read-only reopening).
  int segment_fd() const { return segment_->fd(); }
  // Views open on this file. While there are any, loads fill the segment
  // with pwrite (segment_fill.cc), not through the daemon's mapping: a view
  // maps a page as soon as it exists, and pwrite makes it exist only once
  // written whole. add_view() counts one and waits for loads already going.
  std::atomic<int> views{0};
  void add_view() EXCLUDES(io_gate_, mutex_);

  // ---- snapshot validity ----

  enum class Validity { Unchanged, Resnapshotted, Conflict };
  // Compares the source's identity with the snapshot's. A changed source of a
  // file with nothing staged is re-snapshotted (all pages dropped: the caller
  // must drop the kernel's cache of it); with staged pages it is a conflict.
  Validity revalidate() EXCLUDES(mutex_);

  // ---- commit (sync), called by Committer; commit_mutex() held ----

  Mutex& commit_mutex() RETURN_CAPABILITY(commit_mutex_) { return commit_mutex_; }
  // True if anything is staged (dirty pages or a size change), as an
  // observer sees it: settles pending pages first (settle_pending: may read
  // the source). Never call it with an Inode's or the table's lock held.
  bool has_staged() EXCLUDES(mutex_);
  // The same without settling: pages a write may have left equal to the
  // snapshot count as staged until settled. No I/O; any lock may be held.
  bool has_staged_now() EXCLUDES(mutex_);
  // Decides, for every Dirty page a write may have made equal to the
  // snapshot again (not known to differ), whether it does: reads their base
  // bytes from the source in offset order, in batches (io_uring), with the
  // lock released, and makes the equal ones Clean (counted as skipped).
  // Writes never read the source for this (spec 6.1 holds for every
  // observer): status, stats and sync call it before they look, and
  // spilling before it writes pages out. Returns the number of pages found
  // equal (made Clean).
  uint64_t settle_pending() EXCLUDES(mutex_);
  bool in_conflict() EXCLUDES(mutex_);
  // Moves staged pages to Writeback and describes what to write.
  CommitPlan begin_commit() EXCLUDES(mutex_);
  // Ends a commit. ok: Writeback pages become Clean, the base becomes what
  // was written, the snapshot takes the source's new identity. !ok:
  // Writeback pages go back to Dirty, nothing is lost.
  // `forced`: the commit went over a changed source (sync --force).
  // `ours`: the source's identity as the commit left it (nullptr when an
  // outside change was seen during the commit: the snapshot then keeps its
  // old identity and the file is in conflict).
  void end_commit(const CommitPlan& plan, bool ok, bool forced, const SourceIdentity* ours) EXCLUDES(mutex_);
  // The snapshot's source identity.
  SourceIdentity identity() EXCLUDES(mutex_);
  // After a commit: compares the resident Clean pages (if at most
  // `max_pages`) with the live source; any difference means an outside
  // change the identity checks could not see (it landed between one of the
  // commit's writes and the fstat after it). The file is then re-snapshotted
  // (or, with staged pages, in conflict). `force` re-snapshots without
  // comparing (an outside change was seen). Returns true if it changed.
  bool recheck_after_commit(uint64_t max_pages, bool force) EXCLUDES(mutex_);
  // True once after the file's base changed under the kernel's cache (a
  // re-snapshot, a commit over an outside change): the caller drops the
  // kernel's cached pages of it.
  bool take_stale_kernel_cache() EXCLUDES(mutex_);
  // Marks the file in conflict (an outside change seen by a commit).
  void mark_conflict() EXCLUDES(mutex_);
  // utimes through the mount on a file with staged data: the mount shows
  // `mtime` and the commit applies it after the data (else the source's own
  // mtime would be the commit's time).
  void set_explicit_mtime(const struct timespec& mtime) EXCLUDES(mutex_);
  // A metadata operation made through the mount (chmod, chown, xattr, link,
  // rename, unlink of another name; utimes when `times_set`) changed the
  // source's ctime (and mtime): adopt that identity, so our own operations
  // are never taken for outside changes. Data changes (size, or mtime when
  // !times_set) are not adopted: they stay visible to revalidate().
  void adopt_metadata_change(bool times_set) EXCLUDES(mutex_);
  // Source and segment for the committer's I/O (between begin and end).
  Source& source() { return *source_; }
  const char* page_bytes(uint64_t page) const;
  // Reads a Spilled page's staged bytes from the spill file. 0 or -errno.
  int read_spilled(uint64_t page, char* out) EXCLUDES(mutex_);
  uint64_t page_size() const { return page_size_; }
  SharedMutex& io_gate() RETURN_CAPABILITY(io_gate_) { return io_gate_; }

  // Drops every staged page and size change; the file shows its snapshot
  // again. Takes commit_mutex_ itself. Returns the number of pages dropped.
  uint64_t discard() EXCLUDES(commit_mutex_, mutex_);

  // ---- readahead (spec 3 readahead=, issue 3) ----

  // Sequential reads grow a window (128 KiB, doubling on each sequential
  // read, at most `max` bytes; a seek resets it); the pages of the window
  // past the read are handed to `prefetch` (which must only queue work) to
  // be loaded in the background. Random reads load only what they touch.
  using PrefetchHook = std::function<void(std::weak_ptr<File>, uint64_t first_page, uint64_t last_page)>;
  void set_readahead(uint64_t max, PrefetchHook prefetch) EXCLUDES(mutex_);
  // Loads the absent pages of [first, last) without marking them touched
  // (a background thread's call). 0 or -errno.
  int prefetch(uint64_t first, uint64_t last) EXCLUDES(mutex_);

  // ---- memory (called by Cache, no lock held by the caller) ----

  // Frees up to `max_pages` Clean pages chosen by the clock (pages touched
  // since the hand last passed get a second chance). Returns pages freed.
  uint64_t evict_clean(uint64_t max_pages) EXCLUDES(mutex_);
  // Moves up to `max_pages` Dirty pages to the spill file (I/O with the lock
  // released). Returns pages spilled, or -errno if the spill file failed.
  int64_t spill_dirty(uint64_t max_pages) EXCLUDES(mutex_);
  // How the file gets its spill file: returns an fd (owned by the File from
  // then on) or -errno. Without it, nothing is spilled. `remover` (optional)
  // deletes a named spill file when the File ends with nothing spilled.
  // A restored file with spilled pages opens it at once.
  void set_spill_opener(std::function<int()> opener, std::function<void()> remover = {}) EXCLUDES(mutex_);
  uint64_t clean_pages() EXCLUDES(mutex_);
  uint64_t dirty_resident_pages() EXCLUDES(mutex_);

  // ---- figures ----
  struct Info {
    uint64_t size = 0;
    uint64_t dirty_pages = 0;
    uint64_t resident_pages = 0;
    bool staged = false;
    bool conflict = false;
    struct timespec staged_mtime = {};  // time of the last staged change, or the time set
    bool explicit_mtime = false;        // staged_mtime was set through the mount (utimes)
    uint64_t map_bytes = 0;       // page map allocation
    uint64_t resident_bytes = 0;  // segment memory as the kernel counts it
    uint64_t spilled_pages = 0;   // staged pages in the spill file
  };
  Info info() EXCLUDES(mutex_);
  std::string name() const EXCLUDES(mutex_);
  void set_name(std::string name) EXCLUDES(mutex_);
  // Called (with the file's lock held, so it must only queue work) when the
  // file is re-snapshotted: the kernel's cached pages of it are stale.
  void set_invalidate_hook(std::function<void()> hook) EXCLUDES(mutex_);

  // Open handles through the mount (maintained by the FUSE layer).
  std::atomic<int> handles{0};

  // The Cache's list of files (cache.h) is hooked here: no allocation per
  // link. Both are the Cache's, under its lock; cache_ is set once by
  // Cache::add, and the File leaves the list as it ends.
  boost::intrusive::list_member_hook<> cache_hook;
  Cache* cache = nullptr;

 private:
  // ======== core (file.cc): construction, page-state bookkeeping, the
  // persisted header, snapshot validity, reads out of the segment ========

  // The source's identity differs from the snapshot's (or a load saw it
  // change): re-snapshot a file with nothing staged and return true, or mark
  // a conflict and return false.
  bool source_changed_locked() REQUIRES(mutex_);
  void resnapshot_locked(const SourceIdentity& now) REQUIRES(mutex_);
  bool has_staged_locked() const REQUIRES(mutex_);
  bool page_is_zero(uint64_t page) const;
  // Every page state change goes through here: keeps the Counters' gauges.
  PageEntry* set_page_state(uint64_t page, PageState to) REQUIRES(mutex_);
  // Clips a read to the size and loads its pages; the byte count, 0 at end
  // of file, or -errno. May release mutex_ while loading.
  ssize_t load_for_read_locked(uint64_t off, size_t len) REQUIRES(mutex_);
  // Copies [off, off+len) (resident pages already ensured) into out.
  void copy_out_locked(uint64_t off, size_t len, char* out) REQUIRES(mutex_);
  // Mirrors the header fields into the persisted metadata (no-op without it).
  void persist_header_locked() REQUIRES(mutex_);

  // ======== loader (loader.cc) ========

  // Absent pages below the cut in [first, last) get loaded; waits for pages
  // others are loading. Returns 0 or -errno. Releases mutex_ for the I/O
  // and while waiting: the caller looks its pages up again after it.
  // `touch`: the pages are being read (they get the clock's referenced bit);
  // prefetched pages do not, so eviction takes them first.
  int ensure_loaded(uint64_t first, uint64_t last, bool touch = true) REQUIRES(mutex_);
  // Follows the read [off, off+len) for readahead; called with the lock held.
  void note_read_locked(uint64_t off, uint64_t len) REQUIRES(mutex_);

  // ======== staging (staging.cc) ========

  // Pages in [cut, min(size, base_size)) without an entry: zeros now, maybe
  // not on the source.
  uint64_t implicit_zero_pages_locked() const REQUIRES(mutex_);
  // Marks a Clean page Dirty, remembering the hash of its base bytes.
  void dirty_clean_page(uint64_t page) REQUIRES(mutex_);
  // After a write changed `page` (Dirty): records whether its bytes now
  // differ from the base (kDiffers), by its hash where the base's is known.
  // True when they differ; false when they may equal it (a candidate).
  bool note_differs(uint64_t page, PageEntry* e) REQUIRES(mutex_);
  // Pages a write made Dirty whose bytes may equal the base again: compare
  // against the source (mutex_ released for the read) and make equal ones Clean.
  // Returns the number of pages found equal, or -1 when the comparison
  // could not be made (the pages stay Dirty).
  int64_t settle_candidates(const std::vector<uint64_t>& pages) REQUIRES(mutex_);
  // Raises cut_ over pages that have an entry (their content does not depend
  // on the cut), so they can be evicted and reloaded from the source.
  void raise_cut_locked() REQUIRES(mutex_);
  void touch_staged() REQUIRES(mutex_);

  // ======== residency (residency.cc) ========

  int ensure_spill_file_locked() REQUIRES(mutex_);
  void drop_page(uint64_t page) REQUIRES(mutex_);  // to Absent, punching its memory
  // Punches [off, off+len) of the segment, or defers it while replies are
  // pinned; the deferred punch later frees only pages that are not resident
  // or loading by then.
  void punch_locked(uint64_t off, uint64_t len) REQUIRES(mutex_);

  // ======== members, by part ========
  //
  // One lock, mutex_, guards every member marked GUARDED_BY(mutex_). Every
  // part may read and change the core's members (under mutex_); a part's
  // own members are changed only by the functions of its file (others may
  // read them under mutex_ where said). Lock order: commit_mutex_ before
  // io_gate_ before mutex_; mutex_ is never held across source I/O.

  // constant after construction
  const uint64_t page_size_;
  const std::unique_ptr<Source> source_;
  Counters& counters_;

  // commit side (file_commit.cc, and staging's truncate and discard, which
  // take commit_mutex_ themselves). commit_mutex_ serializes sync, discard
  // and truncate; io_gate_ is held shared by loads (and the compare of
  // settle_candidates) and exclusive by a commit's write phase, so a load
  // never sees the source mid-commit.
  Mutex commit_mutex_ ACQUIRED_BEFORE(io_gate_);
  SharedMutex io_gate_ ACQUIRED_BEFORE(mutex_);

  mutable Mutex mutex_;

  // core: any part, under mutex_
  std::string name_ GUARDED_BY(mutex_);
  // Set in the constructor, never replaced: reserve and punch under mutex_;
  // a page's bytes are written by whoever its state says (I5).
  std::unique_ptr<Segment> segment_;
  std::unique_ptr<PersistMeta> meta_ GUARDED_BY(mutex_);  // null when not persistent
  PageMap map_ GUARDED_BY(mutex_);
  SourceIdentity identity_ GUARDED_BY(mutex_);            // the snapshot's source identity
  uint64_t base_size_ GUARDED_BY(mutex_) = 0;
  uint64_t size_ GUARDED_BY(mutex_) = 0;
  uint64_t cut_ GUARDED_BY(mutex_) = 0;
  uint64_t generation_ GUARDED_BY(mutex_) = 0;            // bumped when the base changes
  // The generation whose base was checked by source_is_dense, and the
  // answer: a dense base's loads skip the hole queries, and neither answer
  // is asked again for that generation.
  uint64_t density_generation_ GUARDED_BY(mutex_) = ~uint64_t{0};
  bool dense_ GUARDED_BY(mutex_) = false;
  bool conflict_ GUARDED_BY(mutex_) = false;
  bool stale_kernel_cache_ GUARDED_BY(mutex_) = false;    // see take_stale_kernel_cache
  std::function<void()> invalidate_hook_ GUARDED_BY(mutex_);
  std::string source_root_ GUARDED_BY(mutex_);                // for the persisted header

  // staging's own (read by the commit side's plan, the header and info)
  // Set when a write left pages that may equal the base (Dirty without
  // kDiffers) for settle_pending(); cleared by a pass that settled them.
  bool unsettled_ GUARDED_BY(mutex_) = false;
  struct timespec staged_mtime_ GUARDED_BY(mutex_) = {};
  bool explicit_mtime_ GUARDED_BY(mutex_) = false;

  // loader's own
  LoadWaiters waiters_ GUARDED_BY(mutex_);  // requests waiting for pages being loaded
  Readahead readahead_ GUARDED_BY(mutex_);
  PrefetchHook prefetch_hook_ GUARDED_BY(mutex_);

  // residency's own (the loader reads spill_fd_ to load spilled pages back)
  std::function<int()> spill_opener_ GUARDED_BY(mutex_);
  std::function<void()> spill_remover_ GUARDED_BY(mutex_);
  int spill_fd_ GUARDED_BY(mutex_) = -1;                      // set once; owned
  size_t clock_hand_ GUARDED_BY(mutex_) = 0;
  uint64_t pins_ GUARDED_BY(mutex_) = 0;                      // replies in flight from the segment
  std::vector<std::pair<uint64_t, uint64_t>> pending_punch_ GUARDED_BY(mutex_);  // (off, len) deferred while pinned
};

}  // namespace deferfs
