// Tests of the mount command line and -o options (spec 2 and 3).
#include "deferfs/options.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace deferfs {
namespace {

namespace fs = std::filesystem;
using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;

// Expects `fn` to throw UsageError whose message contains every `parts`.
template <typename Fn>
void expect_usage_error(Fn fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no UsageError; expected one mentioning '" << parts.front() << "'";
  } catch (const UsageError& e) {
    for (const std::string& p : parts) EXPECT_THAT(e.what(), HasSubstr(p));
  }
}

// --- parse_size ---

TEST(ParseSize, PlainAndSuffixed) {
  EXPECT_EQ(parse_size("0", "x"), 0u);
  EXPECT_EQ(parse_size("4096", "x"), 4096u);
  EXPECT_EQ(parse_size("4k", "x"), 4096u);
  EXPECT_EQ(parse_size("4K", "x"), 4096u);
  EXPECT_EQ(parse_size("64M", "x"), 64u << 20);
  EXPECT_EQ(parse_size("64m", "x"), 64u << 20);
  EXPECT_EQ(parse_size("2G", "x"), uint64_t{2} << 30);
  EXPECT_EQ(parse_size("2g", "x"), uint64_t{2} << 30);
  EXPECT_EQ(parse_size("4KiB", "x"), 4096u);
  EXPECT_EQ(parse_size("4kB", "x"), 4096u);
  EXPECT_EQ(parse_size("4096B", "x"), 4096u);
  EXPECT_EQ(parse_size("18446744073709551615", "x"), UINT64_MAX);
}

TEST(ParseSize, Malformed) {
  for (const char* bad : {"", "k", "4x", "4kk", "-1", "+1", " 4", "4 ", "1.5M", "4iB", "0x10", "4T", "M4"}) {
    expect_usage_error([&] { parse_size(bad, "cache_thing"); }, {"cache_thing", std::string("'") + bad + "'"});
  }
}

TEST(ParseSize, Overflow) {
  expect_usage_error([] { parse_size("18446744073709551616", "page_size"); }, {"page_size", "too large"});
  expect_usage_error([] { parse_size("99999999999999999999999", "x"); }, {"too large"});
  expect_usage_error([] { parse_size("17179869184G", "x"); }, {"too large"});
}

// --- parse_mount_args ---

class MountArgs : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/deferfs-options-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    root_ = fs::canonical(tmpl);
    src_ = root_ / "src";
    mnt_ = root_ / "mnt";
    fs::create_directory(src_);
    fs::create_directory(mnt_);
    std::ofstream(root_ / "file") << "x";
  }
  void TearDown() override { fs::remove_all(root_); }

  MountOptions parse(std::vector<std::string> extra) {
    std::vector<std::string> args{src_.string(), mnt_.string()};
    args.insert(args.end(), extra.begin(), extra.end());
    return parse_mount_args(args);
  }
  void expect_option_error(const std::string& opts, const std::vector<std::string>& parts) {
    SCOPED_TRACE("-o " + opts);
    expect_usage_error([&] { parse({"-o", opts}); }, parts);
  }

  fs::path root_, src_, mnt_;
};

TEST_F(MountArgs, Defaults) {
  const MountOptions mo = parse({});
  EXPECT_EQ(mo.source, src_.string());
  EXPECT_EQ(mo.mountpoint, mnt_.string());
  EXPECT_FALSE(mo.foreground);
  EXPECT_FALSE(mo.debug);
  EXPECT_EQ(mo.page_size, 4096u);
  EXPECT_EQ(mo.fsync, FsyncMode::Commit);
  EXPECT_FALSE(mo.read_only);
  EXPECT_FALSE(mo.allow_other);
  EXPECT_FALSE(mo.default_permissions);
  EXPECT_TRUE(mo.fuse_options.empty());
  EXPECT_EQ(mo.state_dir, default_state_dir());
}

TEST_F(MountArgs, ResolvesRelativeAndDottedPaths) {
  const fs::path old = fs::current_path();
  fs::current_path(root_);
  MountOptions mo;
  EXPECT_NO_THROW(mo = parse_mount_args({"src/", "./mnt/../mnt", "-o", "state_dir=state"}));
  fs::current_path(old);
  EXPECT_EQ(mo.source, src_.string());
  EXPECT_EQ(mo.mountpoint, mnt_.string());
  EXPECT_EQ(mo.state_dir, (root_ / "state").string());
}

