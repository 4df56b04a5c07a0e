// sync: commits the staged pages of a set of files to their sources (spec
// 6.3): for each dirty page, in offset order, compares with the source's bytes
// and writes only pages that differ, coalescing adjacent ones; zeroes cut
// ranges; applies the size; fsyncs. A failed file keeps every staged page.
//
// Not yet crash-atomic across files: there is no journal in this version
// (see the man page, LIMITS).
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "deferfs/file.h"
#include "deferfs/reports.h"

namespace deferfs {

struct CommitTarget {
  std::shared_ptr<File> file;
  std::string path;  // relative to the mount root, for the report
};

class Committer {
 public:
  using Progress = std::function<void(uint64_t done, uint64_t total)>;
  explicit Committer(Counters& counters) : counters_(counters) {}
  Committer(const Committer&) = delete;
  Committer& operator=(const Committer&) = delete;

  // Commits every target. Conflicting files (source changed outside) are
  // refused unless `force`. Takes each file's commit mutex (one sync at a
  // time; the files' own locks are never held across I/O).
  SyncReport commit(const std::vector<CommitTarget>& targets, bool force,
                    const Progress& progress = {});

 private:
  // Writes one file's plan (the file's io_gate held exclusive). 0 or -errno;
  // -ESTALE when the source changed outside the mount (unless `forced`).
  // `ours` ends as the source's identity after our own last change.
  int apply(File& file, const CommitPlan& plan, bool forced, SourceIdentity& ours,
            CommitResult& result, uint64_t& done, uint64_t total, const Progress& progress);

  Counters& counters_;
  std::mutex sync_mutex_;  // one commit at a time; taken before any file's commit mutex
};

}  // namespace deferfs
