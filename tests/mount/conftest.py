"""Fixtures for the mount suite: real deferfs mounts through the kernel.

Every test gets private directories under pytest's tmp_path. The daemon runs
in the foreground (-f) as our child, its stderr goes to a log file that is
printed at teardown (pytest shows it when the test fails). Teardown undoes
whatever happened: unmount, wait for the daemon, SIGKILL it, lazy unmount.
A watchdog SIGKILLs the daemons of a test that runs too long, which aborts
the FUSE connection so that a hung request cannot hang the suite.
"""

import json
import os
import re
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

import sys as _sys
# Loaded by other suites too (model, views): find tests/daemonwatch.py and
# this directory's uring_param.py wherever the importer runs from.
_sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
_sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import daemonwatch  # noqa: E402  (tests/daemonwatch.py)
import uring_param  # noqa: E402  (tests/mount/uring_param.py)

DEFERFS = os.environ.get("DEFERFS", "/work/main/build/src/deferfs")
# The transport every mount of the suite uses unless a test names one
# (meson runs the suite as "mount" with dev and as "mount_uring" with uring).
TRANSPORT = os.environ.get("DEFERFS_TEST_TRANSPORT", "")
FSTYPE = "fuse.deferfs"
PAGE = 4096
MOUNT_WAIT = 10.0
EXIT_WAIT = 10.0
TEST_DEADLINE = float(os.environ.get("DEFERFS_TEST_DEADLINE", "120"))  # s; then the watchdog kills the daemons


# --------------------------------------------------------------- mountinfo

def _unescape(s):
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda mo: chr(int(mo.group(1), 8)), s)


def mountinfo():
    """List of dicts {id, mountpoint, fstype, source, dev} from /proc/self/mountinfo."""
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            entries.append({
                "id": int(fields[0]),
                "dev": fields[2],
                "mountpoint": _unescape(fields[4]),
                "fstype": fields[sep + 1],
                "source": _unescape(fields[sep + 2]),
            })
    return entries


def mounts_at(path, fstype=None):
    """Mount entries whose mount point is exactly `path` (an absolute, resolved path)."""
    path = str(path)
    return [e for e in mountinfo()
            if e["mountpoint"] == str(path) and (fstype is None or e["fstype"] == fstype)]


def is_mounted(path, fstype=FSTYPE):
    return bool(mounts_at(path, fstype))


def _abspath(p):
    # realpath without touching a possibly dead mount: resolve the parent only.
    p = str(p)
    parent, name = os.path.split(p.rstrip("/") or "/")
    return os.path.join(os.path.realpath(parent), name) if name else "/"


# ---------------------------------------------------------------- helpers

def run(*cmd, timeout=60, check=False, input=None, cwd=None, env=None):
    """Runs a command; returns CompletedProcess with text stdout/stderr."""
    cmd = [str(c) for c in cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check,
                          input=input, cwd=None if cwd is None else str(cwd), env=env)


class CliResult:
    def __init__(self, proc, want_json):
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr
        self.json = None
        if want_json and proc.stdout.strip():
            # Exactly one JSON object: json.loads refuses trailing data.
            self.json = json.loads(proc.stdout)

    def __iter__(self):  # allows `data, rc = m.cli(...)`
        return iter((self.json, self.rc))

    def __repr__(self):
        return f"CliResult(rc={self.rc}, out={self.out!r}, err={self.err!r})"