TEST_F(MountArgs, ResolvesSymlinks) {
  fs::create_directory_symlink(src_, root_ / "link");
  const MountOptions mo = parse_mount_args({(root_ / "link").string(), mnt_.string()});
  EXPECT_EQ(mo.source, src_.string());
}

TEST_F(MountArgs, SameDirectoryTwiceIsValid) {
  const MountOptions mo = parse_mount_args({src_.string(), src_.string()});
  EXPECT_EQ(mo.source, mo.mountpoint);
}

TEST_F(MountArgs, Flags) {
  EXPECT_TRUE(parse({"-f"}).foreground);
  const MountOptions d = parse({"-d"});
  EXPECT_TRUE(d.debug);
  EXPECT_TRUE(d.foreground);  // -d implies -f
  EXPECT_NO_THROW(parse({"-h"}));
  EXPECT_NO_THROW(parse({"--help"}));
}

TEST_F(MountArgs, FlagsAndOptionsAnywhere) {
  const MountOptions mo = parse_mount_args({"-f", "-o", "ro", src_.string(), "-opage_size=8k", mnt_.string(), "-d"});
  EXPECT_TRUE(mo.foreground);
  EXPECT_TRUE(mo.debug);
  EXPECT_TRUE(mo.read_only);
  EXPECT_EQ(mo.page_size, 8192u);
  EXPECT_EQ(mo.source, src_.string());
  EXPECT_EQ(mo.mountpoint, mnt_.string());
}

TEST_F(MountArgs, DoubleDashEndsFlags) {
  fs::create_directory(root_ / "-f");
  const MountOptions mo = parse_mount_args({src_.string(), "--", (root_ / "-f").string()});
  EXPECT_FALSE(mo.foreground);
  EXPECT_EQ(mo.mountpoint, (root_ / "-f").string());
}

TEST_F(MountArgs, PageSize) {
  EXPECT_EQ(parse({"-o", "page_size=4096"}).page_size, 4096u);
  EXPECT_EQ(parse({"-o", "page_size=4k"}).page_size, 4096u);
  EXPECT_EQ(parse({"-o", "page_size=64k"}).page_size, 65536u);
  EXPECT_EQ(parse({"-o", "page_size=2M"}).page_size, 2u << 20);
  EXPECT_EQ(parse({"-o", "page_size=1M,page_size=16k"}).page_size, 16384u);  // the last wins
}

TEST_F(MountArgs, BadPageSize) {
  expect_option_error("page_size=3000", {"page_size", "power of two"});
  expect_option_error("page_size=12k", {"page_size", "power of two"});
  expect_option_error("page_size=2k", {"page_size", "4k"});
  expect_option_error("page_size=4M", {"page_size", "2M"});
  expect_option_error("page_size=0", {"page_size"});
  expect_option_error("page_size=4q", {"page_size", "'4q'"});
  expect_option_error("page_size=", {"page_size", "value"});
  expect_option_error("page_size", {"page_size", "value"});
}

TEST_F(MountArgs, Fsync) {
  EXPECT_EQ(parse({"-o", "fsync=commit"}).fsync, FsyncMode::Commit);
  EXPECT_EQ(parse({"-o", "fsync=stage"}).fsync, FsyncMode::Stage);
  expect_option_error("fsync=never", {"fsync", "never", "commit", "stage"});
  expect_option_error("fsync", {"fsync", "value"});
}

TEST_F(MountArgs, ReadOnly) {
  const MountOptions mo = parse({"-o", "ro"});
  EXPECT_TRUE(mo.read_only);
  EXPECT_THAT(mo.fuse_options, Contains("ro"));
  EXPECT_FALSE(parse({"-o", "ro,rw"}).read_only);
  expect_option_error("ro=1", {"'ro'", "no value"});
}

TEST_F(MountArgs, StateDir) {
  EXPECT_EQ(parse({"-o", "state_dir=/var/tmp/x"}).state_dir, "/var/tmp/x");
  expect_option_error("state_dir=", {"state_dir", "value"});
}

