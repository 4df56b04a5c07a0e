// LD_PRELOAD shim for the crash tests (issue 16.3, 16.4, 16.6): records
// every call of the daemon that changes a file below one directory, or makes
// it durable, so that a test can tell in which phase of a sync a SIGKILL
// landed, and rebuild each state a power cut could leave.
//
// Environment:
//   DEFERFS_TRACE_ROOT     absolute directory; only paths below it are recorded
//   DEFERFS_TRACE_LOG      the log: one line per call, appended
//   DEFERFS_TRACE_DATA     if set, the bytes of every write are appended to
//                          DEFERFS_TRACE_LOG.data (the line gives their offset)
//   DEFERFS_TRACE_KILL_AT  N or N:after: SIGKILL of the process just before
//                          (or just after) the N-th recorded call (1-based)
//
// A line: "<seq> <ns> <op> <path> [args...]" (ns: CLOCK_MONOTONIC) with op one of
//   write PATH OFF LEN DATAOFF   (DATAOFF -1 without DEFERFS_TRACE_DATA)
//   truncate PATH SIZE           punch PATH OFF LEN     (fallocate: reads as zeros)
//   fsync PATH                   (fdatasync too; PATH may be a directory)
//   create PATH    trunc PATH    (open with O_CREAT of a new file / O_TRUNC)
//   unlink PATH    rmdir PATH    mkdir PATH    rename FROM TO    mtime PATH
//   syncfs PATH
// A line is written before the call is made (a kill then shows the call it
// interrupted); a failed call gets a following "failed SEQ" line.
//
// Only observation: every call goes on to the real one unchanged.
// The plain and the 64 names are both defined here: no redirection.
#undef _FILE_OFFSET_BITS
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;  // guards the log and the data file
static atomic_long seq;
static int log_fd = -2, data_fd = -1;  // -2: not opened yet
static long kill_at = -1;
static int kill_after;
static char root[PATH_MAX];
static size_t root_len;

#define REAL(name) ((__typeof__(&name))dlsym(RTLD_NEXT, #name))

static int raw_open(const char* p, int flags) { return (int)syscall(SYS_openat, AT_FDCWD, p, flags, 0600); }

static void init_once(void) {
  if (log_fd != -2) return;
  log_fd = -1;
  const char* r = getenv("DEFERFS_TRACE_ROOT");
  const char* l = getenv("DEFERFS_TRACE_LOG");
  if (!r || !l) return;
  snprintf(root, sizeof root, "%s", r);
  root_len = strlen(root);
  log_fd = raw_open(l, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC);
  if (getenv("DEFERFS_TRACE_DATA")) {
    char d[PATH_MAX];
    snprintf(d, sizeof d, "%s.data", l);
    data_fd = raw_open(d, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC);
  }
  const char* k = getenv("DEFERFS_TRACE_KILL_AT");
  if (k) {
    kill_at = strtol(k, NULL, 10);
    kill_after = strstr(k, ":after") != NULL;
  }
}

// Paths go into the log with space, newline and backslash as \ooo (as in
// /proc/self/mountinfo): a line splits on spaces.
static void escape(char* p) {
  char tmp[PATH_MAX];
  size_t o = 0;
  for (const char* c = p; *c && o + 5 < sizeof tmp; ++c) {
    if (*c == ' ' || *c == '\n' || *c == '\\') {
      o += (size_t)snprintf(tmp + o, sizeof tmp - o, "\\%03o", (unsigned char)*c);
    } else {
      tmp[o++] = *c;
    }
  }
  tmp[o] = 0;
  memcpy(p, tmp, o + 1);
}

static int below_root(const char* p) {
  return root_len && strncmp(p, root, root_len) == 0 && (p[root_len] == '/' || p[root_len] == 0);
}

// The absolute path of an fd (or of dirfd + name); 0 if not below the root.
static int fd_path(int fd, char* out) {
  char link[64];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, out, PATH_MAX - 1);
  if (n < 0) return 0;
  out[n] = 0;
  if (!below_root(out)) return 0;
  escape(out);
  return 1;
}

static int at_path(int dirfd, const char* name, char* out) {
  if (name[0] == '/') {
    snprintf(out, PATH_MAX, "%s", name);
  } else {
    char dir[PATH_MAX / 2];
    if (dirfd == AT_FDCWD) {
      if (!getcwd(dir, sizeof dir)) return 0;
    } else {
      char link[64];
      snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
      ssize_t n = readlink(link, dir, sizeof dir - 1);
      if (n < 0) return 0;
      dir[n] = 0;
    }
    snprintf(out, PATH_MAX, "%s/%s", dir, name);
  }
  if (!below_root(out)) return 0;
  escape(out);
  return 1;
}

