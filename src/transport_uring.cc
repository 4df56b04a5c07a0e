#include "transport_uring.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <setjmp.h>

#include <cerrno>
#include <cstdio>
#include <chrono>
#include <cstring>
#include <mutex>
#include <stdexcept>

#include "deferfs/fd_memory.h"
#include "deferfs/log.h"
#include "thread_signals.h"

namespace deferfs {

namespace {

using namespace fuse_abi;

constexpr size_t kHeaderPage = 4096;
constexpr uint64_t kEventTag = 1;  // user_data of the eventfd read (entries are pointers)
constexpr size_t kMaxOpHeader = kUringOpInOutSize;
// A request made contiguous for libfuse starts at most this far before the
// payload, inside the header page and clear of the header struct.
static_assert(sizeof(UringReqHeader) + sizeof(InHeader) + kMaxOpHeader <= kHeaderPage);

// The queue whose thread this is (nullptr elsewhere), and the entry it serves now.
thread_local UringQueue* tl_queue = nullptr;
thread_local UringEntry* tl_entry = nullptr;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// The reply's data is copied here, in user space (with /dev/fuse the
// kernel copies it and a vanished page is an EFAULT): a page of a segment
// that disappears under the copy (truncated, punched) raises SIGBUS, which
// must fail that one reply, never kill the daemon. The handler jumps back
// only out of a copy in progress; any other SIGBUS goes to the previous
// disposition. SA_NODEFER: the jump leaves SIGBUS unblocked.
thread_local sigjmp_buf* tl_copy_jmp = nullptr;
struct sigaction g_prev_bus;

void on_sigbus(int sig, siginfo_t* si, void* ctx) {
  if (sigjmp_buf* jb = tl_copy_jmp) {
    tl_copy_jmp = nullptr;
    siglongjmp(*jb, 1);
  }
  if (g_prev_bus.sa_flags & SA_SIGINFO) {
    g_prev_bus.sa_sigaction(sig, si, ctx);
  } else if (g_prev_bus.sa_handler != SIG_DFL && g_prev_bus.sa_handler != SIG_IGN) {
    g_prev_bus.sa_handler(sig);
  } else {
    signal(sig, SIG_DFL);
    raise(sig);
  }
}

void install_sigbus_guard() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa{};
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &g_prev_bus);
  });
}

// memcpy that returns false instead of dying when a page of `from`
// vanishes under it (SIGBUS).
bool guarded_memcpy(char* to, const char* from, size_t n) {
  sigjmp_buf jb;
  if (sigsetjmp(jb, 0) != 0) return false;
  tl_copy_jmp = &jb;
  std::memcpy(to, from, n);
  tl_copy_jmp = nullptr;
  return true;
}

// Copies the iovecs' bytes after `skip` into `to` (at most `max`); false
// if a source page faulted or could not be read. Memory that maps a file
// (a segment's pages) is copied by the kernel (fd_memory.h: a user-mode
// copy of pages not touched yet costs a hypervisor fault per page here).
bool copy_reply(char* to, size_t max, const iovec* iov, int count, size_t skip) {
  size_t at = 0;
  for (int i = 0; i < count && at < max; ++i) {
    if (iov[i].iov_len <= skip) {
      skip -= iov[i].iov_len;
      continue;
    }
    size_t n = std::min(iov[i].iov_len - skip, max - at);
    const char* from = static_cast<const char*>(iov[i].iov_base) + skip;
    const ssize_t by_fd = fd_memory::copy_out(to + at, from, n);
    if (by_fd < 0 || (by_fd == 0 && !guarded_memcpy(to + at, from, n))) return false;
    skip = 0;
    at += n;
  }
  return true;
}

}  // namespace

UringEntry* uring_current_entry() { return tl_entry; }

UringQueue::UringQueue(const Config& cfg, Reported reported)
    : cfg_(cfg), reported_(std::move(reported)), entry_bytes_(kHeaderPage + round_up(cfg.payload_size, 4096)) {
  install_sigbus_guard();
}

UringQueue::~UringQueue() {
  stop();
  if (entries_)
    for (unsigned i = 0; i < cfg_.depth; ++i)
      if (entries_[i].mem) munmap(entries_[i].mem, entry_bytes_);
  if (event_fd_ >= 0) close(event_fd_);
}

int UringQueue::start() {
  thread_ = std::thread([this] { run(); });
  std::unique_lock lk(mu_);
  cv_.wait(lk, [this] { return phase_ != Phase::Starting; });
  return setup_err_;
}

void UringQueue::go() {
  std::lock_guard lk(mu_);
  if (phase_ == Phase::Created) phase_ = Phase::Go;
  cv_.notify_all();
}

