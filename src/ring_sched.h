// How the ring threads are scheduled: SCHED_IDLE, with a guard that lifts a
// ring thread to SCHED_OTHER while it waits too long for its CPU. Private
// to the transport.
//
// Why idle: a ring thread wakes the requester with its reply while it still
// runs on the requester's CPU, so the scheduler, seeing that CPU busy, moves
// the requester to another CPU; on a VM whose idle vCPUs halt, that costs a
// wake-up of a halted vCPU per request. A CPU whose only runnable thread is
// SCHED_IDLE counts as idle for that choice: the requester stays, preempts
// the ring thread at once, and the next request lands on the same ring
// (random 4 KiB reads from the segments, 512 MiB file: 29 -> 42 thousand
// per second; transport_bench case e).
//
// Why the guard: a SCHED_IDLE thread gets almost no CPU while a normal
// thread of its own scheduling group is busy on its CPU (the daemon is its
// own session, so its own group under autogroup; with autogroup off, any busy
// thread). Every kPeriod (kQuietPeriod while every ring thread sleeps) the
// guard looks at each ring thread (/proc/self/task/TID/stat and schedstat):
// one found runnable twice in a row without having run in between has
// waited a whole period for its CPU, and runs SCHED_OTHER for kRaisedFor,
// then idle again. (schedstat's wait time is no use here: the kernel adds a
// wait to it only once the wait ends.)
//
// Only where it can be undone: an unprivileged thread may not leave
// SCHED_IDLE (EPERM without CAP_SYS_NICE or RLIMIT_NICE), so the threads
// stay SCHED_OTHER when a trial switch back fails.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "deferfs/mutex.h"

namespace deferfs {

class RingScheduler {
 public:
  static constexpr std::chrono::milliseconds kPeriod{10};
  static constexpr std::chrono::milliseconds kQuietPeriod{100};
  static constexpr std::chrono::milliseconds kRaisedFor{2000};

  // `tids`: the ring threads (running). Sets their policy and, if that
  // worked, starts the guard.
  explicit RingScheduler(std::vector<pid_t> tids);
  ~RingScheduler();  // stops the guard (the threads keep their policy)
  RingScheduler(const RingScheduler&) = delete;
  RingScheduler& operator=(const RingScheduler&) = delete;

  // One line for stats: the policy, or why it is not idle.
  std::string describe() const { return describe_; }
  // Times a ring thread was lifted to SCHED_OTHER for waiting too long.
  uint64_t raised() const { return raised_.load(std::memory_order_relaxed); }

 private:
  struct Ring {
    pid_t tid;
    int stat_fd = -1;       // /proc/self/task/TID/stat
    int schedstat_fd = -1;  // /proc/self/task/TID/schedstat
    bool was_runnable = false;  // at the last look
    uint64_t ran_ns = 0;        // time on a CPU at the last look
    std::chrono::steady_clock::time_point raised_until{};  // SCHED_OTHER until then
    bool raised = false;
  };
  void run();
  // Returns whether the thread is runnable now.
  bool check(Ring& r, std::chrono::steady_clock::time_point now);

  std::vector<Ring> rings_;  // the guard thread's alone once it runs
  std::string describe_;     // set in the constructor
  std::atomic<uint64_t> raised_{0};
  Mutex mu_;
  CondVar cv_;
  bool stop_ GUARDED_BY(mu_) = false;
  std::thread guard_;
};

}  // namespace deferfs