// Appends one line; returns its sequence number (0: not recorded).
static long record(const char* fmt, ...) {
  init_once();
  if (log_fd < 0) return 0;
  char line[3 * PATH_MAX];
  pthread_mutex_lock(&lock);
  long s = atomic_fetch_add(&seq, 1) + 1;
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  int n = snprintf(line, sizeof line, "%ld %lld ", s, (long long)now.tv_sec * 1000000000LL + now.tv_nsec);
  va_list ap;
  va_start(ap, fmt);
  n += vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
  va_end(ap);
  line[n++] = '\n';
  if (write(log_fd, line, (size_t)n) < 0) {
  }
  pthread_mutex_unlock(&lock);
  if (s == kill_at && !kill_after) kill(getpid(), SIGKILL);
  return s;
}

static void done(long s, long rc) {
  if (!s) return;
  if (rc < 0) record("failed %ld", s);
  if (s == kill_at && kill_after) kill(getpid(), SIGKILL);
}

// The data of a write, appended to the data file: its offset there, or -1.
static long put_data(const struct iovec* iov, int cnt) {
  if (data_fd < 0) return -1;
  off_t at = lseek(data_fd, 0, SEEK_END);
  for (int i = 0; i < cnt; ++i) {
    const char* p = iov[i].iov_base;
    size_t left = iov[i].iov_len;
    while (left) {
      ssize_t w = write(data_fd, p, left);
      if (w <= 0) return -1;
      p += w;
      left -= (size_t)w;
    }
  }
  return (long)at;
}

static long record_write(int fd, const struct iovec* iov, int cnt, off_t off) {
  char p[PATH_MAX];
  init_once();
  if (log_fd < 0 || !fd_path(fd, p)) return 0;
  size_t len = 0;
  for (int i = 0; i < cnt; ++i) len += iov[i].iov_len;
  if (off < 0) off = lseek(fd, 0, SEEK_CUR);
  pthread_mutex_lock(&lock);
  long d = put_data(iov, cnt);
  pthread_mutex_unlock(&lock);
  return record("write %s %lld %zu %ld", p, (long long)off, len, d);
}

ssize_t pwrite(int fd, const void* buf, size_t n, off_t off) {
  struct iovec v = {(void*)buf, n};
  long s = record_write(fd, &v, 1, off);
  ssize_t rc = REAL(pwrite)(fd, buf, n, off);
  done(s, rc);
  return rc;
}

ssize_t pwrite64(int fd, const void* buf, size_t n, off_t off) {
  struct iovec v = {(void*)buf, n};
  long s = record_write(fd, &v, 1, off);
  ssize_t rc = REAL(pwrite64)(fd, buf, n, off);
  done(s, rc);
  return rc;
}

ssize_t write(int fd, const void* buf, size_t n) {
  if (fd == log_fd || fd == data_fd) return (ssize_t)syscall(SYS_write, fd, buf, n);
  struct iovec v = {(void*)buf, n};
  long s = record_write(fd, &v, 1, -1);
  ssize_t rc = REAL(write)(fd, buf, n);
  done(s, rc);
  return rc;
}

ssize_t pwritev(int fd, const struct iovec* iov, int cnt, off_t off) {
  long s = record_write(fd, iov, cnt, off);
  ssize_t rc = REAL(pwritev)(fd, iov, cnt, off);
  done(s, rc);
  return rc;
}

static long record_fd(const char* op, int fd, const char* fmt, long long a, long long b) {
  char p[PATH_MAX];
  init_once();
  if (log_fd < 0 || !fd_path(fd, p)) return 0;
  if (!fmt) return record("%s %s", op, p);
  return record(fmt, op, p, a, b);
}

int ftruncate(int fd, off_t size) {
  long s = record_fd("truncate", fd, "%s %s %lld", size, 0);
  int rc = REAL(ftruncate)(fd, size);
  done(s, rc);
  return rc;
}

int ftruncate64(int fd, off_t size) {
  long s = record_fd("truncate", fd, "%s %s %lld", size, 0);
  int rc = REAL(ftruncate64)(fd, size);
  done(s, rc);
  return rc;
}

int fallocate(int fd, int mode, off_t off, off_t len) {
  long s = record_fd("punch", fd, "%s %s %lld %lld", off, len);
  int rc = REAL(fallocate)(fd, mode, off, len);
  done(s, rc);
  return rc;
}

int fallocate64(int fd, int mode, off_t off, off_t len) {
  long s = record_fd("punch", fd, "%s %s %lld %lld", off, len);
  int rc = REAL(fallocate64)(fd, mode, off, len);
  done(s, rc);
  return rc;
}

int fsync(int fd) {
  long s = record_fd("fsync", fd, NULL, 0, 0);
  int rc = REAL(fsync)(fd);
  done(s, rc);
  return rc;
}

int fdatasync(int fd) {
  long s = record_fd("fsync", fd, NULL, 0, 0);
  int rc = REAL(fdatasync)(fd);
  done(s, rc);
  return rc;
}

