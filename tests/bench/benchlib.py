"""Helpers shared by the I/O benchmarks of tests/bench (fio_compare, sync_bench).

Nothing here asserts a timing. The mount helper always cleans up: `deferfs
umount --discard`, then a lazy `fusermount3 -uz`, then (only for the daemon it
started, by pid) SIGKILL if the daemon does not exit.
"""
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import time

DEFERFS = os.environ.get("DEFERFS") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "../../build/src/deferfs")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def pin_binary(workdir):
    """Copies the deferfs binary into `workdir` and uses the copy from then on,
    for the daemon and the CLI alike: others may rebuild build/src/deferfs
    while a long benchmark runs, and a new CLI may not speak to an old daemon."""
    global DEFERFS
    copy = os.path.join(workdir, "deferfs.bin")
    shutil.copy2(DEFERFS, copy)
    DEFERFS = copy
    return copy


def describe_binary(path):
    """The binary's build time and the tree's HEAD, to say what was measured."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(path)))
    repo = os.path.dirname(os.path.abspath(__file__))
    head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no", "--", "src",
                            "include"], capture_output=True, text=True).stdout.strip()
    return f"{path} (built {when}; tree at {head}{' + uncommitted changes in src/include' if dirty else ''})"


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def term_as_interrupt():
    """meson stops a benchmark with SIGTERM: turn it into an exception so that
    the scripts' finally blocks unmount and remove their files."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, handler)


def drop_caches():
    """All of the kernel's caches, the source's and the mount's alike: pages,
    dentries and inodes (not deferfs's shared-memory segments).

    Dropped twice. The first pass evicts the mount's inodes, and the kernel
    sends FORGET for them; only then does deferfs close the source files it
    held for them. While it held them, the source's dentries and inodes were
    pinned and survived the first pass, so a direct open right after a single
    drop found the source warm that the mount then had to read from disk
    (measured: open + first 4 KiB 120 us after one drop, 760 us after two).
    The second pass, after the daemon let go, leaves both sides cold."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    time.sleep(0.05)  # the daemon handles the FORGETs (microseconds each)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fadvise_dontneed(path):
    """Drops the clean pages of `path`'s own page cache only. On a FUSE path
    this empties the mount's kernel cache of the file; FUSE does not forward
    fadvise, so the daemon's segments and the source's page cache stay."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_bytes(path):
    """Bytes of `path` in the kernel's page cache (fincore(1): mincore/cachestat)."""
    out = subprocess.run(["fincore", "--bytes", "--raw", "--noheadings", "-o", "RES", path],
                         capture_output=True, text=True)
    try:
        return int(out.stdout.split()[0])
    except (ValueError, IndexError):
        return -1


def mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def make_random_file(path, size, chunk=64 * MiB):
    """Writes `size` bytes of /dev/urandom to `path`; returns their sha1."""
    h = hashlib.sha1()
    with open(path, "wb") as w:
        left = size
        while left:
            n = min(left, chunk)
            b = os.urandom(n)
            h.update(b)
            w.write(b)
            left -= n
    return h.hexdigest()


def read_all(path, chunk=1 * MiB, hasher=None):
    """Reads `path` sequentially; returns (bytes read, hex digest or None)."""
    h = hashlib.sha1() if hasher is None else hasher
    total = 0
    buf = bytearray(chunk)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(memoryview(buf)[:n])
            total += n
    return total, h.hexdigest()


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def proc_cpu_seconds(pid):
    """user+system CPU seconds of a process (and its finished threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def fuse_daemon_pid(mnt):
    """The pid of the process serving the FUSE mount at `mnt` (the one
    holding /dev/fuse whose command line names the mount point), or None."""
    mnt = os.path.realpath(mnt)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            if mnt in args and any(os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse"
                                   for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    return None


def median_spread(xs):
    return statistics.median(xs), min(xs), max(xs)


class Mount:
    """A deferfs mount of `src` on `mnt` for the duration of a with-block."""

    def __init__(self, src, mnt, opts="", state_dir=None, binary=None):
        """`state_dir`: a private directory for the daemon's control socket, so
        that no other daemon started meanwhile on this shared machine can
        sweep it as stale. `binary`: another program with deferfs's command
        line (the peer, ../shared/peer/peer-deferfs); default deferfs."""
        if state_dir:
            os.makedirs(state_dir, exist_ok=True)
            opts = ",".join(o for o in (f"state_dir={state_dir}", opts) if o)
        self.src, self.mnt, self.opts = src, mnt, opts
        self.binary = binary
        self.pid = None

    def program(self):
        return self.binary or DEFERFS

    def __enter__(self):
        cmd = [self.program(), self.src, self.mnt] + (["-o", self.opts] if self.opts else [])
        sh(*cmd)
        try:
            self.pid = self.stats().get("pid") or fuse_daemon_pid(self.mnt)
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def cli(self, *args, path=None):
        out = subprocess.run([self.program(), *args, path or self.mnt], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"deferfs {' '.join(args)}: rc {out.returncode}: {out.stderr.strip()}")
        return json.loads(out.stdout) if "--json" in args else out.stdout

    def stats(self):
        return self.cli("stats", "--json")

    def bdi_dir(self):
        st = os.stat(self.mnt)
        return f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"

    def read_ahead_kb(self):
        try:
            with open(os.path.join(self.bdi_dir(), "read_ahead_kb")) as f:
                return int(f.read())
        except OSError:
            return -1

    def cpu_seconds(self):
        return proc_cpu_seconds(self.pid)

    def __exit__(self, *exc):
        if mounted(self.mnt):
            subprocess.run([self.program(), "umount", "--discard", self.mnt], capture_output=True, timeout=600)
        if mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", self.mnt])
        if self.pid:
            for _ in range(300):  # the daemon frees its segments, then exits
                if not os.path.exists(f"/proc/{self.pid}"):
                    break
                time.sleep(0.1)
            else:
                try:  # our own daemon, by pid
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return False