def cli(*args, cwd=None, timeout=60):
    proc = run(DEFERFS, *args, cwd=cwd, timeout=timeout)
    return CliResult(proc, "--json" in [str(a) for a in args])


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(pred, timeout, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def daemon_pid_of(mnt):
    """The pid of the daemon serving mnt, from stats (None if unreachable)."""
    try:
        r = cli("stats", "--json", mnt, timeout=10)
        if r.rc == 0 and r.json:
            return r.json.get("pid")
    except Exception:
        pass
    return None


def _try_run(*cmd, timeout=15):
    """run() that reports a hung command instead of raising."""
    try:
        return run(*cmd, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, -1, "", f"timed out after {timeout}s")


def force_cleanup(mnt, pid=None, proc=None):
    """Leaves no mount on mnt and no daemon `pid`/`proc` behind, whatever the state."""
    mnt = str(mnt)
    notes = []
    if pid is None and proc is None and is_mounted(mnt):
        pid = daemon_pid_of(mnt)
    if proc is not None:
        pid = proc.pid

    def gone():
        if proc is not None:
            return proc.poll() is not None
        return pid is None or not pid_alive(pid)

    if is_mounted(mnt):
        r = _try_run("fusermount3", "-u", mnt)
        if r.returncode != 0:
            notes.append(f"fusermount3 -u {mnt}: {r.stderr.strip()}")
    if not wait_for(gone, EXIT_WAIT):
        notes.append(f"daemon {pid} still running {EXIT_WAIT}s after unmount: SIGKILL")
        try:
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_for(gone, EXIT_WAIT)
    if proc is not None:
        try:
            proc.wait(timeout=EXIT_WAIT)
        except subprocess.TimeoutExpired:
            notes.append("daemon did not die after SIGKILL")
    for _ in range(5):
        if not mounts_at(mnt, FSTYPE):
            break
        notes.append(f"{mnt} still mounted: lazy unmount")
        r = _try_run("fusermount3", "-uz", mnt)
        if r.returncode != 0:
            _try_run("umount", "-l", mnt)
    if mounts_at(mnt, FSTYPE):
        notes.append(f"{mnt} STILL MOUNTED after cleanup")
    return notes


# ----------------------------------------------------------------- mounts

class Mount:
    def __init__(self, src, mnt, opts, tmp, log_path):
        self.src = Path(src)
        self.mnt = Path(mnt)
        self.opts = list(opts)
        self.tmp = Path(tmp)
        self.log_path = Path(log_path)
        self.proc = None
        # Exit statuses the test expects of this daemon (-N: killed by
        # signal N); teardown fails the test on any other (issue 16.6).
        self.expect_exit = (0,)

    # paths
    def m(self, rel=""):
        """Path inside the mount."""
        return self.mnt / rel if rel else self.mnt

    def s(self, rel=""):
        """Path on the source."""
        return self.src / rel if rel else self.src

    # running things
    def run(self, *cmd, **kw):
        return run(*cmd, **kw)

    def cli(self, *args, **kw):
        return cli(*args, **kw)

    def stats(self, path=None):
        r = cli("stats", "--json", path or self.mnt)
        assert r.rc == 0, f"deferfs stats failed: {r!r}\n{self.log()}"
        return r.json

    def status(self, *paths):
        r = cli("status", "--json", *(paths or [self.mnt]))
        assert r.rc == 0, f"deferfs status failed: {r!r}\n{self.log()}"
        return r.json

    def sync(self, *paths, force=False, expect_rc=0):
        args = ["sync", "--json"] + (["--force"] if force else []) + [str(p) for p in (paths or [self.mnt])]
        r = cli(*args)
        if expect_rc is not None:
            assert r.rc == expect_rc, f"deferfs {' '.join(args)}: {r!r}\n{self.log()}"
        return r

    def discard(self, *paths, expect_rc=0):
        r = cli("discard", "--json", *(paths or [self.mnt]))
        if expect_rc is not None:
            assert r.rc == expect_rc, f"deferfs discard: {r!r}\n{self.log()}"
        return r

    def staged(self, rel):
        """The status entry of rel (path relative to the mount root) or None."""
        for f in self.status()["files"]:
            if f["path"] == rel:
                return f
        return None

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def mounted(self):
        return is_mounted(self.mnt)

    def wait_exit(self, timeout=EXIT_WAIT):
        """Waits for the daemon to exit; returns its exit status (None if still running)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def __repr__(self):
        return f"Mount(src={self.src}, mnt={self.mnt}, opts={self.opts})"


def start_daemon(src, mnt, opts, log_path, extra_args=()):
    cmd = [DEFERFS, str(src), str(mnt), "-f"] + list(extra_args)
    if TRANSPORT and not any(str(o).startswith("transport=") for o in opts):
        opts = list(opts) + [f"transport={TRANSPORT}"]
    for o in opts:
        cmd += ["-o", o]
    logf = open(log_path, "ab")
    logf.write(("$ " + " ".join(cmd) + "\n").encode())
    logf.flush()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    logf.write(f"[daemon pid {proc.pid}]\n".encode())
    logf.close()
    return proc


class _Watchdog:
    """Kills the daemons of a test that overruns its deadline (aborts FUSE)."""

    def __init__(self, deadline):
        self.mounts = []
        self.fired = False
        self.timer = threading.Timer(deadline, self._fire)
        self.timer.daemon = True
        self.timer.start()

    def _fire(self):
        self.fired = True
        for m in list(self.mounts):
            if m.proc is not None and m.proc.poll() is None:
                try:
                    m.proc.kill()
                except ProcessLookupError:
                    pass

    def cancel(self):
        self.timer.cancel()


@pytest.fixture
def mount_factory(tmp_path, request):
    """mount_factory(opts=[...], src=None, mnt=None) -> Mount (already mounted).

    src/mnt default to fresh tmp_path/src and tmp_path/mnt (created); pass
    existing paths to reuse them (e.g. src == mnt to mount over itself).
    """
    made = []
    dog = _Watchdog(TEST_DEADLINE)
    counter = [0]

    def factory(opts=(), src=None, mnt=None, wait=True, reap=True):
        counter[0] += 1
        n = counter[0]
        suffix = "" if n == 1 else str(n)
        if src is None:
            src = tmp_path / f"src{suffix}"
            src.mkdir(exist_ok=True)
        if mnt is None:
            mnt = tmp_path / f"mnt{suffix}"
        Path(mnt).mkdir(parents=True, exist_ok=True)
        log_path = tmp_path / f"deferfs{suffix}.log"
        m = Mount(_abspath(src), _abspath(mnt), opts, tmp_path, log_path)
        before = len(mounts_at(m.mnt, FSTYPE))
        m.proc = start_daemon(m.src, m.mnt, opts, log_path)
        if reap:
            # Reap the daemon as soon as it exits, as a shell does with a
            # background job (a zombie still answers kill(pid, 0)).
            threading.Thread(target=m.proc.wait, daemon=True).start()
        made.append(m)
        dog.mounts.append(m)
        if not wait:
            return m

        def up():
            return len(mounts_at(m.mnt, FSTYPE)) > before or m.proc.poll() is not None

        ok = wait_for(up, MOUNT_WAIT)
        if m.proc.poll() is not None:
            pytest.fail(f"deferfs exited with status {m.proc.returncode} instead of mounting {m.mnt}\n"
                        f"--- daemon log ---\n{m.log()}")
        if not ok:
            pytest.fail(f"{m.mnt} not mounted as {FSTYPE} after {MOUNT_WAIT}s\n--- daemon log ---\n{m.log()}")
        if TRANSPORT == "uring" and not any(str(o).startswith("transport=") for o in opts):
            # The suite's mounts really are served by the rings.
            if not wait_for(lambda: "transport: uring" in m.log() or m.proc.poll() is not None, MOUNT_WAIT):
                pytest.fail(f"{m.mnt}: not served through io_uring\n--- daemon log ---\n{m.log()}")
        return m

    yield factory

    dog.cancel()
    problems = []
    failures = []
    for m in reversed(made):
        # Staged pages a test leaves (a conflict, a failed sync) would outlive
        # the daemon in /dev/shm: drop them first (a dead daemon: nothing to do).
        if m.proc.poll() is None and is_mounted(m.mnt):
            _try_run(DEFERFS, "discard", m.mnt)
        notes = force_cleanup(m.mnt, proc=m.proc)
        problems += notes
        print(f"--- daemon log {m.log_path} (exit status {m.proc.returncode}) ---")
        print(m.log())
        for n in notes:
            print("cleanup:", n)
        if m.proc.returncode not in m.expect_exit:
            failures.append(f"daemon {m.proc.pid} of {m.mnt} exited with status {m.proc.returncode} "
                            f"(expected {' or '.join(map(str, m.expect_exit))}); log {m.log_path}")
        failures += [f"daemon {m.proc.pid} of {m.mnt}: {line}" for line in daemonwatch.log_problems(m.log())]
    _drop_big_files(tmp_path)
    if dog.fired:
        pytest.fail(f"test overran {TEST_DEADLINE}s: the watchdog killed the daemons")
    leftover = [p for p in problems if "STILL MOUNTED" in p or "did not die" in p]
    assert not leftover, leftover
    assert not failures, "\n".join(failures)


def _drop_big_files(top, limit=1 << 20):
    """Removes the test's large data files (pytest keeps the last runs' tmp dirs),
    never crossing into another file system and never while something is mounted below."""
    top = str(top)
    if any(e["mountpoint"].startswith(top + "/") for e in mountinfo() if e["fstype"] == FSTYPE):
        return
    dev = os.lstat(top).st_dev
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(root, d)).st_dev == dev]
        for name in files:
            p = os.path.join(root, name)
            try:
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode) and st.st_dev == dev and st.st_blocks * 512 > limit:
                    os.unlink(p)
            except OSError:
                pass


# Daemons re-parented to the test (daemonized mounts) may exit with these
# statuses; any other fails the test. pid -> tuple of statuses.
_expected_adopted = {}


def expect_daemon_exit(pid, *statuses):
    """Declares the exit statuses a daemonized daemon `pid` may end with
    (default 0 only), e.g. expect_daemon_exit(pid, -signal.SIGKILL)."""
    _expected_adopted[pid] = statuses


@pytest.fixture(autouse=True)
def daemon_watch(tmp_path):
    """Every daemon a test starts is checked at its end (issue 16.6): the
    test is the subreaper of its daemonized daemons and fails if one exits
    with an unexpected status; every process writes its sanitizer reports
    under tmp_path/sanitizer, and any report fails the test."""
    daemonwatch.subreaper()
    logs = tmp_path / "sanitizer"
    saved = daemonwatch.sanitizer_logs(logs)
    try:
        yield
    finally:
        daemonwatch.restore_env(saved)
    failures = []
    for pid, status, note in daemonwatch.adopted_exits(comm=os.path.basename(DEFERFS)):
        allowed = _expected_adopted.pop(pid, (0,))
        if status is not None and status not in allowed or note:
            failures.append(f"daemonized daemon {pid} exited with status {status} "
                            f"(expected {' or '.join(map(str, allowed))}) {note}")
    _expected_adopted.clear()
    # A daemonized daemon the test left running was killed above: no dead
    # mount of the test's stays behind.
    for e in mountinfo():
        if e["fstype"] == FSTYPE and e["mountpoint"].startswith(str(tmp_path) + "/"):
            failures.append(f"{e['mountpoint']} still mounted after the test: lazy unmount")
            _try_run("fusermount3", "-uz", e["mountpoint"])
    for path, text in daemonwatch.sanitizer_reports(logs):
        failures.append(f"sanitizer report {path}:\n{text[:4000]}")
    assert not failures, "\n".join(failures)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under DEFERFS_NO_SKIP=1 (CI) a skip is a failure: the CI machine has
    what every test needs (loop devices, tmpfs, chattr +i, useradd)."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and daemonwatch.no_skip() and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        rep.longrepr = f"skipped, and DEFERFS_NO_SKIP is set (CI runs every test): {rep.longrepr}"


@pytest.fixture
def mnt(mount_factory):
    """A default deferfs mount of tmp_path/src on tmp_path/mnt."""
    return mount_factory()


# ----------------------------------------------------------- data helpers

def write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def pwrite(path, data, off, flags=os.O_WRONLY):
    fd = os.open(str(path), flags)
    try:
        n = os.pwrite(fd, data, off)
        assert n == len(data)
    finally:
        os.close(fd)


def pread(path, n, off):
    fd = os.open(str(path), os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def src_names(path):
    """Names in a source directory, without deferfs' own .deferfs at the source root."""
    return sorted(n for n in os.listdir(path) if n != ".deferfs")


