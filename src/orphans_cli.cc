// `deferfs orphans [--json] [--remove NAME]... [--remove-all] DIR`: the
// staged data kept aside because its file is gone (orphans.h). DIR is a
// deferfs mount point or the source directory itself; it works whether or
// not a daemon runs (the orphans are plain files in SOURCE/.deferfs/orphans).
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "deferfs/orphans.h"

namespace deferfs {

namespace {

// mountinfo escapes space, tab, newline and backslash as \ooo.
std::string unescape_mountinfo(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      out += static_cast<char>(std::strtol(s.substr(i + 1, 3).c_str(), nullptr, 8));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

// The SOURCE of the deferfs mount at `dir`, or `dir` itself.
std::string source_of(const std::string& dir) {
  char* real = realpath(dir.c_str(), nullptr);
  if (!real) return dir;
  const std::string abs = real;
  std::free(real);
  std::ifstream in("/proc/self/mountinfo");
  std::string line, found;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string id, parent, majmin, root, mp, word;
    ls >> id >> parent >> majmin >> root >> mp;
    while (ls >> word && word != "-") {
    }
    std::string fstype, source;
    ls >> fstype >> source;
    if (unescape_mountinfo(mp) == abs && fstype == "fuse.deferfs") found = unescape_mountinfo(source);
  }
  return found.empty() ? abs : found;
}

}  // namespace

int orphans_main(const std::vector<std::string>& args) {
  bool json = false, all = false;
  std::vector<std::string> remove;
  std::string dir;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--json") {
      json = true;
    } else if (a == "--remove-all") {
      all = true;
    } else if (a == "--remove") {
      if (i + 1 >= args.size()) {
        std::fprintf(stderr, "deferfs orphans: --remove needs the NAME of an orphan (see deferfs orphans DIR)\n");
        return 2;
      }
      remove.push_back(args[++i]);
    } else if (a == "-h" || a == "--help") {
      std::puts("Usage: deferfs orphans [--json] [--remove NAME]... [--remove-all] DIR\n"
                "Lists (or removes) staged data kept aside in SOURCE/.deferfs/orphans because its file\n"
                "is gone; DIR is a deferfs mount point or its source directory.");
      return 0;
    } else if (!a.empty() && a[0] == '-') {
      std::fprintf(stderr, "deferfs orphans: unknown option '%s'\n", a.c_str());
      return 2;
    } else if (dir.empty()) {
      dir = a;
    } else {
      std::fprintf(stderr, "deferfs orphans: one DIR only ('%s' and '%s')\n", dir.c_str(), a.c_str());
      return 2;
    }
  }
  if (dir.empty()) dir = ".";
  const std::string source = source_of(dir);
  const std::string state = source + "/.deferfs";
  int sfd = open(state.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (sfd < 0) {
    if (errno == ENOENT && remove.empty()) {
      if (json) std::puts("{\"source\":\"\",\"orphans\":[]}");
      return 0;
    }
    std::fprintf(stderr, "deferfs orphans: %s: %s\n", state.c_str(), std::strerror(errno));
    return 1;
  }
  int status = 0;
  std::vector<std::string> removed;
  if (all) remove = list_orphans(sfd);
  for (const std::string& n : remove) {
    if (int rc = remove_orphan(sfd, n); rc < 0) {
      std::fprintf(stderr, "deferfs orphans: %s/orphans/%s: %s\n", state.c_str(), n.c_str(),
                   rc == -EINVAL ? "not an orphan's name" : std::strerror(-rc));
      status = 1;
    } else {
      removed.push_back(n);
    }
  }
  const std::vector<std::string> left = list_orphans(sfd);
  close(sfd);
  if (json) {
    nlohmann::json j = {{"source", source}, {"orphans", left}, {"removed", removed}};
    std::puts(j.dump().c_str());
  } else {
    for (const std::string& n : removed) std::printf("removed %s/orphans/%s\n", state.c_str(), n.c_str());
    if (left.empty() && removed.empty()) std::printf("%s: no orphaned staged data\n", source.c_str());
    for (const std::string& n : left) std::printf("%s/orphans/%s\n", state.c_str(), n.c_str());
  }
  return status;
}

void print_orphans_note(const std::vector<std::string>& names) {
  if (names.empty()) return;
  std::printf("%zu orphaned staged file%s kept aside in SOURCE/.deferfs/orphans (its file is gone): %s",
              names.size(), names.size() == 1 ? "" : "s", names.front().c_str());
  if (names.size() > 1) std::printf(" ...");
  std::printf("\n  see `deferfs orphans MOUNTPOINT`; removed only by `deferfs orphans --remove NAME`\n");
}

}  // namespace deferfs
