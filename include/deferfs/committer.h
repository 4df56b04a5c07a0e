// sync: commits the staged pages of a set of files to their sources (spec
// 6.3), atomically across the files through the journal (journal.h):
//   1. for each file, in offset order, compare its staged pages with the
//      source's bytes; write the pages that differ (coalesced), the ranges
//      that must become zeros and the final size into the journal;
//   2. commit the journal (trailer, fsync): the sync is decided;
//   3. replay the journal in place, fsync every file, remove the journal.
// A failure before 2 leaves every source untouched; after 2, the journal
// finishes the sync (now, at the next sync, or at the next mount). Either
// way every staged page is kept until its file is committed.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "deferfs/file.h"
#include "deferfs/journal.h"
#include "deferfs/reports.h"

namespace deferfs {

struct CommitTarget {
  std::shared_ptr<File> file;
  std::string path;  // relative to the source root: the journal names files by it
};

class Committer {
 public:
  using Progress = std::function<void(uint64_t done, uint64_t total)>;
  // `source_root_fd`: the source root (to finish a pending journal by path),
  // or -1. `journal_dir_fd`: where the journal lives (the source's .deferfs);
  // -1 without a source root makes a private temporary directory (unit
  // tests); -1 with one means no journal: syncs fail. Neither fd is owned.
  // `journal_name`: this mount's own journal in that directory
  // (journal.ID, instance.h).
  explicit Committer(Counters& counters, int source_root_fd = -1, int journal_dir_fd = -1,
                     std::string journal_name = kJournalName);
  ~Committer();
  Committer(const Committer&) = delete;
  Committer& operator=(const Committer&) = delete;

  // Commits every target. Conflicting files (source changed outside) are
  // refused unless `force`. Takes each file's commit mutex and io_gate (one
  // sync at a time; the files' own locks are never held across I/O).
  // Across mounts (issue 13): first finishes the journals of dead
  // instances (recover_dead), then takes an OFD write lock on every target's
  // source file, in path order, held from the identity check of prepare()
  // to the last fsync: another mount's apply of the same file waits, and
  // what it committed is seen as an outside change under the lock.
  SyncReport commit(const std::vector<CommitTarget>& targets, bool force,
                    const Progress& progress = {});

  // Finishes (complete journal) or drops (incomplete) a journal left in
  // `journal_dir_fd` by an interrupted sync, opening files below
  // `source_root_fd`; says so in the log. For the mount, before serving.
  // Returns 0 or -errno (a complete journal that could not be replayed is
  // kept, and the error logged).
  // `files`/`bytes` (optional) count what the journal committed.
  static int recover(int source_root_fd, int journal_dir_fd, uint64_t* files = nullptr,
                     uint64_t* bytes = nullptr, const std::string& journal_name = kJournalName);

  // Finishes the journals of instances proven dead (instance.h) other than
  // `own_id`, and a journal of an earlier deferfs without instances; with
  // `remove_clones`, also removes their reflink clones. Each instance is
  // claimed (its lock taken) while its files are handled, so two mounts never
  // recover the same one and a live one is never touched. Returns how many
  // journals were handled.
  static int recover_dead(int source_root_fd, int journal_dir_fd, const std::string& own_id,
                          bool remove_clones);

 private:
  struct Job;
  class LiveTarget;
  // Compares one file's staged pages with its source and journals what
  // differs. 0, -ESTALE (outside change) or -errno.
  int prepare(Job& job, class JournalWriter& journal, uint64_t& done, uint64_t total,
              const Progress& progress);

  Counters& counters_;
  const int source_root_fd_;
  int journal_dir_fd_;
  const std::string journal_name_;
  std::string own_id_;     // the instance id in journal_name_ ("" for kJournalName)
  std::string temp_dir_;   // when the Committer made its own journal directory
  Mutex sync_mutex_;  // one commit at a time; taken before any file's commit mutex
};

}  // namespace deferfs
