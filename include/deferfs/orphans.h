// Staged data whose file is gone (issue 16): never applied to another file,
// never dropped unasked. It is kept aside in SOURCE/.deferfs/orphans/NAME/,
// in a form a person can use without deferfs:
//   manifest  text: the file's path when staged, its identity, sizes, the
//             reason it was set aside, and the staged page ranges;
//   pages     a sparse file holding the staged bytes at their offsets in the
//             file (holes where nothing was staged); `dd` or a few lines of
//             Python put them back into any file.
// Reported in the log at mount and by `deferfs status`; removed only by
// `deferfs orphans --remove NAME` or `--remove-all` (orphans_cli.cc).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "deferfs/file_identity.h"

namespace deferfs {

inline constexpr const char* kOrphansDir = "orphans";

struct OrphanPage {
  uint64_t page;
  int fd;  // where the page's bytes are now, at page * page_size (segment or spill file); not owned
};

struct OrphanInput {
  std::string path;    // relative to the source root, as staged
  std::string reason;  // why it was set aside
  FileIdentity identity;
  uint64_t page_size = 4096;
  uint64_t base_size = 0;  // the source's size when the snapshot was taken
  uint64_t size = 0;       // the staged size
  std::vector<OrphanPage> pages;
};

// Writes the orphan into `state_dir_fd`/orphans/ (created 0700), fsynced.
// Returns the orphan's name (its directory below orphans/), or "" with
// `error` set.
std::string keep_orphan(int state_dir_fd, const OrphanInput& in, std::string& error);

// Names of the orphans kept in `state_dir_fd`, sorted.
std::vector<std::string> list_orphans(int state_dir_fd);

// Removes one orphan (its files and directory). 0 or -errno (-ENOENT: none
// of that name; -EINVAL: a name that is not one).
int remove_orphan(int state_dir_fd, const std::string& name);

// `deferfs orphans ...`: lists or removes the orphans of a source, given
// the source directory or a deferfs mount of it. Returns the exit status.
int orphans_main(const std::vector<std::string>& args);
// For `deferfs status`: a line naming the orphans kept, if any.
void print_orphans_note(const std::vector<std::string>& names);

}  // namespace deferfs
