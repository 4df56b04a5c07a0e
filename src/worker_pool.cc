#include "worker_pool.h"

#include <pthread.h>
#include <signal.h>

#include "thread_signals.h"

namespace deferfs {

WorkerPool::WorkerPool(unsigned threads) {
  for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this] { run(); });
}

WorkerPool::~WorkerPool() {
  {
    MutexLock lk(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void WorkerPool::post(std::function<void()> work) {
  {
    MutexLock lk(mu_);
    queue_.push_back(std::move(work));
  }
  cv_.notify_one();
}

void WorkerPool::run() {
  pthread_setname_np(pthread_self(), "deferfs-work");
  block_signals_but_faults();
  for (;;) {
    std::function<void()> work;
    {
      MutexLock lk(mu_);
      while (queue_.empty() && !stopping_) cv_.wait(mu_);
      if (queue_.empty()) return;  // stopping, and nothing left to run
      work = std::move(queue_.front());
      queue_.pop_front();
    }
    work();
  }
}

}  // namespace deferfs
