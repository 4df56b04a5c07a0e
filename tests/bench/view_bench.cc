// Views against the source read directly (issue 14), with a plain timer.
// Run by view_bench.py, which makes the file, mounts, drops caches:
//   view_bench resident VIEW_PATH SOURCE_PATH [OPS]
//       the view made resident and the source in the page cache: random 4 KiB
//       copies, random 64-byte reads, a sequential sum of 64-bit words.
//   view_bench first VIEW_PATH SOURCE_PATH K
//       caches dropped, nothing loaded: K random first touches of the view
//       against K cold 4 KiB preads of the source (other offsets); then the
//       floor of any such touch on this machine, without deferfs: the same K
//       touches of a private memfd mapping of the same size whose missing
//       pages a thread of this program serves from memory with
//       userfaultfd (pwrite into the memfd, UFFDIO_WAKE), as the daemon does
//       less the source read. A first touch cannot cost less than that floor
//       plus the cold read.
// Prints one JSON object. Never asserts a timing.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "deferfs/client.h"

namespace {

using Clock = std::chrono::steady_clock;

double secs(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

volatile uint64_t g_sink;

uint64_t sum_words(const void* p, size_t n) {
  const auto* w = static_cast<const uint64_t*>(p);
  uint64_t s = 0;
  for (size_t i = 0; i < n / 8; ++i) s += w[i];
  return s;
}

std::vector<uint64_t> offsets(uint64_t size, size_t n, uint64_t align, uint64_t len, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint64_t> out(n);
  for (auto& o : out) o = (rng() % ((size - len) / align)) * align;
  return out;
}

template <typename F>
double best_of(int rounds, F f) {
  double best = 1e300;
  for (int r = 0; r < rounds; ++r) {
    const auto a = Clock::now();
    f();
    best = std::min(best, secs(a, Clock::now()));
  }
  return best;
}

int resident(const std::string& view_path, const std::string& src_path, size_t ops) {
  deferfs::View v = deferfs::View::open(view_path);
  const int fd = ::open(src_path.c_str(), O_RDONLY);
  if (fd < 0) {
    std::perror(src_path.c_str());
    return 1;
  }
  const uint64_t size = v.size();
  const char* base = reinterpret_cast<const char*>(v.data());
  // Make both sides resident: the view's pages loaded and mapped, the
  // source's in the page cache.
  std::vector<char> buf(1 << 20);
  uint64_t want = 0, got = 0;
  for (uint64_t off = 0; off < size; off += buf.size()) {
    const ssize_t n = ::pread(fd, buf.data(), buf.size(), static_cast<off_t>(off));
    if (n <= 0) break;
    want += sum_words(buf.data(), static_cast<size_t>(n));
  }
  got = sum_words(base, size);
  if (got != want) {
    std::fprintf(stderr, "view and source differ (sum %llu vs %llu)\n", (unsigned long long)got,
                 (unsigned long long)want);
    return 1;
  }

  const auto o4k = offsets(size, ops, 4096, 4096, 1);
  char page[4096];
  const double view4k = best_of(3, [&] {
    for (uint64_t o : o4k) {
      std::memcpy(page, base + o, 4096);
      g_sink = g_sink + static_cast<uint64_t>(page[17]);
    }
  });
  const double pread4k = best_of(3, [&] {
    for (uint64_t o : o4k) {
      if (::pread(fd, page, 4096, static_cast<off_t>(o)) != 4096) std::abort();
      g_sink = g_sink + static_cast<uint64_t>(page[17]);
    }
  });
  const auto o64 = offsets(size, ops, 64, 64, 2);
  const double view64 = best_of(3, [&] {
    for (uint64_t o : o64) {
      std::memcpy(page, base + o, 64);
      g_sink = g_sink + static_cast<uint64_t>(page[7]);
    }
  });
  const double pread64 = best_of(3, [&] {
    for (uint64_t o : o64) {
      if (::pread(fd, page, 64, static_cast<off_t>(o)) != 64) std::abort();
      g_sink = g_sink + static_cast<uint64_t>(page[7]);
    }
  });
  // The library's read(): signal-free, one system call per copy.
  const double libread4k = best_of(3, [&] {
    for (uint64_t o : o4k) {
      if (v.read(o, 4096, page) != 4096) std::abort();
      g_sink = g_sink + static_cast<uint64_t>(page[17]);
    }
  });
  uint64_t s1 = 0, s2 = 0;
  const double scan_view = best_of(3, [&] { s1 = sum_words(base, size); });
  const double scan_read = best_of(3, [&] {
    uint64_t s = 0;
    for (uint64_t off = 0; off < size; off += buf.size()) {
      const ssize_t n = ::pread(fd, buf.data(), buf.size(), static_cast<off_t>(off));
      if (n <= 0) break;
      s += sum_words(buf.data(), static_cast<size_t>(n));
    }
    s2 = s;
  });
  if (s1 != s2) return 1;
  ::close(fd);
  const double n = static_cast<double>(ops);
  std::printf(
      "{\"size\": %llu, \"ops\": %zu,\n"
      " \"rand4k_view_ns\": %.1f, \"rand4k_pread_ns\": %.1f, \"rand4k_ratio\": %.2f,\n"
      " \"rand4k_libread_ns\": %.1f,\n"
      " \"rand64_view_ns\": %.1f, \"rand64_pread_ns\": %.1f, \"rand64_ratio\": %.2f,\n"
      " \"scan_view_gbps\": %.2f, \"scan_read_gbps\": %.2f, \"scan_ratio\": %.2f}\n",
      (unsigned long long)size, ops, view4k / n * 1e9, pread4k / n * 1e9, pread4k / view4k, libread4k / n * 1e9,
      view64 / n * 1e9, pread64 / n * 1e9, pread64 / view64, size / scan_view / 1e9, size / scan_read / 1e9,
      scan_read / scan_view);
  return 0;
}

double median_of(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  return x[x.size() / 2];
}

// The userfaultfd round trip alone (see the top of the file): the median
// microseconds of k touches `stride` apart in a mapping of `size` bytes, or
// a negative number when this kernel refuses (the figure is then omitted).
double uffd_floor_us(uint64_t size, uint64_t stride, size_t k) {
  const int mfd = ::memfd_create("view_bench_floor", MFD_CLOEXEC);
  if (mfd < 0 || ::ftruncate(mfd, static_cast<off_t>(size)) != 0) return -1;
  const std::string self = "/proc/self/fd/" + std::to_string(mfd);
  const int ro = ::open(self.c_str(), O_RDONLY | O_CLOEXEC);
  void* map = ro < 0 ? MAP_FAILED : ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, ro, 0);
  const int uffd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY));
  double result = -1;
  int stop[2] = {-1, -1};
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_MISSING_SHMEM;
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uint64_t>(map);
  reg.range.len = size;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  if (map != MAP_FAILED && uffd >= 0 && ::ioctl(uffd, UFFDIO_API, &api) == 0 &&
      ::ioctl(uffd, UFFDIO_REGISTER, &reg) == 0 && ::pipe2(stop, O_CLOEXEC) == 0) {
    std::thread server([&] {
      static char page[4096];
      for (;;) {
        pollfd fds[2] = {{uffd, POLLIN, 0}, {stop[0], POLLIN, 0}};
        if (::poll(fds, 2, -1) < 0 || fds[1].revents) return;
        uffd_msg m;
        while (::read(uffd, &m, sizeof m) == static_cast<ssize_t>(sizeof m)) {
          if (m.event != UFFD_EVENT_PAGEFAULT) continue;
          const uint64_t at = m.arg.pagefault.address / 4096 * 4096;
          if (::pwrite(mfd, page, 4096, static_cast<off_t>(at - reg.range.start)) != 4096) std::abort();
          uffdio_range r{at, 4096};
          (void)::ioctl(uffd, UFFDIO_WAKE, &r);
        }
      }
    });
    const char* base = static_cast<const char*>(map);
    std::vector<double> t;
    for (size_t i = 0; i < k; ++i) {
      const auto a = Clock::now();
      g_sink = g_sink + static_cast<uint64_t>(base[(2 * i) * stride / 4096 * 4096 + 100]);
      t.push_back(secs(a, Clock::now()) * 1e6);
    }
    (void)!::write(stop[1], "s", 1);
    server.join();
    result = median_of(t);
  }
  for (int fd : {stop[0], stop[1], uffd, ro, mfd})
    if (fd >= 0) ::close(fd);
  if (map != MAP_FAILED) ::munmap(map, size);
  return result;
}

