#include "deferfs/transport.h"

#include <csignal>
#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>

#include "deferfs/fuse_uring_abi.h"
#include "deferfs/log.h"
#include "transport_uring.h"
#include "ring_sched.h"
#include "worker_pool.h"

namespace deferfs {

namespace {

using namespace fuse_abi;

// Entries per ring. The ring's thread serves one request at a time; more
// entries let the kernel hand over the next requests (readahead, several
// threads of one CPU) while it does.
constexpr unsigned kQueueDepth = 8;
// Worker threads for requests a ring thread hands off (run_off_ring): at
// most every entry of every ring waits on one, so more would never be busy.
constexpr unsigned kMaxWorkers = 16;

// The one Transport of this process, for the custom-io hooks (libfuse 3.14
// gives them only the session's userdata, which is the Daemon).
std::atomic<Transport*> g_active{nullptr};

ssize_t hook_read(int fd, void* buf, size_t len, void*) {
  Transport* t = g_active.load(std::memory_order_acquire);
  return t ? t->on_read(fd, buf, len) : ::read(fd, buf, len);
}

ssize_t hook_writev(int fd, struct iovec* iov, int count, void*) {
  Transport* t = g_active.load(std::memory_order_acquire);
  return t ? t->on_writev(fd, iov, count) : ::writev(fd, iov, count);
}

std::string read_line(const char* path, int& err) {
  std::FILE* f = std::fopen(path, "r");
  if (!f) {
    err = errno;
    return "";
  }
  char buf[256] = "";
  if (!std::fgets(buf, sizeof buf, f)) buf[0] = 0;
  std::fclose(f);
  err = 0;
  std::string s = buf;
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

// Queues the kernel makes: one per possible CPU (num_possible_cpus()).
unsigned possible_cpus() {
  int err = 0;
  std::string list = read_line("/sys/devices/system/cpu/possible", err);
  unsigned count = 0;
  size_t at = 0;
  while (!err && at < list.size()) {
    size_t end = list.find(',', at);
    if (end == std::string::npos) end = list.size();
    std::string part = list.substr(at, end - at);
    unsigned a = 0, b = 0;
    int n = std::sscanf(part.c_str(), "%u-%u", &a, &b);
    if (n == 2 && b >= a) count += b - a + 1;
    else if (n >= 1) count += 1;
    at = end + 1;
  }
  if (count == 0) {
    long n = sysconf(_SC_NPROCESSORS_CONF);
    count = n > 0 ? static_cast<unsigned>(n) : 1;
  }
  return count;
}

std::string describe(int err) { return err < 0 ? std::strerror(-err) : std::strerror(err); }

}  // namespace

bool serving_on_ring() { return uring_current_entry() != nullptr; }

bool ring_has_other_requests() {
  UringEntry* e = uring_current_entry();
  return e && e->queue->others_in_hand(e);
}

void run_off_ring(std::function<void()> work) {
  Transport* t = g_active.load(std::memory_order_acquire);
  if (t && serving_on_ring() && t->workers_) {
    t->workers_->post(std::move(work));
    return;
  }
  work();
}

UringPolicy uring_policy(const char* param_path) {
  UringPolicy p;
  int err = 0;
  std::string v = read_line(param_path, err);
  if (err == ENOENT) {
    p.why_not = std::string("this kernel has no FUSE over io_uring (no ") + param_path +
                ": it needs Linux 6.14 or later built with CONFIG_FUSE_IO_URING)";
    return p;
  }
  if (err) {
    p.why_not = std::string("cannot read ") + param_path + ": " + std::strerror(err);
    return p;
  }
  if (v != "Y" && v != "1") {
    p.why_not = std::string("FUSE over io_uring is off: ") + param_path + " is " + v +
                " (an administrator turns it on with: echo Y > " + param_path + ")";
    return p;
  }
  int derr = 0;
  std::string disabled = read_line("/proc/sys/kernel/io_uring_disabled", derr);
  if (!derr && disabled == "2") {
    p.why_not = "io_uring is disabled on this machine (/proc/sys/kernel/io_uring_disabled is 2)";
    return p;
  }
  p.allowed = true;
  return p;
}

Transport::Transport(fuse_session* se, TransportMode mode) : se_(se), mode_(mode) {
  if (mode == TransportMode::Dev) {
    set_state("dev", "transport=dev");
    log_info("transport: /dev/fuse (transport=dev)");
    return;
  }
  UringPolicy policy = uring_policy();
  if (!policy.allowed) {
    // transport=uring was checked before mounting; it can only get here if
    // the parameter changed since.
    set_state("dev", std::string(mode == TransportMode::Uring ? "transport=uring" : "transport=auto") + ": " +
                         policy.why_not);
    log_info("transport: /dev/fuse (%s)", reason_.c_str());
    return;
  }
  Transport* none = nullptr;
  if (!g_active.compare_exchange_strong(none, this))
    throw std::logic_error("deferfs: only one FUSE transport per process");
  fuse_custom_io io{};
  io.read = hook_read;
  io.writev = hook_writev;
  if (int rc = fuse_session_custom_io(se_, &io, fuse_session_fd(se_)); rc != 0) {
    g_active.store(nullptr);
    set_state("dev", std::string("cannot install the io_uring hooks: ") + describe(rc));
    log_error("transport: /dev/fuse (%s)", reason_.c_str());
    return;
  }
  hooks_ = true;
  set_state("dev", "waiting for INIT");
}

Transport::~Transport() {
  stop_rings();
  queues_.clear();
  if (hooks_) g_active.store(nullptr);
}

void Transport::set_state(const std::string& name, const std::string& reason) {
  std::lock_guard lk(state_mu_);
  name_ = name;
  reason_ = reason;
}

TransportInfo Transport::info() const {
  TransportInfo i;
  {
    std::lock_guard lk(state_mu_);
    i.name = name_;
    i.reason = reason_;
  }
  if (rings_created_.load(std::memory_order_acquire))
    for (const auto& q : queues_) i.queue_requests.push_back(q->requests());
  {
    std::lock_guard lk(state_mu_);
    if (sched_) i.sched_raised = sched_->raised();
  }
  return i;
}

int Transport::serve() {
  fuse_loop_config* cfg = fuse_loop_cfg_create();
  fuse_loop_cfg_set_clone_fd(cfg, 1);
  fuse_loop_cfg_set_max_threads(cfg, 16);
  fuse_loop_cfg_set_idle_threads(cfg, 8);
  int rc = fuse_session_loop_mt(se_, cfg);
  fuse_loop_cfg_destroy(cfg);
  // Unmounted or signalled: requests in a ring thread's hands are answered,
  // then the rings close (a request they hold unserved ends with the
  // connection, as one left in /dev/fuse does).
  stop_rings();
  // libfuse's handlers end the loop with the signal's number: SIGTERM,
  // SIGINT and SIGHUP are a requested unmount like any other, not a failure.
  return rc == 0 || rc == SIGTERM || rc == SIGINT || rc == SIGHUP ? 0 : 1;
}

void Transport::stop_rings() {
  if (!rings_created_.load(std::memory_order_acquire)) return;
  {
    std::unique_ptr<RingScheduler> sched;
    {
      std::lock_guard lk(state_mu_);
      sched = std::move(sched_);
    }
  }  // the guard joined here, outside the lock
  // A request a ring thread handed to a worker is in hand until its reply:
  // the workers keep running while the rings wait for those.
  for (auto& q : queues_) q->stop();
  workers_.reset();
}

// ------------------------------------------------------------ hooks

ssize_t Transport::on_read(int fd, void* buf, size_t len) {
  ssize_t n = ::read(fd, buf, len);
  if (n >= static_cast<ssize_t>(sizeof(InHeader)) && !init_done_.load(std::memory_order_relaxed)) {
    const int saved = errno;
    InHeader in;
    std::memcpy(&in, buf, sizeof in);
    if (in.opcode == kOpInit && n >= static_cast<ssize_t>(sizeof(InHeader) + offsetof(InitIn, unused))) {
      InitIn init;
      std::memcpy(&init, static_cast<const char*>(buf) + sizeof in, std::min(sizeof init, n - sizeof in));
      init_offered_.store((init.flags & kInitExt) && (init.flags2 & kOverIoUring2));
      init_unique_.store(in.unique);
    }
    errno = saved;
  }
  return n;
}

ssize_t Transport::on_writev(int fd, struct iovec* iov, int count) {
  if (count >= 1 && iov[0].iov_len >= sizeof(OutHeader)) {
    OutHeader out;
    std::memcpy(&out, iov[0].iov_base, sizeof out);
    if (out.unique != 0) {  // 0: a notification, always through /dev/fuse
      if (rings_created_.load(std::memory_order_acquire)) {
        UringEntry* e = uring_current_entry();
        if (!e || e->unique.load(std::memory_order_relaxed) != out.unique ||
            e->state.load(std::memory_order_acquire) != UringEntry::InHandler) {
          e = nullptr;
          for (auto& q : queues_)
            if ((e = q->find(out.unique))) break;
        }
        if (e) return e->queue->reply(e, iov, count);
      }
      if (!init_done_.load() && out.unique == init_unique_.load()) return reply_init(fd, iov, count);
    }
  }
  // Requests that came through /dev/fuse, INTERRUPT answers, notifications.
  return ::writev(fd, iov, count);
}

ssize_t Transport::reply_init(int fd, const struct iovec* iov, int count) {
  init_done_.store(true);
  std::vector<char> msg;
  for (int i = 0; i < count; ++i)
    msg.insert(msg.end(), static_cast<const char*>(iov[i].iov_base),
               static_cast<const char*>(iov[i].iov_base) + iov[i].iov_len);
  OutHeader out;
  std::memcpy(&out, msg.data(), sizeof out);
  InitOut init{};
  const bool full = out.error == 0 && msg.size() >= sizeof out + offsetof(InitOut, unused);
  if (full) std::memcpy(&init, msg.data() + sizeof out, std::min(sizeof init, msg.size() - sizeof out));
  std::string why;
  if (!full)
    why = "INIT failed";
  else if (!init_offered_.load())
    why = "the kernel did not offer FUSE_OVER_IO_URING at INIT";
  if (!why.empty()) {
    set_state("dev", why);
    log_info("transport: /dev/fuse (%s)", why.c_str());
    return ::writev(fd, iov, count);
  }
  // The kernel wants payload buffers of max(8 KiB, max_write, max_pages pages).
  const size_t max_pages = (init.flags & kMaxPages) ? init.max_pages : 32;
  const size_t payload = std::max({kMinReadBuffer, size_t{init.max_write}, max_pages * 4096});
  int err = 0;
  unsigned bad_qid = 0;
  const unsigned n = possible_cpus();
  const bool fail_register = std::getenv("DEFERFS_TEST_URING_FAIL_REGISTER") != nullptr;  // test hook
  for (unsigned q = 0; q < n && !err; ++q) {
    UringQueue::Config cfg{se_, fuse_session_fd(se_), q, kQueueDepth, payload, fail_register && q == 0};
    queues_.push_back(std::make_unique<UringQueue>(
        cfg, [this](unsigned qid, unsigned ok, int e) { registered(qid, ok, e); }));
    if ((err = queues_.back()->start()) != 0) bad_qid = q;
  }
  if (!err) workers_ = std::make_unique<WorkerPool>(std::min(kMaxWorkers, n * kQueueDepth));
  if (err) {
    for (auto& q : queues_) q->stop();
    set_state("dev", "cannot set up ring " + std::to_string(bad_qid) + ": " + describe(err));
    log_error("transport: /dev/fuse (%s)", reason_.c_str());
    return ::writev(fd, iov, count);
  }
  // With FUSE_OVER_IO_URING in the reply, the kernel holds new requests
  // until every queue has an entry (none slips through /dev/fuse), keeps the
  // connection on the ring if the parameter is turned off later, and drops
  // back to /dev/fuse by itself if a REGISTER fails.
  if (init.flags & kInitExt) {
    InitOut* o = reinterpret_cast<InitOut*>(msg.data() + sizeof out);
    uint32_t flags2;
    std::memcpy(&flags2, &o->flags2, sizeof flags2);
    flags2 |= kOverIoUring2;
    std::memcpy(&o->flags2, &flags2, sizeof flags2);
  }
  set_state("dev", "registering " + std::to_string(n) + " rings");
  ssize_t written = ::write(fd, msg.data(), msg.size());
  const int saved = errno;
  rings_created_.store(true, std::memory_order_release);
  if (written < 0) {
    for (auto& q : queues_) q->stop();
    set_state("dev", std::string("INIT reply refused: ") + std::strerror(saved));
  } else {
    for (auto& q : queues_) q->go();
  }
  errno = saved;
  return written;
}

void Transport::registered(unsigned qid, unsigned ok, int err) {
  bool fallback = false;
  {
    std::lock_guard lk(state_mu_);
    ++reported_;
    if (ok > 0) ++queues_ok_;
    if (err && !first_err_) {
      first_err_ = err;
      first_err_qid_ = qid;
    }
    if (reported_ < queues_.size()) return;
    if (queues_ok_ == queues_.size()) {
      name_ = "uring";
      reason_ = "one io_uring per CPU: " + std::to_string(queues_.size()) + " queues of " +
                std::to_string(kQueueDepth) + " entries";
      if (first_err_)
        reason_ += " (queue " + std::to_string(first_err_qid_) + " lost entries: " + describe(first_err_) + ")";
      std::vector<pid_t> tids;
      for (const auto& q : queues_) tids.push_back(q->tid());
      sched_ = std::make_unique<RingScheduler>(std::move(tids));
      reason_ += "; " + sched_->describe();
      log_info("transport: uring (%s)", reason_.c_str());
    } else {
      name_ = "dev";
      reason_ = "ring registration failed on queue " + std::to_string(first_err_qid_) + ": " +
                describe(first_err_) + "; serving through /dev/fuse";
      log_error("transport: %s", reason_.c_str());
      fallback = true;
    }
  }
  // The kernel never switches to a ring with an empty queue: close them
  // all (from this ring thread: ask, the joins come in serve()).
  if (fallback)
    for (auto& q : queues_) q->request_stop();
}

}  // namespace deferfs
