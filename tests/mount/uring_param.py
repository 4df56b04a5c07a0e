"""The fuse module parameter enable_uring, shared safely by test processes.

Tests and benchmarks that run deferfs with transport=uring need
/sys/module/fuse/parameters/enable_uring = Y (root only). Several such
processes may run at once (meson runs two tests in parallel), so the
parameter is held, not just set: each holder registers its pid in a state
file under a lock (flock); the first holder saves the value it found and
sets Y, the last one to leave puts the saved value back. A holder that died
without leaving (SIGKILL) is dropped the next time anyone takes the lock, so
the value is restored by whoever leaves last; if everybody died, the saved
value stays in the state file and the next holder restores it when it
leaves. A live deferfs mount keeps its rings when the parameter is turned
off (the daemon sets FUSE_OVER_IO_URING in its INIT reply), so restoring N
never breaks a mount that is already up.

    with uring_enabled():          # Y for the block (shared with others)
        ...
    with uring_disabled_alone():   # N for the block; fails if another holds Y
        ...
"""

import contextlib
import errno
import fcntl
import json
import os
import time

PARAM = "/sys/module/fuse/parameters/enable_uring"
STATE_DIR = os.environ.get("DEFERFS_TEST_STATE_DIR", "/run/deferfs-test")
LOCK = os.path.join(STATE_DIR, "enable_uring.lock")
STATE = os.path.join(STATE_DIR, "enable_uring.json")


def available():
    """True when the parameter exists and we may write it (root)."""
    return os.path.exists(PARAM) and os.access(PARAM, os.W_OK)


def read_param():
    with open(PARAM) as f:
        return f.read().strip()


def _write_param(value):
    with open(PARAM, "w") as f:
        f.write(value + "\n")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def _locked(timeout=120.0):
    os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _load():
    try:
        with open(STATE) as f:
            st = json.load(f)
    except (OSError, ValueError):
        return {}
    st["holders"] = [p for p in st.get("holders", []) if _alive(p)]
    return st


def _save(st):
    tmp = STATE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(st, f)
    os.replace(tmp, STATE)


def acquire():
    with _locked():
        st = _load()
        if "saved" not in st:
            st["saved"] = read_param()
        st.setdefault("holders", []).append(os.getpid())
        _write_param("Y")
        _save(st)


def release():
    with _locked():
        st = _load()
        me = os.getpid()
        if me in st.get("holders", []):
            st["holders"].remove(me)
        if st.get("holders"):
            _save(st)
            return
        if "saved" in st:
            _write_param(st["saved"])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(STATE)


@contextlib.contextmanager
def uring_enabled():
    acquire()
    try:
        yield
    finally:
        release()


@contextlib.contextmanager
def uring_disabled_alone(timeout=120.0):
    """N for the block, holding the lock throughout (others wait); refuses
    (RuntimeError) while another live process holds Y."""
    deadline = time.monotonic() + timeout
    while True:
        with _locked(timeout):
            st = _load()
            others = [p for p in st.get("holders", []) if p != os.getpid()]
            if not others:
                before = read_param()
                _write_param("N")
                try:
                    yield
                finally:
                    _write_param(before)
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"enable_uring is held by {others}: cannot turn it off for this test")
        time.sleep(0.5)
