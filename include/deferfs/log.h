// One log line per event, to stderr in the foreground and to syslog when
// daemonized (spec 8.3: a source error is one log line naming the file).
#pragma once

namespace deferfs {

// Set once at startup, before any thread starts.
void log_to_syslog(bool on);
void log_set_debug(bool on);

void log_error(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void log_info(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void log_debug(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace deferfs
