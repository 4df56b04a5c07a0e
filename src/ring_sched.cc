#include "ring_sched.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>

#include "deferfs/log.h"
#include "thread_signals.h"

namespace deferfs {

namespace {

int set_policy(pid_t tid, int policy) {
  sched_param sp{};
  return sched_setscheduler(tid, policy, &sp) == 0 ? 0 : errno;
}

// Reads a small /proc file from its start into buf (NUL-terminated).
bool read_proc(int fd, char* buf, size_t size) {
  const ssize_t n = fd < 0 ? -1 : pread(fd, buf, size - 1, 0);
  if (n <= 0) return false;
  buf[n] = 0;
  return true;
}

// The state letter of /proc/.../stat ("pid (comm) S ..."; comm may hold
// spaces and parentheses, so from the last ')').
char thread_state(int stat_fd) {
  char buf[512];
  if (!read_proc(stat_fd, buf, sizeof buf)) return '?';
  const char* close = std::strrchr(buf, ')');
  return close && close[1] == ' ' ? close[2] : '?';
}

bool ran_ns(int schedstat_fd, uint64_t& ns) {
  char buf[128];
  return read_proc(schedstat_fd, buf, sizeof buf) && std::sscanf(buf, "%" SCNu64, &ns) == 1;
}

int open_task_file(pid_t tid, const char* name) {
  char path[64];
  std::snprintf(path, sizeof path, "/proc/self/task/%d/%s", static_cast<int>(tid), name);
  return open(path, O_RDONLY | O_CLOEXEC);
}

}  // namespace

RingScheduler::RingScheduler(std::vector<pid_t> tids) {
  for (pid_t t : tids) rings_.push_back(Ring{t});
  if (rings_.empty()) return;
  // Can we come back? Try it on the first thread.
  int err = set_policy(rings_[0].tid, SCHED_IDLE);
  if (!err && (err = set_policy(rings_[0].tid, SCHED_OTHER)) != 0) {
    describe_ = std::string("ring threads SCHED_OTHER (cannot leave SCHED_IDLE again: ") + std::strerror(err) + ")";
    return;
  }
  if (err) {
    describe_ = std::string("ring threads SCHED_OTHER (SCHED_IDLE refused: ") + std::strerror(err) + ")";
    return;
  }
  for (Ring& r : rings_) {
    r.stat_fd = open_task_file(r.tid, "stat");
    r.schedstat_fd = open_task_file(r.tid, "schedstat");
    if (thread_state(r.stat_fd) == '?' || !ran_ns(r.schedstat_fd, r.ran_ns)) {
      describe_ = "ring threads SCHED_OTHER (cannot watch them in /proc/self/task to guard SCHED_IDLE)";
      return;  // the destructor closes what was opened
    }
  }
  for (Ring& r : rings_)
    if (int e = set_policy(r.tid, SCHED_IDLE)) log_debug("ring thread %d: SCHED_IDLE: %s", r.tid, std::strerror(e));
  describe_ = "ring threads SCHED_IDLE, raised while starved";
  // Made on a ring thread, the guard would be born with its name (tests and
  // tools tell ring threads by name), its CPU and its policy: give this
  // thread the guard's name and the process's CPUs while it starts it (the
  // guard leaves SCHED_IDLE itself, first thing).
  char own_name[16] = "";
  pthread_getname_np(pthread_self(), own_name, sizeof own_name);
  cpu_set_t own_cpus, all_cpus;
  const bool cpus_known = sched_getaffinity(0, sizeof own_cpus, &own_cpus) == 0 &&
                          sched_getaffinity(getpid(), sizeof all_cpus, &all_cpus) == 0;
  pthread_setname_np(pthread_self(), "deferfs-rsched");
  if (cpus_known) sched_setaffinity(0, sizeof all_cpus, &all_cpus);
  guard_ = std::thread([this] { run(); });
  if (cpus_known) sched_setaffinity(0, sizeof own_cpus, &own_cpus);
  pthread_setname_np(pthread_self(), own_name);
}

RingScheduler::~RingScheduler() {
  {
    MutexLock lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (guard_.joinable()) guard_.join();
  for (Ring& r : rings_) {
    if (r.stat_fd >= 0) close(r.stat_fd);
    if (r.schedstat_fd >= 0) close(r.schedstat_fd);
  }
}

bool RingScheduler::check(Ring& r, std::chrono::steady_clock::time_point now) {
  const bool runnable = thread_state(r.stat_fd) == 'R';
  uint64_t ran = r.ran_ns;
  ran_ns(r.schedstat_fd, ran);
  const bool starved = runnable && r.was_runnable && ran == r.ran_ns;
  r.was_runnable = runnable;
  r.ran_ns = ran;
  if (!r.raised && starved) {
    if (set_policy(r.tid, SCHED_OTHER) == 0) {
      r.raised = true;
      r.raised_until = now + kRaisedFor;
      if (raised_.fetch_add(1, std::memory_order_relaxed) == 0)
        log_info("transport: ring thread %d waited over %lld ms for its CPU: SCHED_OTHER for %lld ms "
                 "(and so whenever it starves again)",
                 r.tid, static_cast<long long>(kPeriod.count()), static_cast<long long>(kRaisedFor.count()));
    }
  } else if (r.raised && now >= r.raised_until) {
    if (set_policy(r.tid, SCHED_IDLE) == 0) r.raised = false;
  }
  return runnable;
}

void RingScheduler::run() {
  // Started by a ring thread, idle already: the guard must not starve.
  set_policy(0, SCHED_OTHER);
  block_signals_but_faults();
  bool busy = true;
  for (;;) {
    {
      MutexLock lk(mu_);
      if (!stop_) cv_.wait_for(mu_, busy ? kPeriod : kQuietPeriod);
      if (stop_) return;
    }
    const auto now = std::chrono::steady_clock::now();
    busy = false;
    for (Ring& r : rings_) busy |= check(r, now);
  }
}

}  // namespace deferfs
