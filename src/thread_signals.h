// For the daemon's serving threads (ring threads, their workers, the ring
// scheduler's guard): signals are for libfuse's loop thread, which turns
// SIGTERM, SIGINT and SIGHUP into an unmount (fuse_set_signal_handlers). A
// fault's own signal stays deliverable: blocked, it would kill the process
// instead of reaching its handler (the SIGBUS guard of reply copies).
#pragma once

#include <pthread.h>
#include <signal.h>

namespace deferfs {

inline void block_signals_but_faults() {
  sigset_t all;
  sigfillset(&all);
  for (int sig : {SIGBUS, SIGSEGV, SIGFPE, SIGILL}) sigdelset(&all, sig);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);
}

}  // namespace deferfs