TEST_F(MountArgs, MemoryLimitsAreParsed) {
  MountOptions mo = parse_mount_args({src_.string(), mnt_.string(), "-o", "cache_size=256M,dirty_limit=128M"});
  EXPECT_EQ(mo.cache_size, uint64_t{256} << 20);
  EXPECT_EQ(mo.dirty_limit, uint64_t{128} << 20);
  expect_option_error("cache_size=abc", {"cache_size"});
  expect_option_error("dirty_limit=100k", {"dirty_limit", "at least 1M"});
  expect_option_error("cache_size", {"cache_size"});
  MountOptions defaults = parse_mount_args({src_.string(), mnt_.string()});
  EXPECT_EQ(defaults.cache_size, 0u);
  resolve_memory_defaults(defaults);
  EXPECT_GT(defaults.cache_size, defaults.dirty_limit);
  EXPECT_GT(defaults.dirty_limit, 0u);
}

TEST_F(MountArgs, TransportIsParsed) {
  EXPECT_EQ(parse_mount_args({src_.string(), mnt_.string()}).transport, TransportMode::Auto);
  EXPECT_EQ(parse_mount_args({src_.string(), mnt_.string(), "-o", "transport=uring"}).transport, TransportMode::Uring);
  EXPECT_EQ(parse_mount_args({src_.string(), mnt_.string(), "-o", "transport=dev"}).transport, TransportMode::Dev);
  EXPECT_EQ(parse_mount_args({src_.string(), mnt_.string(), "-o", "transport=auto"}).transport, TransportMode::Auto);
  expect_option_error("transport=tcp", {"transport=tcp", "auto, uring or dev"});
  expect_option_error("transport", {"transport"});
}

TEST_F(MountArgs, SnapshotAndReadaheadAreParsed) {
  EXPECT_EQ(parse_mount_args({src_.string(), mnt_.string(), "-o", "snapshot=guard"}).snapshot, SnapshotMode::Guard);
  EXPECT_EQ(parse_mount_args({src_.string(), mnt_.string(), "-o", "snapshot=reflink"}).snapshot, SnapshotMode::Reflink);
  EXPECT_EQ(parse_mount_args({src_.string(), mnt_.string()}).snapshot, SnapshotMode::Auto);
  expect_option_error("snapshot=copy", {"snapshot=copy", "auto, reflink or guard"});
  EXPECT_EQ(parse_mount_args({src_.string(), mnt_.string(), "-o", "readahead=256k"}).readahead, 256u << 10);
  EXPECT_EQ(parse_mount_args({src_.string(), mnt_.string(), "-o", "readahead=0"}).readahead, 0u);
  EXPECT_EQ(parse_mount_args({src_.string(), mnt_.string()}).readahead, 1u << 20);
  expect_option_error("readahead=1G", {"readahead", "at most 64M"});
  expect_option_error("readahead=x", {"readahead"});
}

TEST_F(MountArgs, StandardFuseOptionsArePassed) {
  const std::vector<std::string> flags = {
      "rw",          "dev",        "nodev",         "suid",       "nosuid",       "exec",    "noexec",
      "atime",       "noatime",    "relatime",      "norelatime", "strictatime",  "nostrictatime",
      "sync",        "async",      "dirsync",       "lazytime",   "nolazytime",   "allow_root",
      "auto_unmount", "blkdev"};
  for (const std::string& flag : flags) {
    SCOPED_TRACE(flag);
    const MountOptions mo = parse({"-o", flag});
    EXPECT_EQ(mo.fuse_options, std::vector<std::string>{flag});
  }
  const MountOptions mo = parse({"-o", "fsname=mydata,subtype=deferfs,max_read=128k,blksize=4096"});
  EXPECT_EQ(mo.fuse_options,
            (std::vector<std::string>{"fsname=mydata", "subtype=deferfs", "max_read=131072", "blksize=4096"}));
}

TEST_F(MountArgs, AllowOtherAndDefaultPermissions) {
  const MountOptions mo = parse({"-o", "allow_other", "-o", "default_permissions"});
  EXPECT_TRUE(mo.allow_other);
  EXPECT_TRUE(mo.default_permissions);
  EXPECT_EQ(mo.fuse_options, (std::vector<std::string>{"allow_other", "default_permissions"}));
}

TEST_F(MountArgs, FstabOptionsAreDropped) {
  const MountOptions mo = parse(
      {"-o", "defaults,user,nouser,users,auto,noauto,_netdev,nofail,x-systemd.automount,x-gvfs-hide,comment=x,user=alice"});
  EXPECT_TRUE(mo.fuse_options.empty());
  EXPECT_FALSE(mo.read_only);
}