void UringQueue::stop() {
  request_stop();
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

void UringQueue::request_stop() {
  {
    std::lock_guard lk(mu_);
    if (phase_ != Phase::Go) phase_ = Phase::Stop;  // never went: the thread ends without serving
    cv_.notify_all();
  }
  stopping_.store(true);
  if (event_fd_ >= 0) {
    uint64_t one = 1;
    (void)!write(event_fd_, &one, sizeof one);
  }
}

UringEntry* UringQueue::find(uint64_t unique) {
  if (!entries_) return nullptr;
  for (unsigned i = 0; i < cfg_.depth; ++i) {
    UringEntry& e = entries_[i];
    if (e.state.load(std::memory_order_acquire) == UringEntry::InHandler &&
        e.unique.load(std::memory_order_relaxed) == unique)
      return &e;
  }
  return nullptr;
}

ssize_t UringQueue::reply(UringEntry* e, const iovec* iov, int count) {
  size_t total = 0;
  for (int i = 0; i < count; ++i) total += iov[i].iov_len;
  if (count < 1 || iov[0].iov_len < sizeof(OutHeader)) {
    errno = EINVAL;
    return -1;
  }
  // One answer per request: whoever flips InHandler -> Replied writes it.
  int expected = UringEntry::InHandler;
  if (!e->state.compare_exchange_strong(expected, UringEntry::Replied, std::memory_order_acq_rel)) {
    errno = EINVAL;
    return -1;
  }
  OutHeader out;
  std::memcpy(&out, iov[0].iov_base, sizeof out);
  size_t data = total - sizeof(OutHeader);
  if (data > cfg_.payload_size) {
    // Cannot happen with the sizes the kernel was given; never overflow.
    log_error("uring queue %u: a reply of %zu bytes does not fit the %zu-byte payload buffer: answered EIO",
              cfg_.qid, data, cfg_.payload_size);
    out.error = -EIO;
    data = 0;
  }
  // The one copy of the reply's data: straight from where the handler has
  // it (a segment's pages for READ) into the ring's payload buffer.
  if (data && !copy_reply(e->payload, data, iov, count, sizeof(OutHeader))) {
    log_error("uring queue %u: the data of the reply to request %llu could not be copied (a page vanished, or its segment could not be read): answered EIO",
              cfg_.qid, static_cast<unsigned long long>(out.unique));
    out.error = -EIO;
    data = 0;
  }
  out.len = static_cast<uint32_t>(sizeof(OutHeader) + data);
  std::memcpy(e->hdr->in_out, &out, sizeof out);
  e->hdr->ring_ent_in_out.payload_sz = static_cast<uint32_t>(data);
  if (tl_queue == this) {
    local_.push_back(e);  // committed by this thread after the handler returns
  } else {
    {
      std::lock_guard lk(mu_);
      remote_.push_back(e);
    }
    uint64_t one = 1;
    (void)!write(event_fd_, &one, sizeof one);
  }
  return static_cast<ssize_t>(total);
}

// ------------------------------------------------------------ ring thread

void UringQueue::run() {
  tl_queue = this;
  tid_.store(gettid(), std::memory_order_release);
  char name[16];
  std::snprintf(name, sizeof name, "deferfs-uring%u", cfg_.qid % 100);
  pthread_setname_np(pthread_self(), name);
  block_signals_but_faults();
  cpu_set_t cpus;
  CPU_ZERO(&cpus);
  CPU_SET(cfg_.qid, &cpus);
  if (sched_setaffinity(0, sizeof cpus, &cpus) != 0)
    log_debug("uring queue %u: cannot pin to CPU %u: %s", cfg_.qid, cfg_.qid, std::strerror(errno));
  int err = setup();
  bool serve_now = false;
  {
    std::unique_lock lk(mu_);
    setup_err_ = err;
    if (phase_ == Phase::Starting) phase_ = Phase::Created;
    cv_.notify_all();
    cv_.wait(lk, [this] { return phase_ != Phase::Created; });
    serve_now = err == 0 && phase_ == Phase::Go;
  }
  if (serve_now) serve();
  // No entry is matched by a reply any more.
  if (entries_)
    for (unsigned i = 0; i < cfg_.depth; ++i) entries_[i].state.store(UringEntry::Dead);
  if (ring_ok_) io_uring_queue_exit(&ring_);  // the kernel cancels what is still registered
  ring_ok_ = false;
  tl_queue = nullptr;
}

int UringQueue::setup() {
  io_uring_params p{};
  // Every SQE of this ring is submitted by this thread, and the kernel's
  // deliveries (task work) run when it waits: single issuer, deferred task run.
  p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
  p.cq_entries = 2 * (cfg_.depth + 2);
  int rc = io_uring_queue_init_params(cfg_.depth + 2, &ring_, &p);
  if (rc == -EINVAL) {  // a kernel before 6.1: without the two
    p = io_uring_params{};
    p.flags = IORING_SETUP_SQE128 | IORING_SETUP_CQSIZE;
    p.cq_entries = 2 * (cfg_.depth + 2);
    rc = io_uring_queue_init_params(cfg_.depth + 2, &ring_, &p);
  }
  if (rc < 0) return rc;
  ring_ok_ = true;
  event_fd_ = eventfd(0, EFD_CLOEXEC);
  if (event_fd_ < 0) return -errno;
  entries_ = std::make_unique<UringEntry[]>(cfg_.depth);
  for (unsigned i = 0; i < cfg_.depth; ++i) {
    UringEntry& e = entries_[i];
    void* m = mmap(nullptr, entry_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return -errno;
    e.queue = this;
    e.mem = static_cast<char*>(m);
    e.hdr = reinterpret_cast<UringReqHeader*>(e.mem);
    e.payload = e.mem + kHeaderPage;
    e.iov[0] = iovec{e.hdr, sizeof(UringReqHeader)};
    e.iov[1] = iovec{e.payload, cfg_.fail_register ? size_t{4096} : cfg_.payload_size};
  }
  return 0;
}

void UringQueue::prep_cmd(UringEntry* e, uint32_t cmd) {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  // The SQ holds one SQE per entry plus the eventfd read: never full.
  if (!sqe) throw std::logic_error("uring queue: submission queue full");
  std::memset(sqe, 0, 2 * sizeof(io_uring_sqe));  // SQE128
  sqe->opcode = IORING_OP_URING_CMD;
  sqe->fd = cfg_.fuse_fd;
  sqe->cmd_op = cmd;
  if (cmd == kUringCmdRegister) {
    sqe->addr = reinterpret_cast<uintptr_t>(e->iov);
    sqe->len = 2;
  }
  auto* req = reinterpret_cast<UringCmdReq*>(sqe->cmd);
  req->qid = static_cast<uint16_t>(cfg_.qid);
  req->commit_id = cmd == kUringCmdCommitAndFetch ? e->unique.load(std::memory_order_relaxed) : 0;
  io_uring_sqe_set_data(sqe, e);
  e->last_cmd = cmd;
}

void UringQueue::arm_event() {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (!sqe) throw std::logic_error("uring queue: submission queue full");
  io_uring_prep_read(sqe, event_fd_, &event_buf_, sizeof event_buf_, 0);
  io_uring_sqe_set_data64(sqe, kEventTag);
}

bool UringQueue::in_hand() const {
  for (unsigned i = 0; i < cfg_.depth; ++i) {
    int s = entries_[i].state.load(std::memory_order_acquire);
    if (s == UringEntry::InHandler || s == UringEntry::Replied) return true;
  }
  return false;
}

bool UringQueue::others_in_hand(const UringEntry* self) {
  // The CQE that brought `self` is still in the ring (seen after dispatch).
  if (io_uring_cq_ready(&ring_) > 1 || !local_.empty()) return true;
  for (unsigned i = 0; i < cfg_.depth; ++i) {
    if (&entries_[i] == self) continue;
    int s = entries_[i].state.load(std::memory_order_acquire);
    if (s == UringEntry::InHandler || s == UringEntry::Replied) return true;
  }
  return false;
}

void UringQueue::commit_pending() {
  for (UringEntry* e : local_) {
    prep_cmd(e, kUringCmdCommitAndFetch);
    e->state.store(UringEntry::Kernel, std::memory_order_release);
  }
  local_.clear();
}

void UringQueue::dispatch(UringEntry* e) {
  InHeader in;
  std::memcpy(&in, e->hdr->in_out, sizeof in);
  const uint32_t payload_sz = e->hdr->ring_ent_in_out.payload_sz;
  const uint64_t commit_id = e->hdr->ring_ent_in_out.commit_id;
  e->unique.store(commit_id, std::memory_order_relaxed);
  requests_.fetch_add(1, std::memory_order_relaxed);
  if (in.len < sizeof in + payload_sz || in.len - sizeof in - payload_sz > kMaxOpHeader ||
      payload_sz > cfg_.payload_size || in.unique != commit_id) {
    log_error("uring queue %u: malformed request (len %u, payload %u, opcode %u): answered EIO", cfg_.qid, in.len,
              payload_sz, in.opcode);
    OutHeader out{sizeof(OutHeader), -EIO, commit_id};
    std::memcpy(e->hdr->in_out, &out, sizeof out);
    e->hdr->ring_ent_in_out.payload_sz = 0;
    e->state.store(UringEntry::Replied, std::memory_order_release);
    local_.push_back(e);
    return;
  }
  const size_t op_len = in.len - sizeof in - payload_sz;
  // [in header | op header | payload] in one piece, as read(/dev/fuse)
  // gives it: the headers go right before the payload.
  char* start = e->payload - op_len - sizeof in;
  std::memcpy(start, &in, sizeof in);
  std::memcpy(start + sizeof in, e->hdr->op_in, op_len);
  fuse_buf buf{};
  buf.mem = start;
  buf.size = in.len;
  e->state.store(UringEntry::InHandler, std::memory_order_release);
  tl_entry = e;
  fuse_session_process_buf(cfg_.se, &buf);
  tl_entry = nullptr;
}

void UringQueue::handle_cqe(io_uring_cqe* cqe, bool& wake) {
  if (cqe->user_data == kEventTag) {
    wake = true;
    return;
  }
  auto* e = reinterpret_cast<UringEntry*>(static_cast<uintptr_t>(cqe->user_data));
  const int res = cqe->res;
  if (res == 0) {  // a request arrived in e
    dispatch(e);
    return;
  }
  if ((res == -EAGAIN || res == -EINTR) && e->last_cmd == kUringCmdRegister && ++register_retries_ < 5000) {
    // The kernel has not processed INIT yet: try again shortly.
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    prep_cmd(e, kUringCmdRegister);
    return;
  }
  if (res == -ENOENT && e->last_cmd == kUringCmdCommitAndFetch) {
    // The kernel no longer knew the request (ended while we served it):
    // the entry itself is fine, hand it back.
    log_debug("uring queue %u: commit of %llu: no such request; entry registered again", cfg_.qid,
              static_cast<unsigned long long>(e->unique.load()));
    prep_cmd(e, kUringCmdRegister);
    return;
  }
  e->state.store(UringEntry::Dead, std::memory_order_release);
  ++dead_;
  if (e->last_cmd == kUringCmdRegister && !reported_done_) {
    ++register_failed_;
    if (!register_err_) register_err_ = res;
  } else if (res != -ENOTCONN && res != -ECONNABORTED && res != -ECANCELED && !error_logged_) {
    error_logged_ = true;
    log_error("uring queue %u: ring command failed: %s", cfg_.qid, std::strerror(-res));
  }
}

void UringQueue::serve() {
  for (unsigned i = 0; i < cfg_.depth; ++i) prep_cmd(&entries_[i], kUringCmdRegister);
  arm_event();
  int rc = io_uring_submit(&ring_);
  // A refused REGISTER completes at once (it is issued inline by the submit).
  bool wake = false;
  io_uring_cqe* cqe;
  while (io_uring_peek_cqe(&ring_, &cqe) == 0) {
    handle_cqe(cqe, wake);
    io_uring_cqe_seen(&ring_, cqe);
  }
  reported_done_ = true;
  unsigned ok = rc < 0 ? 0 : cfg_.depth - register_failed_;
  reported_(cfg_.qid, ok, rc < 0 ? rc : register_err_);
  auto stop_deadline = std::chrono::steady_clock::time_point::max();
  for (;;) {
    if (wake) {
      wake = false;
      {
        std::lock_guard lk(mu_);
        local_.insert(local_.end(), remote_.begin(), remote_.end());
        remote_.clear();
      }
      arm_event();
    }
    commit_pending();
    if (dead_ == cfg_.depth) break;
    if (stopping_.load()) {
      // Answer what is in hand, take nothing new.
      if (!in_hand()) break;
      if (stop_deadline == std::chrono::steady_clock::time_point::max())
        stop_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      if (std::chrono::steady_clock::now() > stop_deadline) {
        log_error("uring queue %u: a request still unanswered 5 s after stop; ring closed anyway", cfg_.qid);
        break;
      }
    }
    __kernel_timespec ts{0, 100 * 1000 * 1000};
    rc = stopping_.load() ? io_uring_submit_and_wait_timeout(&ring_, &cqe, 1, &ts, nullptr)
                          : io_uring_submit_and_wait(&ring_, 1);
    if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY && rc != -ETIME) {
      log_error("uring queue %u: io_uring_enter: %s; queue stopped", cfg_.qid, std::strerror(-rc));
      break;
    }
    while (io_uring_peek_cqe(&ring_, &cqe) == 0) {
      handle_cqe(cqe, wake);
      io_uring_cqe_seen(&ring_, cqe);
      // More requests wait: send this reply now rather than after them.
      if (!local_.empty() && io_uring_cq_ready(&ring_) > 0) {
        commit_pending();
        io_uring_submit(&ring_);
      }
    }
  }
  commit_pending();
  io_uring_submit(&ring_);  // the last commits: answered before the ring closes
}

}  // namespace deferfs
