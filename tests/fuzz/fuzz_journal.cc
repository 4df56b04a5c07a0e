// libFuzzer target: the sync journal reader (journal.h: check_journal and
// replay_journal), which recovery runs at mount time on whatever
// <source>/.deferfs/journal holds after a crash: possibly a torn or
// corrupted file. It must never crash, never read past the body, never hand
// the target a write longer than the journal, and replaying the same journal
// twice must do the same thing (replay is idempotent).
//
// Input: the first byte chooses how the file is made, the rest is the body.
//   bit 0 set: the fuzzer's bytes are the whole file, as they are
//   else:      header "DFJ1" + version 1, the body, and a valid trailer
//              (length and xxh64), so that replay gets past the checksum
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "deferfs/journal.h"

namespace {

std::string g_dir;
int g_dirfd = -1;
constexpr const char* kName = "journal";

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_journal: %s\n", what);
  std::abort();
}

void cleanup() {
  if (g_dirfd >= 0) ::unlinkat(g_dirfd, kName, 0);
  if (!g_dir.empty()) ::rmdir(g_dir.c_str());
}

// Records what replay asks for, checking the order of calls.
struct Recorder : deferfs::JournalTarget {
  std::string log;
  bool open_file = false;
  uint64_t written = 0;
  int open(const std::string& path, dev_t dev, ino_t ino) override {
    log += "F" + std::to_string(path.size()) + ":" + path + ":" + std::to_string(dev) + ":" + std::to_string(ino);
    // Select every other file (by inode parity) to cover skipping too.
    open_file = (ino & 1) == 0;
    return open_file ? 0 : 1;
  }
  int zero(uint64_t off, uint64_t len) override {
    if (!open_file) fail("zero() without a selected file");
    log += "Z" + std::to_string(off) + "+" + std::to_string(len);
    return 0;
  }
  int write(uint64_t off, const char* data, uint64_t len) override {
    if (!open_file) fail("write() without a selected file");
    written += len;
    log += "W" + std::to_string(off) + "+" + std::to_string(len) + ":" +
           std::to_string(XXH64(data, static_cast<size_t>(len), 0));
    return 0;
  }
  int finish(uint64_t final_size, const struct timespec* mtime) override {
    if (!open_file) fail("finish() without a selected file");
    log += "E" + std::to_string(final_size);
    if (mtime) log += "@" + std::to_string(mtime->tv_sec) + "." + std::to_string(mtime->tv_nsec);
    return 0;
  }
};

void write_file(const std::vector<char>& bytes) {
  int fd = ::openat(g_dirfd, kName, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) fail("cannot create the journal file");
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n <= 0) fail("cannot write the journal file");
    done += static_cast<size_t>(n);
  }
  ::close(fd);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/deferfs-fuzz-journal-XXXXXX";
  if (!::mkdtemp(tmpl.data())) fail("mkdtemp");
  g_dir = tmpl;
  g_dirfd = ::open(g_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (g_dirfd < 0) fail("open the temporary directory");
  std::atexit(cleanup);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool raw = data[0] & 1;
  const char* body = reinterpret_cast<const char*>(data) + 1;
  const uint64_t body_len = size - 1;
  std::vector<char> file;
  if (raw) {
    file.assign(body, body + body_len);
  } else {
    const uint32_t version = 1;
    file.insert(file.end(), {'D', 'F', 'J', '1'});
    file.insert(file.end(), reinterpret_cast<const char*>(&version), reinterpret_cast<const char*>(&version) + 4);
    file.insert(file.end(), body, body + body_len);
    const uint64_t sum = XXH64(body, body_len, 0);
    file.push_back('T');
    file.insert(file.end(), reinterpret_cast<const char*>(&body_len), reinterpret_cast<const char*>(&body_len) + 8);
    file.insert(file.end(), reinterpret_cast<const char*>(&sum), reinterpret_cast<const char*>(&sum) + 8);
  }
  write_file(file);

  std::string why;
  const deferfs::JournalCheck check = deferfs::check_journal(g_dirfd, kName, why);
  if (!raw && check != deferfs::JournalCheck::Complete) fail("a journal with a valid trailer is not complete");
  if (check == deferfs::JournalCheck::Missing) fail("an existing journal reads as missing");
  if (check == deferfs::JournalCheck::Incomplete && why.empty()) fail("incomplete without a reason");

  Recorder first, second;
  uint64_t files1 = 0, files2 = 0, bytes1 = 0, bytes2 = 0;
  const int rc1 = deferfs::replay_journal(g_dirfd, kName, first, &files1, &bytes1);
  const int rc2 = deferfs::replay_journal(g_dirfd, kName, second, &files2, &bytes2);
  if (check != deferfs::JournalCheck::Complete && rc1 == 0) fail("an incomplete journal was replayed");
  if (rc1 != rc2 || files1 != files2 || bytes1 != bytes2 || first.log != second.log) fail("replaying twice differs");
  if (rc1 == 0 && bytes1 != first.written) fail("replay's byte count differs from what it wrote");
  if (first.written > file.size()) fail("replay wrote more bytes than the journal holds");
  if (rc1 > 0) fail("replay returned a positive value");
  return 0;
}
