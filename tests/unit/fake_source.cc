#include "fake_source.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

namespace deferfs::testing {

// ---------------------------------------------------------------- pattern

std::vector<char> pattern_bytes(uint64_t off, size_t len, uint64_t page_size) {
  std::vector<char> out(len);
  for (size_t i = 0; i < len; ++i) {
    const uint64_t o = off + i;
    const uint64_t word = kPageTag | (o / page_size);
    out[i] = static_cast<char>((word >> (8 * (o % 8))) & 0xff);
  }
  return out;
}

std::vector<char> page_numbered(uint64_t bytes, uint64_t page_size) {
  return pattern_bytes(0, static_cast<size_t>(bytes), page_size);
}

uint64_t page_number_at(const char* p) {
  uint64_t w;
  std::memcpy(&w, p, sizeof w);
  return w & ~kPageTag;
}

std::vector<char> filled(size_t len, char byte) { return std::vector<char>(len, byte); }

// ---------------------------------------------------------------- FakeSource

FakeSource::FakeSource(std::vector<char> content, bool writable)
    : writable_(writable), data_(std::move(content)) {}

std::unique_ptr<FakeSource> FakeSource::numbered(uint64_t bytes, uint64_t page_size) {
  return std::make_unique<FakeSource>(page_numbered(bytes, page_size));
}

int FakeSource::take(Failure& f) {
  if (f.times == 0) return 0;
  if (f.after > 0) {
    --f.after;
    return 0;
  }
  if (f.times > 0) --f.times;
  return -f.err;
}

void FakeSource::bump_locked() { ++version_; }

bool FakeSource::in_gate_locked(uint64_t off, uint64_t len) const {
  if (!gate_) return false;
  const uint64_t end = len > std::numeric_limits<uint64_t>::max() - off
                           ? std::numeric_limits<uint64_t>::max()
                           : off + len;
  const uint64_t gend = gate_len_ > std::numeric_limits<uint64_t>::max() - gate_off_
                            ? std::numeric_limits<uint64_t>::max()
                            : gate_off_ + gate_len_;
  return off < gend && gate_off_ < std::max(end, off + 1);
}

ssize_t FakeSource::read(void* buf, size_t len, uint64_t off) {
  std::unique_lock lk(mu_);
  ++stats_.reads;
  read_log_.push_back({off, len});
  const bool gated = in_gate_locked(off, len);
  if (gated && !gate_after_copy_) gate_wait_locked(lk);
  if (int rc = take(fail_read_); rc < 0) return rc;
  size_t n = 0;
  if (off < data_.size()) {
    n = static_cast<size_t>(std::min<uint64_t>(len, data_.size() - off));
    std::memcpy(buf, data_.data() + off, n);
  }
  stats_.bytes_read += n;
  if (gated && gate_after_copy_) gate_wait_locked(lk);
  return static_cast<ssize_t>(n);
}

void FakeSource::gate_wait_locked(std::unique_lock<std::mutex>& lk) {
  ++blocked_;
  cv_.notify_all();
  cv_.wait(lk, [&] { return !gate_ || tickets_ > 0; });
  if (gate_) --tickets_;
  --blocked_;
  cv_.notify_all();
}

int FakeSource::write(const void* buf, size_t len, uint64_t off) {
  std::lock_guard lk(mu_);
  ++stats_.writes;
  if (int rc = take(fail_write_); rc < 0) return rc;
  if (!writable_) return -EBADF;
  if (off + len > data_.size()) data_.resize(off + len, 0);
  std::memcpy(data_.data() + off, buf, len);
  clip_holes_locked(off, off + len);
  stats_.bytes_written += len;
  write_log_.push_back({off, len});
  bump_locked();
  return 0;
}

int FakeSource::truncate(uint64_t size) {
  std::lock_guard lk(mu_);
  ++stats_.truncates;
  if (int rc = take(fail_truncate_); rc < 0) return rc;
  if (!writable_) return -EBADF;
  data_.resize(size, 0);
  // Holes past the new end go; bytes past the old end read as zeros.
  std::vector<std::pair<uint64_t, uint64_t>> kept;
  for (auto [a, b] : holes_)
    if (a < size) kept.push_back({a, std::min(b, size)});
  holes_ = std::move(kept);
  truncate_log_.push_back(size);
  bump_locked();
  return 0;
}

int FakeSource::zero(uint64_t off, uint64_t len) {
  std::lock_guard lk(mu_);
  ++stats_.zeros;
  if (int rc = take(fail_zero_); rc < 0) return rc;
  if (!writable_) return -EBADF;
  const uint64_t end = std::min<uint64_t>(off + len, data_.size());
  if (off < end) {
    std::memset(data_.data() + off, 0, end - off);
    add_hole_locked(off, end);
  }
  zero_log_.push_back({off, len});
  bump_locked();
  return 0;
}

int FakeSource::sync() {
  std::lock_guard lk(mu_);
  ++stats_.syncs;
  return take(fail_sync_);
}

int FakeSource::identity(SourceIdentity& out) {
  std::lock_guard lk(mu_);
  ++stats_.identities;
  if (int rc = take(fail_identity_); rc < 0) return rc;
  out = SourceIdentity{};
  out.dev = 42;
  out.ino = 4242;
  out.size = data_.size();
  out.mtime = {static_cast<time_t>(1'000'000 + version_), 0};
  out.ctime = out.mtime;
  return 0;
}

int64_t FakeSource::next_data(uint64_t off) {
  std::lock_guard lk(mu_);
  const uint64_t size = data_.size();
  if (off >= size) return static_cast<int64_t>(size);
  if (!knows_holes_) return static_cast<int64_t>(off);
  for (auto [a, b] : holes_)
    if (a <= off && off < b) return static_cast<int64_t>(std::min(b, size));
  return static_cast<int64_t>(off);
}

int64_t FakeSource::next_hole(uint64_t off) {
  std::lock_guard lk(mu_);
  const uint64_t size = data_.size();
  if (off >= size || !knows_holes_) return static_cast<int64_t>(std::max(off, size));
  for (auto [a, b] : holes_) {
    if (a <= off && off < b) return static_cast<int64_t>(off);
    if (a > off) return static_cast<int64_t>(std::min(a, size));
  }
  return static_cast<int64_t>(size);
}

// ---------------------------------------------------------------- holes

void FakeSource::clip_holes_locked(uint64_t off, uint64_t end) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (auto [a, b] : holes_) {
    if (b <= off || a >= end) {
      out.push_back({a, b});
      continue;
    }
    if (a < off) out.push_back({a, off});
    if (b > end) out.push_back({end, b});
  }
  holes_ = std::move(out);
}