TEST_F(MountArgs, OptionListsSplitAndRepeat) {
  const MountOptions mo = parse({"-o", "nosuid,,nodev,", "-onoatime", "-o", "fsync=stage"});
  EXPECT_EQ(mo.fuse_options, (std::vector<std::string>{"nosuid", "nodev", "noatime"}));
  EXPECT_EQ(mo.fsync, FsyncMode::Stage);
}

TEST_F(MountArgs, BadFuseOptionValues) {
  expect_option_error("allow_other=yes", {"allow_other", "no value"});
  expect_option_error("fsname", {"fsname", "value"});
  expect_option_error("max_read=lots", {"max_read", "'lots'"});
  expect_option_error("max_read=0", {"max_read"});
}

TEST_F(MountArgs, UnknownOption) {
  expect_option_error("frobnicate", {"unknown option 'frobnicate'"});
  expect_option_error("nosuid,bogus=3", {"unknown option 'bogus'"});
  expect_option_error("defaults=1", {"unknown option 'defaults'"});
}

TEST_F(MountArgs, BadInvocations) {
  const std::string s = src_.string(), m = mnt_.string(), file = (root_ / "file").string(),
                    none = (root_ / "nonexistent").string();
  // 1. nothing at all
  expect_usage_error([&] { parse_mount_args({}); }, {"SOURCE", "MOUNTPOINT"});
  // 2. no mount point
  expect_usage_error([&] { parse_mount_args({s}); }, {"missing MOUNTPOINT", s});
  // 3. an extra positional argument
  expect_usage_error([&] { parse_mount_args({s, m, "extra"}); }, {"'extra'"});
  // 4. SOURCE missing
  expect_usage_error([&] { parse_mount_args({none, m}); }, {"SOURCE", none, "does not exist"});
  // 5. SOURCE a file
  expect_usage_error([&] { parse_mount_args({file, m}); }, {"SOURCE", file, "not a directory"});
  // 6. MOUNTPOINT missing
  expect_usage_error([&] { parse_mount_args({s, none}); }, {"MOUNTPOINT", none, "does not exist"});
  // 7. MOUNTPOINT a file
  expect_usage_error([&] { parse_mount_args({s, file}); }, {"MOUNTPOINT", file, "not a directory"});
  // 8. an unknown flag
  expect_usage_error([&] { parse_mount_args({s, m, "-x"}); }, {"unknown flag '-x'"});
  expect_usage_error([&] { parse_mount_args({s, m, "--frob"}); }, {"unknown flag '--frob'"});
  // 9. -o without its argument
  expect_usage_error([&] { parse_mount_args({s, m, "-o"}); }, {"-o"});
  // 10. a malformed size
  expect_usage_error([&] { parse_mount_args({s, m, "-o", "page_size=big"}); }, {"page_size", "'big'"});
  // 11. a bad fsync value
  expect_usage_error([&] { parse_mount_args({s, m, "-o", "fsync=sometimes"}); }, {"fsync", "sometimes"});
  // 12. a path through a file
  expect_usage_error([&] { parse_mount_args({file + "/sub", m}); }, {"SOURCE", file + "/sub"});
  // 13. an empty SOURCE
  expect_usage_error([&] { parse_mount_args({"", m}); }, {"SOURCE"});
}

TEST(DefaultStateDir, FollowsXdgRuntimeDir) {
  const char* saved = std::getenv("XDG_RUNTIME_DIR");
  const std::string saved_value = saved ? saved : "";

  char tmpl[] = "/tmp/deferfs-xdg-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  ::setenv("XDG_RUNTIME_DIR", tmpl, 1);
  EXPECT_EQ(default_state_dir(), std::string(tmpl) + "/deferfs");

  ::setenv("XDG_RUNTIME_DIR", (std::string(tmpl) + "/missing").c_str(), 1);
  EXPECT_EQ(default_state_dir(), "/run/deferfs");

  ::unsetenv("XDG_RUNTIME_DIR");
  EXPECT_EQ(default_state_dir(), "/run/deferfs");

  ::rmdir(tmpl);
  if (saved) ::setenv("XDG_RUNTIME_DIR", saved_value.c_str(), 1);
}

}  // namespace
}  // namespace deferfs
