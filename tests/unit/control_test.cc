// Tests of the control protocol: request validation (parse_request), the
// report JSON (reports.cc) and a ControlServer over a real socket with a
// fake handler.
#include "deferfs/control.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "deferfs/reports.h"

namespace deferfs {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Clock = std::chrono::steady_clock;

// Expects parse_request(text) to throw ProtocolError mentioning `part`.
void expect_bad(const std::string& text, const std::string& part) {
  SCOPED_TRACE(text.substr(0, 200));
  try {
    parse_request(text);
    ADD_FAILURE() << "accepted; expected a ProtocolError mentioning '" << part << "'";
  } catch (const ProtocolError& e) {
    EXPECT_THAT(e.what(), HasSubstr(part));
  }
}

// --- parse_request ---

TEST(ParseRequest, GoodRequests) {
  ControlRequest r = parse_request(R"({"version":1,"op":"sync","paths":["a/b",""],"force":true})");
  EXPECT_EQ(r.op, "sync");
  EXPECT_THAT(r.paths, ElementsAre("a/b", ""));
  EXPECT_TRUE(r.force);
  EXPECT_FALSE(r.discard);

  r = parse_request(R"({"version":1,"op":"status","paths":[""]})");
  EXPECT_EQ(r.op, "status");
  EXPECT_FALSE(r.force);

  r = parse_request(R"({"version":1,"op":"discard","paths":["x"]})");
  EXPECT_EQ(r.op, "discard");

  r = parse_request(R"({"version":1,"op":"stats"})");
  EXPECT_EQ(r.op, "stats");
  EXPECT_TRUE(r.paths.empty());

  r = parse_request(R"({"version":1,"op":"umount","discard":true})");
  EXPECT_EQ(r.op, "umount");
  EXPECT_TRUE(r.discard);

  // Whitespace and UTF-8 names are fine.
  r = parse_request(" {\n\"op\" : \"status\", \"version\" : 1, \"paths\" : [\"d\xC3\xA9j\xC3\xA0/\xE2\x82\xAC\"] } ");
  EXPECT_THAT(r.paths, ElementsAre("d\xC3\xA9j\xC3\xA0/\xE2\x82\xAC"));
}

TEST(ParseRequest, PathsAreNormalized) {
  const ControlRequest r =
      parse_request(R"({"version":1,"op":"status","paths":["a//b/./c/", ".", "./x", "..a/b..", "a/.../b"]})");
  EXPECT_THAT(r.paths, ElementsAre("a/b/c", "", "x", "..a/b..", "a/.../b"));
}

TEST(ParseRequest, Oversized) {
  std::string big = R"({"version":1,"op":"status","paths":[")" + std::string(kMaxMessageBytes, 'a') + R"("]})";
  expect_bad(big, "larger than the limit");
}

TEST(ParseRequest, EmptyAndTruncated) {
  expect_bad("", "empty");
  const std::string good = R"({"version":1,"op":"sync","paths":["a"],"force":false})";
  for (size_t len : {size_t{1}, size_t{10}, size_t{25}, good.size() - 1}) {
    expect_bad(good.substr(0, len), "not valid JSON");
  }
}

TEST(ParseRequest, NotUtf8) {
  expect_bad("{\"version\":1,\"op\":\"status\",\"paths\":[\"\xFF\"]}", "UTF-8");
  expect_bad("{\"version\":1,\"op\":\"status\",\"paths\":[\"\xC0\xAF\"]}", "UTF-8");          // overlong '/'
  expect_bad("{\"version\":1,\"op\":\"status\",\"paths\":[\"\xED\xA0\x80\"]}", "UTF-8");      // surrogate
  expect_bad("{\"version\":1,\"op\":\"status\",\"paths\":[\"\xF4\x90\x80\x80\"]}", "UTF-8");  // > U+10FFFF
  expect_bad("{\"version\":1,\"op\":\"status\",\"paths\":[\"\xE2\x82\"]}", "UTF-8");          // cut short
}

TEST(ParseRequest, NotJsonOrNotObject) {
  expect_bad("hello", "not valid JSON");
  expect_bad("{\"version\":1,}", "not valid JSON");
  expect_bad(std::string(R"({"version":1,"op":"stats"})") + '\0' + "garbage", "NUL byte");
  expect_bad("[1,2]", "not a JSON object");
  expect_bad("\"sync\"", "not a JSON object");
  expect_bad("42", "not a JSON object");
  expect_bad("null", "not a JSON object");
  expect_bad(std::string(100, '[') + std::string(100, ']'), "nests deeper");
  expect_bad(R"({"version":1,"op":"status","paths":[[[[[[[[["a"]]]]]]]]]})", "nests deeper");
}

TEST(ParseRequest, Version) {
  expect_bad(R"({"op":"stats"})", "no 'version'");
  expect_bad(R"({"version":2,"op":"stats"})", "version 2");
  expect_bad(R"({"version":"1","op":"stats"})", "version \"1\"");
  expect_bad(R"({"version":1.0,"op":"stats"})", "version");
  expect_bad(R"({"version":null,"op":"stats"})", "version");
}

TEST(ParseRequest, Op) {
  expect_bad(R"({"version":1})", "no 'op'");
  expect_bad(R"({"version":1,"op":"format"})", "unknown op \"format\"");
  expect_bad(R"({"version":1,"op":"SYNC","paths":[""]})", "unknown op");
  expect_bad(R"({"version":1,"op":7})", "'op' must be a string");
  expect_bad(R"({"version":1,"op":["sync"]})", "'op' must be a string");
}

TEST(ParseRequest, WrongTypes) {
  expect_bad(R"({"version":1,"op":"sync","paths":"a"})", "'paths' must be a list");
  expect_bad(R"({"version":1,"op":"sync","paths":[1]})", "'paths' must be a list of strings");
  expect_bad(R"({"version":1,"op":"sync","paths":[null]})", "list of strings");
  expect_bad(R"({"version":1,"op":"sync","paths":[""],"force":"yes"})", "'force' must be true or false");
  expect_bad(R"({"version":1,"op":"sync","paths":[""],"force":1})", "'force' must be true or false");
  expect_bad(R"({"version":1,"op":"umount","discard":0})", "'discard' must be true or false");
}

TEST(ParseRequest, FieldsOfOtherOpsAndUnknownFields) {
  expect_bad(R"({"version":1,"op":"status","paths":[""],"force":true})", "'force' applies only to sync");
  expect_bad(R"({"version":1,"op":"sync","paths":[""],"discard":true})", "'discard' applies only to umount");
  expect_bad(R"({"version":1,"op":"stats","verbose":true})", "unknown field \"verbose\"");
}

TEST(ParseRequest, MissingOrEmptyPaths) {
  expect_bad(R"({"version":1,"op":"sync"})", "no 'paths'");
  expect_bad(R"({"version":1,"op":"status","paths":[]})", "'paths' is empty");
  expect_bad(R"({"version":1,"op":"discard"})", "no 'paths'");
}

TEST(ParseRequest, PathsOutsideTheMount) {
  expect_bad(R"({"version":1,"op":"sync","paths":["/etc/passwd"]})", "absolute");
  expect_bad(R"({"version":1,"op":"sync","paths":["/"]})", "absolute");
  expect_bad(R"({"version":1,"op":"sync","paths":[".."]})", "'..'");
  expect_bad(R"({"version":1,"op":"sync","paths":["../x"]})", "'..'");
  expect_bad(R"({"version":1,"op":"sync","paths":["a/../../x"]})", "'..'");
  expect_bad(R"({"version":1,"op":"sync","paths":["a/.."]})", "'..'");
  expect_bad(R"({"version":1,"op":"sync","paths":["ok","a/b/../c"]})", "'..'");
  expect_bad(R"({"version":1,"op":"sync","paths":["a\u0000b"]})", "NUL");
  expect_bad(R"({"version":1,"op":"sync","paths":[")" + std::string(300, 'n') + R"("]})", "longer than 255");
  expect_bad(R"({"version":1,"op":"sync","paths":[")" + std::string(5000, '/') + R"(a"]})", "longer than 4096");
}

// JSON escapes are decoded before the checks: an escaped '..', '/' or NUL
// is refused like the plain one, and broken escapes are malformed JSON.
TEST(ParseRequest, EscapesAreDecodedBeforeChecks) {
  expect_bad(R"({"version":1,"op":"sync","paths":["\u002e\u002e"]})", "'..'");
  expect_bad(R"({"version":1,"op":"sync","paths":["a\/..\/..\/etc"]})", "'..'");
  expect_bad(R"({"version":1,"op":"sync","paths":["\/etc"]})", "absolute");
  expect_bad(R"({"version":1,"op":"sync","paths":["x\u0000"]})", "NUL");
  expect_bad(R"({"version":1,"op":"sync","paths":["\ud800"]})", "not valid JSON");  // lone surrogate
  expect_bad(R"({"version":1,"op":"sync","paths":["\x41"]})", "not valid JSON");
  expect_bad(R"({"version":1,"op":"\u0073ync","paths":[""],"force":"\u0074rue"})", "'force' must be");
  const ControlRequest r = parse_request(R"({"version":1,"op":"\u0073tatus","paths":["d\u00e9j\u00e0\/x"]})");
  EXPECT_EQ(r.op, "status");
  EXPECT_THAT(r.paths, ElementsAre("d\xC3\xA9j\xC3\xA0/x"));
}

// Paths are validated whatever the op, also where they are unused.
TEST(ParseRequest, PathsAreCheckedForEveryOp) {
  for (const char* op : {"sync", "status", "discard", "stats", "umount"}) {
    SCOPED_TRACE(op);
    expect_bad(std::string(R"({"version":1,"op":")") + op + R"(","paths":[".."]})", "'..'");
    expect_bad(std::string(R"({"version":1,"op":")") + op + R"(","paths":["/"]})", "absolute");
    expect_bad(std::string(R"({"version":1,"op":")") + op + R"(","paths":[7]})", "list of strings");
  }
}

// Numbers that are not exactly the integer 1 are not version 1.
TEST(ParseRequest, VersionLookalikes) {
  for (const char* v : {"1e0", "1.0", "10e-1", "-1", "0", "18446744073709551617", "true", "[1]", "{}"}) {
    SCOPED_TRACE(v);
    expect_bad(std::string(R"({"version":)") + v + R"(,"op":"stats"})", "version");
  }
}

// --- reports JSON ---

TEST(Reports, FieldNamesOfSpec21) {
  StatsReport s;
  s.page_size = 4096;
  s.dirty_bytes = 8192;
  const json js = s;
  for (const char* key : {"page_size", "files_open", "snapshots", "materialized_bytes", "loaded_bytes", "dirty_pages",
                          "dirty_bytes", "skipped_pages", "synced_bytes", "evicted_bytes", "cache_limit_bytes",
                          "daemon_rss_bytes"}) {
    EXPECT_TRUE(js.contains(key)) << key;
  }
  EXPECT_EQ(js["dirty_bytes"], 8192);

  StatusReport st;
  st.files.push_back({"a/b", 100, 1, 4096, FileState::Conflict});
  st.dirty_pages = 1;
  st.dirty_bytes = 4096;
  const json jst = st;
  EXPECT_EQ(jst, json::parse(R"({"files":[{"path":"a/b","size":100,"dirty_pages":1,"dirty_bytes":4096,
                                 "state":"conflict"}],"dirty_pages":1,"dirty_bytes":4096,"orphans":[]})"));

  SyncReport sy;
  sy.files = 2;
  sy.pages_written = 3;
  sy.pages_skipped = 4;
  sy.bytes_written = 12288;
  sy.conflicts = {"c"};
  sy.failed = {{"f", "No space left on device"}};
  const json jsy = sy;
  EXPECT_EQ(jsy, json::parse(R"({"files":2,"pages_written":3,"pages_skipped":4,"bytes_written":12288,
                                 "conflicts":["c"],"failed":[{"path":"f","error":"No space left on device"}]})"));
}

TEST(Reports, RoundTrip) {
  SyncReport sy;
  sy.files = 1;
  sy.failed = {{"x", "boom"}};
  const auto sy2 = json(sy).get<SyncReport>();
  EXPECT_EQ(sy2.files, 1u);
  ASSERT_EQ(sy2.failed.size(), 1u);
  EXPECT_EQ(sy2.failed[0].error, "boom");

  StatusReport st;
  st.files.push_back({"p", 1, 2, 3, FileState::Staged});
  const auto st2 = json(st).get<StatusReport>();
  ASSERT_EQ(st2.files.size(), 1u);
  EXPECT_EQ(st2.files[0].state, FileState::Staged);
  EXPECT_EQ(st2.files[0].dirty_bytes, 3u);

  DiscardReport d{3, 7, {}};
  const auto d2 = json(d).get<DiscardReport>();
  EXPECT_EQ(d2.pages_dropped, 7u);

  StatsReport s;
  s.loaded_bytes = 123;
  s.pid = 42;
  s.source = "/src";
  const auto s2 = json(s).get<StatsReport>();
  EXPECT_EQ(s2.loaded_bytes, 123u);
  EXPECT_EQ(s2.pid, 42);
  EXPECT_EQ(s2.source, "/src");

  // The fields beyond spec 2.1 may be absent.
  json js = s;
  js.erase("pid");
  js.erase("source");
  js.erase("mountpoint");
  EXPECT_NO_THROW(js.get<StatsReport>());
}

TEST(Reports, FromJsonRejectsMissingAndWrongTypes) {
  EXPECT_THROW(json::parse(R"({"files":1})").get<SyncReport>(), json::exception);
  json st = json(StatusReport{{{"p", 1, 2, 3, FileState::Staged}}, 2, 3});
  st["files"][0]["state"] = "weird";
  EXPECT_THROW(st.get<StatusReport>(), json::exception);
  json s = json(StatsReport{});
  s["page_size"] = "4k";
  EXPECT_THROW(s.get<StatsReport>(), json::exception);
  EXPECT_STREQ(to_string(FileState::Staged), "staged");
  EXPECT_STREQ(to_string(FileState::Conflict), "conflict");
}

// --- ControlServer over a real socket ---

// A handler whose answers the test sets, and which records its calls.
class FakeHandler : public ControlHandler {
 public:
  SyncReport sync(const std::vector<std::string>& paths, bool force, const Progress& progress) override {
    {
      std::lock_guard lock(mutex_);
      sync_paths = paths;
      sync_force = force;
      ++sync_calls;
    }
    for (uint64_t i = 0; i <= progress_steps; ++i) {
      progress(i, progress_steps);
      if (progress_pause.count()) std::this_thread::sleep_for(progress_pause);
    }
    if (sync_throws) throw std::system_error(ENOSPC, std::generic_category(), "writing the journal");
    return sync_report;
  }
  StatusReport status(const std::vector<std::string>& paths) override {
    std::lock_guard lock(mutex_);
    status_paths = paths;
    if (status_throws_invalid) throw std::invalid_argument("no such file in the mount: " + paths.front());
    return status_report;
  }
  DiscardReport discard(const std::vector<std::string>&) override { return DiscardReport{1, 5, {}}; }
  StatsReport stats() override {
    StatsReport s;
    s.page_size = 4096;
    s.pid = 99;
    return s;
  }
  SyncReport umount(bool discard) override {
    umount_discard = discard;
    if (throw_weird) throw 42;
    return sync_report;
  }

  std::mutex mutex_;
  std::vector<std::string> sync_paths, status_paths;
  bool sync_force = false;
  int sync_calls = 0;
  uint64_t progress_steps = 3;
  std::chrono::milliseconds progress_pause{0};
  bool sync_throws = false;
  bool status_throws_invalid = false;
  bool throw_weird = false;
  std::atomic<bool> umount_discard{false};
  SyncReport sync_report;
  StatusReport status_report;
};

// A raw client socket, for sending what control_call never would.
class RawClient {
 public:
  explicit RawClient(const std::string& path) {
    fd_ = ::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
    timeval tv{10, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  ~RawClient() { ::close(fd_); }
  RawClient(const RawClient&) = delete;
  RawClient& operator=(const RawClient&) = delete;

  bool connected() const { return connected_; }
  bool send(const std::string& packet) { return ::send(fd_, packet.data(), packet.size(), MSG_NOSIGNAL) >= 0; }
  // One packet, or "" on EOF/timeout.
  std::string recv() {
    std::string buf(kMaxPacketBytes + 1, '\0');
    ssize_t n = ::recv(fd_, buf.data(), buf.size(), 0);
    if (n < 0 && errno == ECONNRESET) n = ::recv(fd_, buf.data(), buf.size(), 0);  // data may follow
    return n > 0 ? buf.substr(0, static_cast<size_t>(n)) : std::string();
  }
  json recv_json() {
    const std::string p = recv();
    return p.empty() ? json() : json::parse(p, nullptr, false);
  }
  void shutdown_write() { ::shutdown(fd_, SHUT_WR); }

 private:
  int fd_ = -1;
  bool connected_ = false;
};

class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/deferfs-control-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/control.sock";
    server_ = std::make_unique<ControlServer>(path_, ::getuid(), handler_);
    server_->start();
  }
  void TearDown() override {
    server_.reset();
    EXPECT_FALSE(fs::exists(path_)) << "the socket is unlinked by the destructor";
    fs::remove_all(dir_);
  }

  ControlRequest request(const std::string& op, std::vector<std::string> paths = {""}) {
    ControlRequest r;
    r.op = op;
    r.paths = std::move(paths);
    return r;
  }

  FakeHandler handler_;
  std::string dir_, path_;
  std::unique_ptr<ControlServer> server_;
};

TEST_F(ServerTest, SocketExistsAtPath) {
  struct stat st;
  ASSERT_EQ(::stat(path_.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(server_->path(), path_);
}

TEST_F(ServerTest, StatusRoundTrip) {
  handler_.status_report.files.push_back({"dir/f", 10, 1, 4096, FileState::Conflict});
  handler_.status_report.dirty_pages = 1;
  const json reply = control_call(path_, request("status", {"dir", ""}));
  ASSERT_TRUE(reply["ok"].get<bool>()) << reply.dump();
  const auto r = reply["result"].get<StatusReport>();
  ASSERT_EQ(r.files.size(), 1u);
  EXPECT_EQ(r.files[0].path, "dir/f");
  EXPECT_EQ(r.files[0].state, FileState::Conflict);
  EXPECT_THAT(handler_.status_paths, ElementsAre("dir", ""));
}

TEST_F(ServerTest, StatsAndDiscard) {
  json reply = control_call(path_, request("stats", {}));
  ASSERT_TRUE(reply["ok"].get<bool>());
  EXPECT_EQ(reply["result"]["page_size"], 4096);
  EXPECT_EQ(reply["result"]["pid"], 99);
  reply = control_call(path_, request("discard"));
  ASSERT_TRUE(reply["ok"].get<bool>());
  EXPECT_EQ(reply["result"]["pages_dropped"], 5);
}

TEST_F(ServerTest, SyncSendsProgressThenTheReport) {
  handler_.progress_steps = 5;
  handler_.sync_report.files = 2;
  handler_.sync_report.pages_written = 7;
  std::vector<std::pair<uint64_t, uint64_t>> seen;
  ControlRequest req = request("sync", {"a"});
  req.force = true;
  const json reply = control_call(path_, req, [&](uint64_t done, uint64_t total) { seen.emplace_back(done, total); });
  ASSERT_TRUE(reply["ok"].get<bool>()) << reply.dump();
  EXPECT_EQ(reply["result"]["pages_written"], 7);
  EXPECT_TRUE(handler_.sync_force);
  EXPECT_THAT(handler_.sync_paths, ElementsAre("a"));
  // The first and the last progress always arrive; in order; throttled between.
  ASSERT_GE(seen.size(), 2u);
  EXPECT_EQ(seen.front(), (std::pair<uint64_t, uint64_t>{0, 5}));
  EXPECT_EQ(seen.back(), (std::pair<uint64_t, uint64_t>{5, 5}));
  for (size_t i = 1; i < seen.size(); ++i) EXPECT_LT(seen[i - 1].first, seen[i].first);
}

TEST_F(ServerTest, SlowSyncProgressIsThrottledNotLost) {
  handler_.progress_steps = 6;
  handler_.progress_pause = std::chrono::milliseconds(60);
  std::vector<uint64_t> seen;
  const json reply = control_call(path_, request("sync"), [&](uint64_t done, uint64_t) { seen.push_back(done); });
  ASSERT_TRUE(reply["ok"].get<bool>());
  ASSERT_GE(seen.size(), 3u);  // about one every 100 ms over ~420 ms
  EXPECT_LE(seen.size(), 7u);
  EXPECT_EQ(seen.back(), 6u);
}

TEST_F(ServerTest, SyncWithConflictsIsAFailureCarryingTheReport) {
  handler_.sync_report.files = 1;
  handler_.sync_report.conflicts = {"c.txt"};
  handler_.sync_report.failed = {{"f.txt", "No space left on device"}};
  const json reply = control_call(path_, request("sync"));
  EXPECT_FALSE(reply["ok"].get<bool>());
  EXPECT_EQ(reply["errno"], "EIO");
  EXPECT_THAT(reply["error"].get<std::string>(), HasSubstr("1 in conflict"));
  const auto r = reply["result"].get<SyncReport>();
  EXPECT_THAT(r.conflicts, ElementsAre("c.txt"));
  ASSERT_EQ(r.failed.size(), 1u);
  EXPECT_EQ(r.failed[0].path, "f.txt");
}

TEST_F(ServerTest, HandlerExceptionsBecomeErrorReplies) {
  handler_.sync_throws = true;
  json reply = control_call(path_, request("sync"));
  EXPECT_FALSE(reply["ok"].get<bool>());
  EXPECT_EQ(reply["errno"], "ENOSPC");
  EXPECT_THAT(reply["error"].get<std::string>(), HasSubstr("writing the journal"));

  handler_.status_throws_invalid = true;
  reply = control_call(path_, request("status", {"nope"}));
  EXPECT_EQ(reply["errno"], "EINVAL");
  EXPECT_THAT(reply["error"].get<std::string>(), HasSubstr("nope"));

  handler_.throw_weird = true;
  ControlRequest um = request("umount", {});
  um.discard = true;
  reply = control_call(path_, um);
  EXPECT_FALSE(reply["ok"].get<bool>());
  EXPECT_EQ(reply["errno"], "EIO");
  EXPECT_TRUE(handler_.umount_discard);

  // And the server still serves.
  handler_.status_throws_invalid = false;
  EXPECT_TRUE(control_call(path_, request("status"))["ok"].get<bool>());
}

TEST_F(ServerTest, BadRequestsGetErrorRepliesAndTheServerKeepsServing) {
  RawClient c(path_);
  ASSERT_TRUE(c.connected());
  for (const std::string& bad : {std::string("garbage\xFF\xFE"), std::string("{\"version\":1,\"op\":\"sy"),
                                 std::string(R"({"version":1,"op":"rm","paths":[""]})"),
                                 std::string(R"({"version":1,"op":"sync","paths":["../etc"]})"),
                                 std::string(R"({"version":1,"op":"sync","paths":["/etc"]})"),
                                 std::string(R"({"version":9,"op":"stats"})")}) {
    SCOPED_TRACE(bad);
    ASSERT_TRUE(c.send(bad));
    const json reply = c.recv_json();
    ASSERT_TRUE(reply.is_object()) << "no reply";
    EXPECT_FALSE(reply["ok"].get<bool>());
    EXPECT_EQ(reply["errno"], "EINVAL");
    EXPECT_THAT(reply["error"].get<std::string>(), HasSubstr("bad request"));
  }
  // The same connection still works...
  ASSERT_TRUE(c.send(R"({"version":1,"op":"stats"})"));
  EXPECT_TRUE(c.recv_json()["ok"].get<bool>());
  // ...and so do new ones; nothing ran for the bad requests.
  EXPECT_TRUE(control_call(path_, request("stats", {}))["ok"].get<bool>());
  EXPECT_EQ(handler_.sync_calls, 0);
}

TEST_F(ServerTest, OversizedPacketGetsAnErrorReply) {
  RawClient c(path_);
  ASSERT_TRUE(c.send(std::string(kMaxPacketBytes + 1, '{')));
  const json reply = c.recv_json();
  ASSERT_TRUE(reply.is_object());
  EXPECT_FALSE(reply["ok"].get<bool>());
  EXPECT_EQ(reply["errno"], "EMSGSIZE");
  EXPECT_THAT(reply["error"].get<std::string>(), HasSubstr("larger than the limit"));
  EXPECT_TRUE(control_call(path_, request("stats", {}))["ok"].get<bool>());
}

TEST_F(ServerTest, OversizedFragmentedMessageGetsAnErrorReply) {
  RawClient c(path_);
  const std::string piece = "+" + std::string(kMaxPacketBytes - 1, 'a');
  bool replied = false;
  for (size_t sent = 0; sent <= kMaxMessageBytes + kMaxPacketBytes; sent += piece.size()) {
    if (!c.send(piece)) break;  // the server closed after replying
  }
  const json reply = c.recv_json();
  if (reply.is_object()) {
    replied = true;
    EXPECT_EQ(reply["errno"], "EMSGSIZE");
  }
  EXPECT_TRUE(replied);
  EXPECT_TRUE(control_call(path_, request("stats", {}))["ok"].get<bool>());
}

TEST_F(ServerTest, TruncatedFragmentsGetAnErrorReply) {
  RawClient c(path_);
  ASSERT_TRUE(c.send(R"(+{"version":1,"op":)"));
  c.shutdown_write();  // the rest never comes
  const json reply = c.recv_json();
  ASSERT_TRUE(reply.is_object());
  EXPECT_EQ(reply["errno"], "EINVAL");
  EXPECT_THAT(reply["error"].get<std::string>(), HasSubstr("truncated"));
}

TEST_F(ServerTest, FragmentedRequestIsReassembled) {
  RawClient c(path_);
  ASSERT_TRUE(c.send(R"(+{"version":1,)"));
  ASSERT_TRUE(c.send(R"(+"op":"status",)"));
  ASSERT_TRUE(c.send(R"(="paths":["x"]})"));
  const json reply = c.recv_json();
  EXPECT_TRUE(reply["ok"].get<bool>()) << reply.dump();
  EXPECT_THAT(handler_.status_paths, ElementsAre("x"));
}

TEST_F(ServerTest, LargeReplyTravelsInFragments) {
  for (int i = 0; i < 5000; ++i) {
    handler_.status_report.files.push_back({"some/rather/long/path/file-" + std::to_string(i), 1, 1, 4096,
                                            FileState::Staged});
  }
  const json reply = control_call(path_, request("status"));
  ASSERT_TRUE(reply["ok"].get<bool>());
  EXPECT_GT(reply.dump().size(), kMaxPacketBytes);
  EXPECT_EQ(reply["result"]["files"].size(), 5000u);
}

TEST_F(ServerTest, StalledClientDoesNotBlockOthers) {
  RawClient stalled(path_);  // connects and sends nothing
  ASSERT_TRUE(stalled.connected());
  RawClient half(path_);  // sends the first fragment only
  ASSERT_TRUE(half.send("+{\"version\""));
  const auto start = Clock::now();
  const json reply = control_call(path_, request("stats", {}));
  EXPECT_TRUE(reply["ok"].get<bool>());
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(1));
}

TEST_F(ServerTest, TooManyClientsGetBusyThenSlotsFree) {
  std::vector<std::unique_ptr<RawClient>> idle;
  for (size_t i = 0; i < ControlServer::kMaxClients; ++i) {
    idle.push_back(std::make_unique<RawClient>(path_));
    ASSERT_TRUE(idle.back()->connected());
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // let the server accept them all
  json reply = control_call(path_, request("stats", {}));
  EXPECT_FALSE(reply["ok"].get<bool>());
  EXPECT_EQ(reply["errno"], "EBUSY");
  idle.clear();
  const auto deadline = Clock::now() + std::chrono::seconds(3);
  do {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    reply = control_call(path_, request("stats", {}));
  } while (!reply["ok"].get<bool>() && Clock::now() < deadline);
  EXPECT_TRUE(reply["ok"].get<bool>());
}

TEST_F(ServerTest, ClientThatLeavesMidSyncDoesNotHurtTheServer) {
  handler_.progress_steps = 4;
  handler_.progress_pause = std::chrono::milliseconds(50);
  {
    RawClient c(path_);
    ASSERT_TRUE(c.send(R"({"version":1,"op":"sync","paths":[""]})"));
    c.recv();  // the first progress packet, then leave
  }
  EXPECT_TRUE(control_call(path_, request("stats", {}))["ok"].get<bool>());
}

TEST_F(ServerTest, ServerStopsWhileClientsAreConnected) {
  RawClient c(path_);
  ASSERT_TRUE(c.connected());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const auto start = Clock::now();
  server_.reset();  // must not wait for the idle client's timeout
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(2));
}

TEST_F(ServerTest, OthersAreRefusedWithEacces) {
  // A second server owned by someone else than the test's client.
  const std::string other = dir_ + "/other.sock";
  const uid_t me = ::getuid();
  const uid_t owner = me == 0 ? 12345 : me + 1;
  ControlServer server(other, owner, handler_);
  server.start();
  if (me != 0) {
    const json reply = control_call(other, request("sync"));
    EXPECT_FALSE(reply["ok"].get<bool>());
    EXPECT_EQ(reply["errno"], "EACCES");
    EXPECT_EQ(handler_.sync_calls, 0);
    return;
  }
  // As root the test is always allowed; a child that drops to nobody is not.
  ASSERT_EQ(::chmod(dir_.c_str(), 0755), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(10);
    try {
      const json reply = control_call(other, request("sync"));
      if (reply["ok"].get<bool>()) ::_exit(11);
      if (reply["errno"] != "EACCES") ::_exit(12);
      ::_exit(0);
    } catch (...) {
      ::_exit(13);
    }
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "10 setuid, 11 allowed, 12 wrong errno, 13 exception";
  EXPECT_EQ(handler_.sync_calls, 0);
  // Root itself is allowed on a server it does not own.
  EXPECT_TRUE(control_call(other, request("stats", {}))["ok"].get<bool>());
}

TEST_F(ServerTest, StaleSocketIsReplacedLiveOneIsNot) {
  // A live server at the path: refused.
  EXPECT_THROW({ ControlServer s(path_, ::getuid(), handler_); }, std::system_error);
  // A stale socket (bound, nobody listening): replaced.
  const std::string stale = dir_ + "/stale.sock";
  {
    const int fd = ::socket(AF_UNIX, SOCK_SEQPACKET, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, stale.c_str(), sizeof addr.sun_path - 1);
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    ::close(fd);
  }
  {
    ControlServer s(stale, ::getuid(), handler_);
    s.start();
    EXPECT_TRUE(control_call(stale, request("stats", {}))["ok"].get<bool>());
  }
  // A regular file at the path: refused, left alone.
  const std::string file = dir_ + "/file";
  { std::FILE* f = std::fopen(file.c_str(), "w"); std::fclose(f); }
  EXPECT_THROW({ ControlServer s(file, ::getuid(), handler_); }, std::system_error);
  EXPECT_TRUE(fs::exists(file));
  // A path too long for sockaddr_un.
  EXPECT_THROW({ ControlServer s(dir_ + "/" + std::string(200, 'x'), ::getuid(), handler_); }, std::system_error);
}

TEST(ControlCall, MissingSocketIsAConnectError) {
  ControlRequest r;
  r.op = "stats";
  try {
    control_call("/nonexistent/deferfs.sock", r);
    ADD_FAILURE() << "no exception";
  } catch (const ControlConnectError& e) {
    EXPECT_EQ(e.code().value(), ENOENT);
  }
}

}  // namespace
}  // namespace deferfs
