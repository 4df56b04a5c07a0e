"""What a test needs so that a daemon's failure cannot pass unseen (issue 16.6).

Every test that starts a deferfs daemon, in the foreground or daemonized,
must fail when that daemon exits with a status other than the expected one
or prints a sanitizer report. Three mechanisms, shared by the mount, model,
crash and memory suites:

- subreaper(): the test process becomes a child subreaper
  (PR_SET_CHILD_SUBREAPER), so a daemonized daemon (fuse_daemonize forks,
  the parent exits) is re-parented to the test, which can then wait for it
  and read its exit status (adopted_exits()).
- sanitizer_logs(dir): sets log_path in ASAN_OPTIONS / UBSAN_OPTIONS /
  TSAN_OPTIONS for every process started from now on, so a daemonized
  daemon's report (its stderr is /dev/null) lands in dir/sanitizer.<pid>;
  sanitizer_reports(dir) returns them. The options meson test sets
  (halt_on_error, abort_on_error) are kept: a report also means a non-zero
  exit status.
- log_problems(text): the sanitizer reports found in a foreground daemon's
  log.

Environment: DEFERFS_NO_SKIP=1 (set by .ci/run) turns every skip into a
failure (pytest hook in the conftests, no_skip_exit() for the scripts).
"""

import ctypes
import os
import re
import signal
import time

PR_SET_CHILD_SUBREAPER = 36
SANITIZER_VARS = ("ASAN_OPTIONS", "UBSAN_OPTIONS", "TSAN_OPTIONS")
_REPORT = re.compile(r"ERROR: (AddressSanitizer|LeakSanitizer|ThreadSanitizer|MemorySanitizer)|"
                     r"WARNING: ThreadSanitizer|runtime error: |SUMMARY: (Address|Leak|Thread|UndefinedBehavior)Sanitizer")


def no_skip():
    """True when skips must count as failures (the CI machine can run every test)."""
    return os.environ.get("DEFERFS_NO_SKIP", "") not in ("", "0")


def no_skip_exit(code=77):
    """The exit status of a script that would skip: 77 (meson's skip), or 1 under DEFERFS_NO_SKIP."""
    return 1 if no_skip() else code


def subreaper():
    """Makes this process the reaper of its orphaned descendants (idempotent)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def _children():
    """(pid, comm, state) of this process's children, zombies included."""
    out = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                s = f.read()
        except OSError:
            continue
        comm = s[s.index("(") + 1:s.rindex(")")]
        fields = s[s.rindex(")") + 2:].split()
        if int(fields[1]) == me:
            out.append((int(name), comm, fields[0]))
    return out


def adopted_daemons(exclude=(), comm="deferfs"):
    """Pids of daemons re-parented to us (running or exited), not in `exclude`."""
    return [pid for pid, c, _ in _children() if c == comm[:15] and pid not in set(exclude)]


def adopted_exits(exclude=(), comm="deferfs", timeout=10.0):
    """Waits for every adopted daemon (SIGKILL after `timeout` s) and returns
    [(pid, status, note)]: status as subprocess gives it (-N for a signal)."""
    results = []
    for pid in adopted_daemons(exclude, comm):
        note = ""
        deadline = time.monotonic() + timeout
        while True:
            try:
                wpid, st = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                wpid, st = pid, None  # someone else reaped it
                break
            if wpid == pid:
                break
            if time.monotonic() >= deadline:
                note = f"still running {timeout:.0f}s after the test: SIGKILL"
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _, st = os.waitpid(pid, 0)
                break
            time.sleep(0.02)
        status = None if st is None else os.waitstatus_to_exitcode(st)
        results.append((pid, status, note))
    return results


def sanitizer_logs(directory):
    """Sends the sanitizer reports of every process started from now on to
    directory/sanitizer.<pid>. Returns the previous environment, for restore_env()."""
    os.makedirs(directory, exist_ok=True)
    saved = {k: os.environ.get(k) for k in SANITIZER_VARS}
    base = os.path.join(str(directory), "sanitizer")
    for k in SANITIZER_VARS:
        old = os.environ.get(k, "")
        kept = ":".join(p for p in old.split(":") if p and not p.startswith("log_path="))
        os.environ[k] = (kept + ":" if kept else "") + f"log_path={base}"
    return saved


def restore_env(saved):
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def sanitizer_reports(directory):
    """[(file, text)] of the sanitizer reports written under `directory`."""
    out = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return out
    for n in names:
        if n.startswith("sanitizer."):
            p = os.path.join(str(directory), n)
            try:
                with open(p, errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            if text.strip():
                out.append((p, text))
    return out


def log_problems(text):
    """The lines of a daemon's log that are sanitizer reports."""
    return [line for line in text.splitlines() if _REPORT.search(line)]