int first_touch(const std::string& view_path, const std::string& src_path, size_t k) {
  const int fd = ::open(src_path.c_str(), O_RDONLY);
  if (fd < 0) {
    std::perror(src_path.c_str());
    return 1;
  }
  deferfs::View v = deferfs::View::open(view_path);
  const uint64_t size = v.size();
  const char* base = reinterpret_cast<const char*>(v.data());
  // Far apart (no readahead cluster shared), different for the two sides.
  const uint64_t stride = size / (2 * k);
  std::vector<double> tv, tp;
  char page[4096];
  for (size_t i = 0; i < k; ++i) {
    const uint64_t ov = (2 * i) * stride / 4096 * 4096, op = (2 * i + 1) * stride / 4096 * 4096;
    auto a = Clock::now();
    g_sink = g_sink + static_cast<uint64_t>(base[ov + 100]);
    auto b = Clock::now();
    if (::pread(fd, page, 4096, static_cast<off_t>(op)) != 4096) std::abort();
    auto c = Clock::now();
    tv.push_back(secs(a, b) * 1e6);
    tp.push_back(secs(b, c) * 1e6);
  }
  ::close(fd);
  const double floor_us = uffd_floor_us(size, stride, k);
  std::printf("{\"k\": %zu, \"first_touch_view_us\": %.1f, \"cold_pread_us\": %.1f, \"first_touch_ratio\": %.2f",
              k, median_of(tv), median_of(tp), median_of(tv) / median_of(tp));
  if (floor_us >= 0) {
    std::printf(",\n \"uffd_floor_us\": %.1f, \"floor_ratio\": %.2f", floor_us,
                (floor_us + median_of(tp)) / median_of(tp));
  }
  std::printf("}\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: view_bench resident|first VIEW_PATH SOURCE_PATH [N]\n");
    return 2;
  }
  const std::string mode = argv[1];
  try {
    if (mode == "resident") return resident(argv[2], argv[3], argc > 4 ? std::stoul(argv[4]) : 200000);
    if (mode == "first") return first_touch(argv[2], argv[3], argc > 4 ? std::stoul(argv[4]) : 200);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "view_bench: %s\n", e.what());
    return 1;
  }
  std::fprintf(stderr, "view_bench: unknown mode %s\n", mode.c_str());
  return 2;
}
