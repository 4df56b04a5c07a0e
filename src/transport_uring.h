// One FUSE-over-io_uring queue: a ring (IORING_SETUP_SQE128) for one CPU,
// its entries (header + payload buffers registered with the kernel) and the
// thread, pinned to that CPU, that owns the ring. Private to the transport.
#pragma once

#include <fuse_lowlevel.h>
#include <liburing.h>
#include <sys/uio.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "deferfs/fuse_uring_abi.h"

namespace deferfs {

class UringQueue;
struct UringEntry;

// The entry the calling ring thread is serving now (nullptr elsewhere): a
// reply written from inside its handler finds its entry without a search.
UringEntry* uring_current_entry();

// One ring entry: what the kernel fills with a request and reads the reply
// from. Memory: one mapping, [header page | payload]; the header struct is
// at the start of the header page, and a request is made contiguous for
// libfuse by copying its two headers into the end of that page, right
// before the payload (names and WRITE data are never copied).
struct UringEntry {
  enum State : int {
    Kernel,     // registered or committed: the kernel owns the buffers
    InHandler,  // a request is being served; `unique` names it
    Replied,    // the reply is in the buffers, its commit not yet submitted
    Dead,       // the connection went away (or the entry failed): never reused
  };
  UringQueue* queue = nullptr;
  char* mem = nullptr;  // the mapping (owned by the queue)
  fuse_abi::UringReqHeader* hdr = nullptr;
  char* payload = nullptr;
  iovec iov[2] = {};  // what REGISTER hands the kernel
  uint32_t last_cmd = 0;
  // State changes: Kernel -> InHandler (ring thread, a CQE), InHandler ->
  // Replied (whoever replies: a CAS, so a request is answered once),
  // Replied -> Kernel (ring thread, commit submitted), any -> Dead (ring thread).
  std::atomic<int> state{Kernel};
  std::atomic<uint64_t> unique{0};  // valid while InHandler/Replied
};

class UringQueue {
 public:
  struct Config {
    fuse_session* se;
    int fuse_fd;          // the session's /dev/fuse fd
    unsigned qid;         // = the CPU it serves
    unsigned depth;       // entries
    size_t payload_size;  // >= the kernel's max payload (max_write, max_pages)
    bool fail_register;   // test hook: register with a too small payload (the kernel refuses)
  };
  // Called once by the ring thread after its REGISTERs were submitted:
  // entries accepted, and the first error (0: none).
  using Reported = std::function<void(unsigned qid, unsigned ok, int err)>;

  UringQueue(const Config& cfg, Reported reported);
  ~UringQueue();  // stop(), then unmaps
  UringQueue(const UringQueue&) = delete;
  UringQueue& operator=(const UringQueue&) = delete;

  // Starts the thread, which pins itself, creates its ring and maps its
  // buffers (on its own CPU); returns once that is done: 0 or -errno.
  int start();
  // The kernel took the INIT reply: register the entries and serve.
  void go();
  // Asks the thread to end (as stop(), without waiting). Any thread.
  void request_stop();
  // Ends the thread (if running): requests in hand are answered first, then
  // the ring is closed (the kernel cancels what is still registered).
  // Idempotent; any thread but the ring's own.
  void stop();

  // The entry serving `unique`, or nullptr. Any thread.
  UringEntry* find(uint64_t unique);
  // Writes a reply (libfuse's iovecs: out header first) into `e` and queues
  // its commit. Returns bytes taken, or -1 with errno (EINVAL: answered
  // already). Any thread.
  ssize_t reply(UringEntry* e, const iovec* iov, int count);

  // On the ring thread: whether a request other than `self` is in hand
  // (served elsewhere, or replied and not committed) or has arrived.
  bool others_in_hand(const UringEntry* self);

  uint64_t requests() const { return requests_.load(std::memory_order_relaxed); }
  // The ring thread's id (set before start() returns).
  pid_t tid() const { return tid_.load(std::memory_order_acquire); }
  unsigned qid() const { return cfg_.qid; }

 private:
  enum class Phase { Starting, Created, Go, Stop };
  void run();
  int setup();
  void serve();
  void prep_cmd(UringEntry* e, uint32_t cmd);
  void arm_event();
  void dispatch(UringEntry* e);
  void commit_pending();
  void handle_cqe(io_uring_cqe* cqe, bool& wake);
  bool in_hand() const;

  const Config cfg_;
  const Reported reported_;
  const size_t entry_bytes_;

  // ---- owned by the ring thread (and by ~UringQueue after join) ----
  io_uring ring_{};
  bool ring_ok_ = false;
  int event_fd_ = -1;
  uint64_t event_buf_ = 0;
  std::unique_ptr<UringEntry[]> entries_;
  std::vector<UringEntry*> local_;  // replied on the ring thread, to commit
  unsigned dead_ = 0;
  unsigned register_retries_ = 0;
  bool reported_done_ = false;  // the registration outcome was reported
  unsigned register_failed_ = 0;
  int register_err_ = 0;
  bool error_logged_ = false;

  // ---- shared; guarded by mu_ ----
  std::mutex mu_;
  std::condition_variable cv_;
  Phase phase_ = Phase::Starting;
  int setup_err_ = 0;
  std::vector<UringEntry*> remote_;  // replied on other threads, to commit

  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> requests_{0};
  std::atomic<pid_t> tid_{0};
  std::thread thread_;
};

}  // namespace deferfs
