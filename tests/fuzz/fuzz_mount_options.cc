// libFuzzer target: the mount command line (options.h). parse_mount_args
// gets a fixed, existing SOURCE/MOUNTPOINT pair plus fuzzed arguments (-o
// lists, flags, stray words), and parse_size gets fuzzed text. Each must
// return a value that satisfies the documented rules or throw UsageError
// with a message; anything else is a bug.
//
// Input layout: the first byte chooses the mode, the rest is split at '\n'
// into arguments.
//   mode % 3 == 0: every line is one "-o LINE"
//   mode % 3 == 1: the lines are raw arguments after SOURCE MOUNTPOINT
//   mode % 3 == 2: the whole rest is one parse_size text
#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "deferfs/options.h"

namespace {

using deferfs::MountOptions;
using deferfs::UsageError;

std::string g_source, g_mountpoint, g_top;

[[noreturn]] void fail(const char* what, const std::string& detail) {
  std::fprintf(stderr, "fuzz_mount_options: %s: %s\n", what, detail.c_str());
  std::abort();
}

void cleanup() {
  if (g_top.empty()) return;
  ::rmdir(g_source.c_str());
  ::rmdir(g_mountpoint.c_str());
  ::rmdir(g_top.c_str());
}

// The reference: what parse_size must answer, computed with 128-bit
// arithmetic. Returns false where it must throw.
bool reference_size(std::string_view t, uint64_t& out) {
  size_t i = 0;
  unsigned __int128 n = 0;
  while (i < t.size() && t[i] >= '0' && t[i] <= '9') {
    n = n * 10 + static_cast<unsigned>(t[i] - '0');
    if (n > UINT64_MAX) return false;
    ++i;
  }
  if (i == 0) return false;
  std::string_view s = t.substr(i);
  if (s.size() >= 2 && s.substr(s.size() - 2) == "iB") {
    s.remove_suffix(2);
    if (s.empty()) return false;
  } else if (!s.empty() && s.back() == 'B') {
    s.remove_suffix(1);
  }
  unsigned __int128 mult;
  if (s.empty()) {
    mult = 1;
  } else if (s.size() != 1) {
    return false;
  } else if (s[0] == 'k' || s[0] == 'K') {
    mult = 1 << 10;
  } else if (s[0] == 'm' || s[0] == 'M') {
    mult = 1 << 20;
  } else if (s[0] == 'g' || s[0] == 'G') {
    mult = 1 << 30;
  } else {
    return false;
  }
  n *= mult;
  if (n > UINT64_MAX) return false;
  out = static_cast<uint64_t>(n);
  return true;
}

void fuzz_size(const std::string& text) {
  uint64_t want = 0;
  const bool ok = reference_size(text, want);
  try {
    const uint64_t got = deferfs::parse_size(text, "size");
    if (!ok) fail("parse_size accepted what the reference refuses", text);
    if (got != want) fail("parse_size answered a different value", text);
  } catch (const UsageError& e) {
    if (ok) fail("parse_size refused what the reference accepts", text);
    if (std::string_view(e.what()).find("size") == std::string_view::npos) {
      fail("parse_size's message does not name what was parsed", e.what());
    }
  }
}

bool is_power_of_two(uint64_t n) { return n && !(n & (n - 1)); }

void check_options(const MountOptions& mo, const std::string& input) {
  if (mo.source != g_source) fail("SOURCE changed", mo.source + " for " + input);
  if (mo.mountpoint != g_mountpoint) fail("MOUNTPOINT changed", mo.mountpoint + " for " + input);
  if (!is_power_of_two(mo.page_size) || mo.page_size < 4096 || mo.page_size > (2u << 20)) {
    fail("page size out of range accepted", std::to_string(mo.page_size) + " for " + input);
  }
  if (mo.cache_size != 0 && mo.cache_size < (1u << 20)) fail("cache_size below 1M accepted", input);
  if (mo.dirty_limit != 0 && mo.dirty_limit < (1u << 20)) fail("dirty_limit below 1M accepted", input);
  if (mo.state_dir.empty() || mo.state_dir.front() != '/') fail("state_dir not absolute", mo.state_dir);
  if (mo.debug && !mo.foreground) fail("-d without foreground", input);
  for (const std::string& o : mo.fuse_options) {
    // Passed to libfuse inside one -o list: a comma or an empty item would
    // smuggle in another option.
    if (o.empty()) fail("empty FUSE option passed", input);
    if (o.find(',') != std::string::npos) fail("FUSE option with a comma passed", o);
    const std::string name = o.substr(0, o.find('='));
    if (name == "snapshot" || name == "readahead") fail("option of later work accepted", o);
  }
}

void fuzz_args(const std::vector<std::string>& args, const std::string& input) {
  try {
    const MountOptions mo = deferfs::parse_mount_args(args);
    check_options(mo, input);
  } catch (const UsageError& e) {
    if (std::string_view(e.what()).empty()) fail("UsageError without a message", input);
  }
}

std::vector<std::string> lines(std::string_view s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find('\n', start);
    if (end == std::string_view::npos) end = s.size();
    out.emplace_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  char tmpl[] = "/tmp/deferfs-fuzz-options-XXXXXX";
  if (!::mkdtemp(tmpl)) {
    std::perror("mkdtemp");
    std::abort();
  }
  g_top = std::filesystem::canonical(tmpl).string();
  g_source = g_top + "/src";
  g_mountpoint = g_top + "/mnt";
  if (::mkdir(g_source.c_str(), 0755) != 0 || ::mkdir(g_mountpoint.c_str(), 0755) != 0) {
    std::perror("mkdir");
    std::abort();
  }
  std::atexit(cleanup);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const unsigned mode = data[0] % 3;
  const std::string rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (mode == 2) {
    fuzz_size(rest);
    return 0;
  }
  std::vector<std::string> args{g_source, g_mountpoint};
  for (const std::string& line : lines(rest)) {
    if (mode == 0) args.push_back("-o");
    args.push_back(line);
  }
  fuzz_args(args, rest);
  return 0;
}