def cached_size(path):
    """The size the kernel holds for `path` without asking the daemon:
    statx(AT_STATX_DONT_SYNC), which FUSE answers from its cached attributes.
    A read inside that size does not ask the daemon either."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statx
    AT_STATX_DONT_SYNC, STATX_SIZE = 0x4000, 0x200
    if libc.statx(-100, os.fsencode(path), AT_STATX_DONT_SYNC, STATX_SIZE, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int.from_bytes(buf.raw[40:48], "little")  # stx_size


def drop_cache(path):
    """Drops the kernel's clean cached pages of one file (reads then reach the daemon)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def deferfs_bin():
    return DEFERFS


def pytest_configure(config):
    config.addinivalue_line("markers", "mount_opts(*opts): -o options for a test's mount fixture")
    # meson's timeout sends SIGTERM: let the fixtures' teardown run (unmount,
    # put enable_uring back) as on ^C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _uring_param_for_suite():
    """Under DEFERFS_TEST_TRANSPORT=uring, enable_uring is Y for the session
    (held with other processes, restored by the last: uring_param.py)."""
    if TRANSPORT != "uring":
        yield
        return
    if not uring_param.available():
        pytest.fail(f"DEFERFS_TEST_TRANSPORT=uring needs root and {uring_param.PARAM}")
    with uring_param.uring_enabled():
        yield