int syncfs(int fd) {
  long s = record_fd("syncfs", fd, NULL, 0, 0);
  int rc = REAL(syncfs)(fd);
  done(s, rc);
  return rc;
}

int futimens(int fd, const struct timespec t[2]) {
  long s = record_fd("mtime", fd, NULL, 0, 0);
  int rc = REAL(futimens)(fd, t);
  done(s, rc);
  return rc;
}

// open: a new file (O_CREAT) or a truncated one (O_TRUNC) below the root.
static long record_open(int dirfd, const char* name, int flags) {
  char p[PATH_MAX];
  init_once();
  if (log_fd < 0 || !(flags & (O_CREAT | O_TRUNC)) || !at_path(dirfd, name, p)) return 0;
  struct stat st;
  int exists = fstatat(AT_FDCWD, p, &st, 0) == 0;
  if (!exists && (flags & O_CREAT)) return record("create %s", p);
  if (exists && (flags & O_TRUNC) && S_ISREG(st.st_mode) && st.st_size > 0) return record("trunc %s", p);
  return 0;
}

int openat(int dirfd, const char* name, int flags, ...) {
  mode_t mode = 0;
  if (flags & (O_CREAT | __O_TMPFILE)) {
    va_list ap;
    va_start(ap, flags);
    mode = va_arg(ap, mode_t);
    va_end(ap);
  }
  long s = record_open(dirfd, name, flags);
  int rc = REAL(openat)(dirfd, name, flags, mode);
  done(s, rc);
  return rc;
}

int openat64(int dirfd, const char* name, int flags, ...) {
  mode_t mode = 0;
  if (flags & (O_CREAT | __O_TMPFILE)) {
    va_list ap;
    va_start(ap, flags);
    mode = va_arg(ap, mode_t);
    va_end(ap);
  }
  long s = record_open(dirfd, name, flags);
  int rc = REAL(openat64)(dirfd, name, flags, mode);
  done(s, rc);
  return rc;
}

int open(const char* name, int flags, ...) {
  mode_t mode = 0;
  if (flags & (O_CREAT | __O_TMPFILE)) {
    va_list ap;
    va_start(ap, flags);
    mode = va_arg(ap, mode_t);
    va_end(ap);
  }
  long s = record_open(AT_FDCWD, name, flags);
  int rc = REAL(open)(name, flags, mode);
  done(s, rc);
  return rc;
}

int open64(const char* name, int flags, ...) {
  mode_t mode = 0;
  if (flags & (O_CREAT | __O_TMPFILE)) {
    va_list ap;
    va_start(ap, flags);
    mode = va_arg(ap, mode_t);
    va_end(ap);
  }
  long s = record_open(AT_FDCWD, name, flags);
  int rc = REAL(open64)(name, flags, mode);
  done(s, rc);
  return rc;
}

static long record_at(const char* op, int dirfd, const char* name) {
  char p[PATH_MAX];
  init_once();
  if (log_fd < 0 || !at_path(dirfd, name, p)) return 0;
  return record("%s %s", op, p);
}

int unlinkat(int dirfd, const char* name, int flags) {
  long s = record_at(flags & AT_REMOVEDIR ? "rmdir" : "unlink", dirfd, name);
  int rc = REAL(unlinkat)(dirfd, name, flags);
  done(s, rc);
  return rc;
}

int unlink(const char* name) {
  long s = record_at("unlink", AT_FDCWD, name);
  int rc = REAL(unlink)(name);
  done(s, rc);
  return rc;
}

int mkdirat(int dirfd, const char* name, mode_t mode) {
  long s = record_at("mkdir", dirfd, name);
  int rc = REAL(mkdirat)(dirfd, name, mode);
  done(s, rc);
  return rc;
}

static long record_rename(int od, const char* on, int nd, const char* nn) {
  char a[PATH_MAX], b[PATH_MAX];
  init_once();
  if (log_fd < 0) return 0;
  int ia = at_path(od, on, a), ib = at_path(nd, nn, b);
  if (!ia && !ib) return 0;
  return record("rename %s %s", a, b);
}

int renameat(int od, const char* on, int nd, const char* nn) {
  long s = record_rename(od, on, nd, nn);
  int rc = REAL(renameat)(od, on, nd, nn);
  done(s, rc);
  return rc;
}

int renameat2(int od, const char* on, int nd, const char* nn, unsigned flags) {
  long s = record_rename(od, on, nd, nn);
  int rc = REAL(renameat2)(od, on, nd, nn, flags);
  done(s, rc);
  return rc;
}

int rename(const char* on, const char* nn) {
  long s = record_rename(AT_FDCWD, on, AT_FDCWD, nn);
  int rc = REAL(rename)(on, nn);
  done(s, rc);
  return rc;
}
