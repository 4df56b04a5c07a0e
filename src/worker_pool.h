// Threads that run the work a ring thread must not wait for (a READ whose
// pages come from the disk): a ring thread serves its CPU's requests one at
// a time, so a request blocked on I/O there would hold up every other
// request of that CPU. Private to the transport; it knows nothing of what
// the work is.
#pragma once

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "deferfs/mutex.h"

namespace deferfs {

class WorkerPool {
 public:
  // Starts `threads` threads (named deferfs-work).
  explicit WorkerPool(unsigned threads);
  // Runs every item still queued, then joins the threads.
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Queues `work`; it runs on one of the pool's threads, in the order given
  // when a thread is free. Any thread.
  void post(std::function<void()> work) EXCLUDES(mu_);

 private:
  void run() EXCLUDES(mu_);

  Mutex mu_;
  CondVar cv_;
  std::deque<std::function<void()>> queue_ GUARDED_BY(mu_);
  bool stopping_ GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;  // set in the constructor, joined in the destructor
};

}  // namespace deferfs