void FakeSource::add_hole_locked(uint64_t off, uint64_t end) {
  clip_holes_locked(off, end);
  holes_.push_back({off, end});
  std::sort(holes_.begin(), holes_.end());
  // Merge touching ranges.
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (auto h : holes_) {
    if (!out.empty() && out.back().second >= h.first)
      out.back().second = std::max(out.back().second, h.second);
    else
      out.push_back(h);
  }
  holes_ = std::move(out);
}

void FakeSource::add_hole(uint64_t off, uint64_t len) {
  std::lock_guard lk(mu_);
  const uint64_t end = std::min<uint64_t>(off + len, data_.size());
  if (off >= end) return;
  std::memset(data_.data() + off, 0, end - off);
  add_hole_locked(off, end);
}

std::vector<std::pair<uint64_t, uint64_t>> FakeSource::holes() const {
  std::lock_guard lk(mu_);
  return holes_;
}

void FakeSource::set_knows_holes(bool on) {
  std::lock_guard lk(mu_);
  knows_holes_ = on;
}

// ---------------------------------------------------------------- content

std::vector<char> FakeSource::content() const {
  std::lock_guard lk(mu_);
  return data_;
}

std::vector<char> FakeSource::bytes(uint64_t off, size_t len) const {
  std::lock_guard lk(mu_);
  std::vector<char> out(len, 0);
  if (off < data_.size()) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(len, data_.size() - off));
    std::memcpy(out.data(), data_.data() + off, n);
  }
  return out;
}

uint64_t FakeSource::size() const {
  std::lock_guard lk(mu_);
  return data_.size();
}

void FakeSource::outside_write(uint64_t off, const std::vector<char>& data) {
  std::lock_guard lk(mu_);
  if (off + data.size() > data_.size()) data_.resize(off + data.size(), 0);
  std::memcpy(data_.data() + off, data.data(), data.size());
  clip_holes_locked(off, off + data.size());
  bump_locked();
}

void FakeSource::outside_truncate(uint64_t size) {
  std::lock_guard lk(mu_);
  data_.resize(size, 0);
  std::vector<std::pair<uint64_t, uint64_t>> kept;
  for (auto [a, b] : holes_)
    if (a < size) kept.push_back({a, std::min(b, size)});
  holes_ = std::move(kept);
  bump_locked();
}

