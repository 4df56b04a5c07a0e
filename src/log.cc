#include "deferfs/log.h"

#include <syslog.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>

namespace deferfs {

namespace {
std::atomic<bool> g_syslog{false};  // set once at startup
std::atomic<bool> g_debug{false};

void vlog(int prio, const char* fmt, va_list ap) {
  if (g_syslog.load(std::memory_order_relaxed)) {
    vsyslog(prio, fmt, ap);
    return;
  }
  char line[2048];
  std::vsnprintf(line, sizeof line, fmt, ap);
  std::fprintf(stderr, "deferfs: %s\n", line);
}
}  // namespace

void log_to_syslog(bool on) {
  if (on) openlog("deferfs", LOG_PID, LOG_DAEMON);
  g_syslog = on;
}
void log_set_debug(bool on) { g_debug = on; }

void log_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vlog(LOG_ERR, fmt, ap);
  va_end(ap);
}
void log_info(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vlog(LOG_INFO, fmt, ap);
  va_end(ap);
}
void log_debug(const char* fmt, ...) {
  if (!g_debug) return;
  va_list ap;
  va_start(ap, fmt);
  vlog(LOG_DEBUG, fmt, ap);
  va_end(ap);
}

}  // namespace deferfs
