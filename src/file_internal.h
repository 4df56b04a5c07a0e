// Helpers shared by the parts of File (file.cc, loader.cc, staging.cc,
// residency.cc, file_commit.cc); private to src/.
#pragma once

#include <time.h>
#include <xxhash.h>

#include <cstdint>
#include <cstring>

namespace deferfs::file_detail {

inline constexpr uint64_t kMaxPageSize = uint64_t{2} << 20;
// Served for holes and cut pages; never written (defined in file.cc).
extern const char kZeros[kMaxPageSize];

inline uint64_t div_up(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

inline bool all_zero(const char* p, size_t n) {
  return n == 0 || (p[0] == 0 && std::memcmp(p, p + 1, n - 1) == 0);
}

inline uint32_t hash32(const char* p, size_t n) { return static_cast<uint32_t>(XXH3_64bits(p, n)); }

inline struct timespec now_realtime() {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return ts;
}

}  // namespace deferfs::file_detail