void FakeSource::bump_mtime() {
  std::lock_guard lk(mu_);
  bump_locked();
}

// ---------------------------------------------------------------- counters

FakeStats FakeSource::stats() const {
  std::lock_guard lk(mu_);
  return stats_;
}

std::vector<IoCall> FakeSource::read_log() const {
  std::lock_guard lk(mu_);
  return read_log_;
}

std::vector<IoCall> FakeSource::write_log() const {
  std::lock_guard lk(mu_);
  return write_log_;
}

std::vector<IoCall> FakeSource::zero_log() const {
  std::lock_guard lk(mu_);
  return zero_log_;
}

std::vector<uint64_t> FakeSource::truncate_log() const {
  std::lock_guard lk(mu_);
  return truncate_log_;
}

void FakeSource::reset_stats() {
  std::lock_guard lk(mu_);
  stats_ = {};
  read_log_.clear();
  write_log_.clear();
  zero_log_.clear();
  truncate_log_.clear();
}

// ---------------------------------------------------------------- failures

void FakeSource::fail_reads(int err, int times, int after) {
  std::lock_guard lk(mu_);
  fail_read_ = {err, times, after};
}
void FakeSource::fail_writes(int err, int times, int after) {
  std::lock_guard lk(mu_);
  fail_write_ = {err, times, after};
}
void FakeSource::fail_truncates(int err, int times, int after) {
  std::lock_guard lk(mu_);
  fail_truncate_ = {err, times, after};
}
void FakeSource::fail_zeros(int err, int times, int after) {
  std::lock_guard lk(mu_);
  fail_zero_ = {err, times, after};
}
void FakeSource::fail_syncs(int err, int times, int after) {
  std::lock_guard lk(mu_);
  fail_sync_ = {err, times, after};
}
void FakeSource::fail_identity(int err, int times, int after) {
  std::lock_guard lk(mu_);
  fail_identity_ = {err, times, after};
}
void FakeSource::clear_failures() {
  std::lock_guard lk(mu_);
  fail_read_ = fail_write_ = fail_truncate_ = fail_zero_ = fail_sync_ = fail_identity_ = {};
}

// ---------------------------------------------------------------- gate

void FakeSource::gate_on(uint64_t off, uint64_t len, bool after_copy) {
  std::lock_guard lk(mu_);
  gate_ = true;
  gate_after_copy_ = after_copy;
  gate_off_ = off;
  gate_len_ = len;
  tickets_ = 0;
}

void FakeSource::gate_off() {
  std::lock_guard lk(mu_);
  gate_ = false;
  tickets_ = 0;
  cv_.notify_all();
}

void FakeSource::release(size_t n) {
  std::lock_guard lk(mu_);
  tickets_ += n;
  cv_.notify_all();
}

size_t FakeSource::blocked() const {
  std::lock_guard lk(mu_);
  return blocked_;
}

bool FakeSource::wait_blocked(size_t n, std::chrono::milliseconds timeout) const {
  std::unique_lock lk(mu_);
  return cv_.wait_for(lk, timeout, [&] { return blocked_ >= n; });
}

// ---------------------------------------------------------------- File helpers

ssize_t read_bytes(File& f, uint64_t off, size_t len, std::vector<char>& out) {
  out.clear();
  std::vector<iovec> iov;
  ssize_t n = f.read(off, len, iov);
  if (n < 0) return n;
  size_t total = 0;
  for (const iovec& v : iov) {
    const char* p = static_cast<const char*>(v.iov_base);
    out.insert(out.end(), p, p + v.iov_len);
    total += v.iov_len;
  }
  EXPECT_EQ(total, static_cast<size_t>(n)) << "iovecs do not add up to the returned count";
  return n;
}

std::vector<char> read_or_fail(File& f, uint64_t off, size_t len) {
  std::vector<char> out;
  ssize_t n = read_bytes(f, off, len, out);
  if (n != static_cast<ssize_t>(len))
    ADD_FAILURE() << "read(" << off << ", " << len << ") returned " << n
                  << (n < 0 ? std::string(" (") + std::strerror(static_cast<int>(-n)) + ")" : "");
  return out;
}

FileWithFake make_file(std::unique_ptr<FakeSource> src, Counters& counters,
                       const std::string& name, uint64_t page_size) {
  FileWithFake r;
  r.fake = src.get();
  r.file = std::make_shared<File>(std::move(src), page_size, counters, name);
  return r;
}

}  // namespace deferfs::testing
