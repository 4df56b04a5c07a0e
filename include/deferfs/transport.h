// How FUSE requests reach the handlers of fuse_ops: the /dev/fuse loop of
// libfuse, or (kernel 6.14+, CONFIG_FUSE_IO_URING, module parameter
// enable_uring) one io_uring per possible CPU, each served by a thread
// pinned to that CPU (FUSE over io_uring, protocol 7.42).
//
// Both paths dispatch through libfuse's own session
// (fuse_session_process_buf) so fuse_ops stays the one place where requests
// are served; the rings are driven through libfuse 3.14's custom-io hooks
// (fuse_session_custom_io), which see every INIT, every reply and every
// notification. The transport knows nothing of files or pages.
#pragma once

#include <fuse_lowlevel.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "deferfs/options.h"

namespace deferfs {

// The module parameter an administrator sets (as root) to allow FUSE over
// io_uring. The daemon only reads it.
inline constexpr const char* kEnableUringParam = "/sys/module/fuse/parameters/enable_uring";

// Whether the kernel allows FUSE over io_uring now; `why_not` (when not)
// names the module parameter and what to do.
struct UringPolicy {
  bool allowed = false;
  std::string why_not;
};
UringPolicy uring_policy(const char* param_path = kEnableUringParam);

// For `stats`: what serves the mount's requests, and why.
struct TransportInfo {
  std::string name;                    // "uring" or "dev"
  std::string reason;                  // one line: the choice and its cause
  std::vector<uint64_t> queue_requests;  // requests served by each ring (index = CPU)
  uint64_t sched_raised = 0;  // times a starved ring thread was lifted out of SCHED_IDLE
};

class UringQueue;
class WorkerPool;
class RingScheduler;

// For handlers that may wait (on a disk, on another thread's load): a ring
// thread serves its CPU's requests one at a time, so a request that waits
// there holds up every later request of that CPU, where libfuse's /dev/fuse
// loop has threads to spare. True while a ring thread serves a request.
bool serving_on_ring();
// On a ring thread: whether its queue holds requests besides the one being
// served (arrived and not yet taken, or handed to a worker). A short wait
// is better taken on the ring thread when it has nothing else to do: a
// hand-off costs two thread wake-ups, as much as a 4 KiB disk read here.
bool ring_has_other_requests();
// Runs `work`, which must send the request's one reply, on one of the
// transport's worker threads when called from a ring thread's handler (the
// reply reaches the ring from there); anywhere else it runs at once.
void run_off_ring(std::function<void()> work);

class Transport {
 public:
  // `se`: mounted (fuse_session_mount done) and daemonized already: ring
  // threads start at INIT, in this process. With mode Dev, or Auto where the
  // kernel does not allow it, this installs nothing and serve() is libfuse's
  // loop alone. Otherwise it installs the custom-io hooks on `se`. At most
  // one Transport per process (the hooks find it through a static pointer:
  // libfuse 3.14 hands them only the session's userdata).
  Transport(fuse_session* se, TransportMode mode);
  ~Transport();
  Transport(const Transport&) = delete;
  Transport& operator=(const Transport&) = delete;

  // Serves the session until it is unmounted or signalled (libfuse's
  // multi-threaded /dev/fuse loop, which also carries FORGET, INTERRUPT and
  // notification replies when the rings serve the rest), then stops the
  // rings: a request a ring thread has begun is answered first. Returns 0,
  // or 1 when the loop failed.
  int serve();

  // Any thread.
  TransportInfo info() const;

  // ---- called by the custom-io hooks and the ring threads ----
  ssize_t on_read(int fd, void* buf, size_t len);
  ssize_t on_writev(int fd, struct iovec* iov, int count);
  fuse_session* session() const { return se_; }

 private:
  // The INIT reply passes here before it reaches the kernel: the rings are
  // set up (threads started, buffers sized by the reply's max_write and
  // max_pages) and, if that worked, FUSE_OVER_IO_URING is set in the reply.
  // Once the kernel has taken the reply, the threads register their entries.
  ssize_t reply_init(int fd, const struct iovec* iov, int count);
  // Ring threads report once their entries are registered (or failed).
  void registered(unsigned qid, unsigned ok, int err);
  void stop_rings();
  void set_state(const std::string& name, const std::string& reason);

  // ---- constant after construction ----
  fuse_session* const se_;
  const TransportMode mode_;
  bool hooks_ = false;  // custom io installed (set in the constructor): rings planned

  // ---- set by the INIT request (read hook), read by the INIT reply ----
  std::atomic<uint64_t> init_unique_{0};
  std::atomic<bool> init_offered_{false};  // the kernel offered FUSE_OVER_IO_URING
  std::atomic<bool> init_done_{false};

  // ---- the rings: created once at INIT, then only read until ~Transport
  // (entries stay mapped until then: a late reply may still look at them) ----
  std::vector<std::unique_ptr<UringQueue>> queues_;
  std::atomic<bool> rings_created_{false};  // queues_ complete (never changes after)
  // Created with the rings, before they serve; ended in stop_rings() once
  // every ring thread is joined (only they post to it), after running what
  // was queued (each item's reply then goes to /dev/fuse, whose connection
  // knows the request no more, or has ended).
  std::unique_ptr<WorkerPool> workers_;
  // The ring threads' scheduling (ring_sched.h): set once every ring is
  // registered, ended first in stop_rings() (it names threads by id, which
  // the system reuses once they end). Guarded by state_mu_.
  std::unique_ptr<RingScheduler> sched_;
  friend void run_off_ring(std::function<void()> work);

  // ---- state for info(); guarded by state_mu_ ----
  mutable std::mutex state_mu_;
  std::condition_variable state_cv_;
  std::string name_ = "dev";
  std::string reason_;
  unsigned reported_ = 0;        // queues that reported their registration
  unsigned queues_ok_ = 0;       // of them, queues with at least one entry
  int first_err_ = 0;
  unsigned first_err_qid_ = 0;
};

}  // namespace deferfs
