#!/usr/bin/python3
"""fsx-like model-based randomized test of deferfs (issue 4, spec 5, 6).

A real deferfs mount of a private source directory with a few files. Random
operations go through the mount (pread, pwrite of many shapes, truncate,
open(O_TRUNC), O_APPEND, mmap reads, shared mmap writes + msync,
fsync/fdatasync, reopen)
or through the CLI (sync and discard of everything or of one file, status),
plus unmount/remount (`deferfs umount`, `umount --discard`, `fusermount3 -u`)
and SIGKILL of the daemon followed by a lazy unmount and a remount.

Two models are kept per file:
  view[f]  what the mount must show (spec 5.1: snapshot + staged writes)
  src[f]   what the source file must contain (changes only on commit, 6.3)
and the expected effect of each operation is:
  write/truncate/O_TRUNC/append/mmap store
                                     view changes, src does not (6.1, 6.2)
  fsync, fdatasync, msync(MS_SYNC)   src[f] = view[f]   (6.4, fsync=commit)
  sync [f]                           src = view          (6.3)
  discard [f]                        view = src
  umount / fusermount3 -u            src = view          (6.5: sync first)
  umount --discard                   view = src
  SIGKILL + lazy unmount + remount   nothing changes: staged data is kept
                                     and shown again, staged (6.5)
Every read is compared with the model at once; the whole mount view, the
source files (read directly, not through the mount), the directory listing
and `status` are compared periodically and after every remount.

    fsx.py [--ops N] [--seed S] [-o OPT ...] [--files 3] [--max-size 4M]
           [--workdir DIR] [--check-every N] [--weights op=w,...] [-v]

Exit 0 when every operation matched the model, 1 on a mismatch (the seed,
the op number, the expected and actual bytes and the tail of the op log and
of the daemon's log are printed), 77 when not root.
"""

import argparse
import collections
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mountlib  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20

# Relative weights of the operations (reads and writes dominate; remounts
# and kills are rare because each costs a mount).
DEFAULT_WEIGHTS = {
    "read": 26,
    "read_fresh": 4,
    "read_tail": 2,
    "write": 18,
    "write_small": 6,
    "write_cross": 7,
    "write_same": 5,
    "write_extend": 3,
    "append": 0.7,
    "truncate_shrink": 1.2,
    "truncate_extend": 1.2,
    "truncate_page": 0.6,
    "mmap_read": 3,
    "mmap_write": 1.5,
    "fsync": 0.7,
    "fdatasync": 0.3,
    "reopen": 1.0,
    "open_trunc": 0.06,
    "sync_all": 0.35,
    "sync_one": 0.45,
    "discard_all": 0.2,
    "discard_one": 0.3,
    "status": 0.3,
    "remount": 0.045,
    "remount_discard": 0.025,
    "fusermount": 0.02,
    "kill": 0.05,
}

HANG_SECONDS = 60.0  # an op that makes no progress this long: the daemon is killed


class Mismatch(Exception):
    pass


def parse_size(s):
    s = str(s).strip()
    mult = {"k": KiB, "K": KiB, "m": MiB, "M": MiB, "g": 1 << 30, "G": 1 << 30}
    if s and s[-1] in mult:
        return int(s[:-1]) * mult[s[-1]]
    return int(s)


def first_diff(a, b):
    n = min(len(a), len(b))
    # Coarse then fine: fast on large equal prefixes.
    step = 4096
    i = 0
    while i < n and a[i:i + step] == b[i:i + step]:
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i if i < n or len(a) != len(b) else -1


def describe_diff(what, expected, actual, base=0, page_size=4096):
    i = first_diff(expected, actual)
    lines = [f"{what}: expected {len(expected)} bytes, got {len(actual)}"]
    if i >= 0:
        # Count differing pages for a quick picture.
        n = min(len(expected), len(actual))
        bad = 0
        first_pages = []
        for p in range(0, n, page_size):
            if expected[p:p + page_size] != actual[p:p + page_size]:
                bad += 1
                if len(first_pages) < 8:
                    first_pages.append((base + p) // page_size)
        lines.append(f"  first difference at offset {base + i} (page {(base + i) // page_size} of {page_size}); "
                     f"{bad} differing pages in the common length, first: {first_pages}")
        lo = max(0, i - 8)
        lines.append(f"  expected[{base + lo}:]: {bytes(expected[lo:lo + 32]).hex()}")
        lines.append(f"  actual  [{base + lo}:]: {bytes(actual[lo:lo + 32]).hex()}")
    return "\n".join(lines)


class Fsx:
    def __init__(self, workdir, seed, nfiles=3, max_size=4 * MiB, opts=(), check_every=1000,
                 weights=None, verbose=False, log_tail=40, out=sys.stdout):
        self.work = os.path.abspath(workdir)
        self.seed = seed
        self.rnd = random.Random(seed)
        self.nfiles = nfiles
        self.max_size = max_size
        self.opts = list(opts)
        self.page = 4096
        for o in self.opts:
            for part in o.split(","):
                if part.startswith("page_size="):
                    self.page = parse_size(part.split("=", 1)[1])
        self.check_every = check_every
        w = dict(DEFAULT_WEIGHTS)
        w.update(weights or {})
        self.weights_arg = ",".join(f"{k}={v:g}" for k, v in (weights or {}).items())
        self.op_names = [k for k, v in w.items() if v > 0]
        self.op_weights = [w[k] for k in self.op_names]
        self.verbose = verbose
        self.out = out
        self.log = collections.deque(maxlen=log_tail)
        self.srcdir = os.path.join(self.work, "src")
        self.mnt = os.path.join(self.work, "mnt")
        self.daemon_log = os.path.join(self.work, "deferfs.log")
        self.names = [f"f{i}" for i in range(nfiles)]
        self.view = []
        self.src = []
        self.clean = [True] * nfiles  # nothing staged for sure (so status must not list it)
        self.fds = [None] * nfiles
        self.proc = None
        self.opno = 0
        self.counts = collections.Counter()
        self.times = collections.Counter()
        self.progress = time.monotonic()
        self.hung = False
        self._stop = threading.Event()

    # ----------------------------------------------------------- plumbing

    def note(self, text):
        entry = f"#{self.opno} {text}"
        self.log.append(entry)
        if self.verbose:
            print(entry, file=self.out, flush=True)

    def fail(self, text):
        raise Mismatch(text)

    def mpath(self, i):
        return os.path.join(self.mnt, self.names[i])

    def spath(self, i):
        return os.path.join(self.srcdir, self.names[i])

    def daemon_log_tail(self, n=60):
        try:
            with open(self.daemon_log, errors="replace") as f:
                lines = f.readlines()
        except OSError:
            return "(no daemon log)"
        return "".join(lines[-n:])

    def daemon_state(self):
        p = self.proc
        if p is None:
            return "no daemon"
        rc = p.poll()
        if rc is None:
            return f"daemon {p.pid} running"
        if rc < 0:
            return f"DAEMON {p.pid} DIED of signal {signal.Signals(-rc).name}"
        return f"daemon {p.pid} exited with status {rc}"

    def report(self, err):
        lines = [
            f"FSX MISMATCH: seed {self.seed}, op {self.opno}, options {self.opts or '(defaults)'}, "
            f"page size {self.page}; {self.daemon_state()}",
            str(err),
            f"--- last {len(self.log)} ops ---",
            *self.log,
            f"--- reproduce: {sys.executable} {os.path.abspath(__file__)} --seed {self.seed} --ops {self.opno}"
            + "".join(f" -o {o}" for o in self.opts) + f" --files {self.nfiles} --max-size {self.max_size}"
            + (f" --weights {self.weights_arg}" if self.weights_arg else ""),
            "--- daemon log (tail) ---",
            self.daemon_log_tail(),
        ]
        return "\n".join(lines)

    def _watchdog(self):
        while not self._stop.wait(1.0):
            if time.monotonic() - self.progress > HANG_SECONDS:
                self.hung = True
                p = self.proc
                if p is not None and p.poll() is None:
                    print(f"fsx: op {self.opno} hung for {HANG_SECONDS:.0f}s: SIGKILL of the daemon",
                          file=self.out, flush=True)
                    p.kill()
                self.progress = time.monotonic()

    # -------------------------------------------------------------- mount

    def mount(self):
        before = len(mountlib.mounts_at(self.mnt, mountlib.FSTYPE))
        self.proc = mountlib.start_daemon(self.srcdir, self.mnt, self.opts, self.daemon_log)
        ok = mountlib.wait_for(lambda: len(mountlib.mounts_at(self.mnt, mountlib.FSTYPE)) > before
                               or self.proc.poll() is not None, 10)
        if self.proc.poll() is not None:
            self.fail(f"deferfs exited with status {self.proc.returncode} instead of mounting")
        if not ok:
            self.fail(f"{self.mnt} not mounted after 10 s")

    def close_fds(self, ignore_errors=False):
        for i, fd in enumerate(self.fds):
            if fd is None:
                continue
            self.fds[i] = None
            try:
                os.close(fd)
            except OSError:
                if not ignore_errors:
                    raise

    def fd(self, i):
        if self.fds[i] is None:
            self.fds[i] = os.open(self.mpath(i), os.O_RDWR)
        return self.fds[i]

    def wait_daemon_exit(self, what):
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.fail(f"{what}: the daemon is still running 30 s later")
        if rc != 0:
            self.fail(f"{what}: the daemon exited with status {rc}")
        if not mountlib.wait_for(lambda: not mountlib.mounts_at(self.mnt, mountlib.FSTYPE), 10):
            self.fail(f"{what}: {self.mnt} still mounted after the daemon exited")

    def cleanup(self):
        self._stop.set()
        self.close_fds(ignore_errors=True)
        if self.proc is not None:
            return mountlib.force_cleanup(self.mnt, proc=self.proc)
        return []

    # -------------------------------------------------------------- setup

    def setup(self):
        os.makedirs(self.srcdir, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)
        r = self.rnd
        for i in range(self.nfiles):
            kind = r.random()
            if kind < 0.1:
                size = 0
            elif kind < 0.4:
                size = r.randrange(1, self.max_size + 1)
            elif kind < 0.7:
                size = r.randrange(1, self.max_size // self.page + 1) * self.page
            else:
                size = r.randrange(1, 64 * KiB)
            data = bytearray(r.randbytes(size))
            if size > 3 * self.page and r.random() < 0.5:
                # A hole in the source: a sparse range served as zeros.
                a = r.randrange(0, size - 2 * self.page) // self.page * self.page
                b = min(size, a + r.randrange(1, 64) * self.page)
                data[a:b] = bytes(b - a)
                with open(self.spath(i), "wb") as f:
                    f.write(data[:a])
                    f.seek(b)
                    f.write(data[b:])
                    f.truncate(size)
            else:
                with open(self.spath(i), "wb") as f:
                    f.write(data)
            self.view.append(bytearray(data))
            self.src.append(bytearray(data))
        self.note("setup: " + ", ".join(f"{n}={len(v)}" for n, v in zip(self.names, self.view)))
        self.mount()

    # ------------------------------------------------------------- checks

    def check_file(self, i):
        with open(self.mpath(i), "rb") as f:
            got = f.read()
        if got != self.view[i]:
            self.fail(describe_diff(f"whole-file read of {self.names[i]} through the mount", self.view[i], got,
                                    page_size=self.page))
        st = os.stat(self.mpath(i))
        if st.st_size != len(self.view[i]):
            self.fail(f"stat of {self.names[i]} through the mount: size {st.st_size}, expected {len(self.view[i])}")

    def check_source(self, i):
        with open(self.spath(i), "rb") as f:
            got = f.read()
        if got != self.src[i]:
            self.fail(describe_diff(f"source file {self.spath(i)} (read directly)", self.src[i], got,
                                    page_size=self.page))

    def status(self):
        r = mountlib.cli("status", "--json", self.mnt)
        if r.rc != 0 or r.json is None:
            self.fail(f"deferfs status failed: {r!r}")
        return r.json

    def check_status(self, must_be_empty=False, clean_files=()):
        st = self.status()
        listed = {f["path"]: f for f in st["files"]}
        if must_be_empty and (listed or st["dirty_pages"] != 0):
            self.fail(f"status must show nothing staged: {st}")
        for i in range(self.nfiles):
            name = self.names[i]
            if self.view[i] != self.src[i]:
                f = listed.get(name)
                if f is None:
                    self.fail(f"{name}: the mount view differs from the source but status does not list it: {st}")
                if f["state"] != "staged":
                    self.fail(f"{name}: state {f['state']!r}, expected 'staged' (nothing changed outside): {st}")
                if f["size"] != len(self.view[i]):
                    self.fail(f"{name}: status size {f['size']}, expected {len(self.view[i])}: {st}")
            elif (self.clean[i] or i in clean_files) and name in listed:
                self.fail(f"{name}: nothing was staged since its last commit/discard (only same-byte writes), "
                          f"but status lists it: {st}")
        return st

    def check_all(self, why):
        self.note(f"check all ({why})")
        names = sorted(n for n in os.listdir(self.mnt))
        if names != sorted(self.names):
            self.fail(f"listing of the mount: {names}, expected {sorted(self.names)} (.deferfs must not show)")
        for i in range(self.nfiles):
            self.check_file(i)
            self.check_source(i)
        self.check_status()

    # ---------------------------------------------------------------- ops

    def pick_file(self):
        return self.rnd.randrange(self.nfiles)

    def rand_len(self, big=False):
        r = self.rnd.random()
        if r < 0.45:
            return self.rnd.randint(1, 512)
        if r < 0.8:
            return self.rnd.randint(1, 3 * self.page)
        if r < 0.97 or not big:
            return self.rnd.randint(1, 64 * KiB)
        return self.rnd.randint(64 * KiB, 512 * KiB)

    def apply_write(self, i, off, data):
        v = self.view[i]
        if off > len(v):
            v.extend(bytes(off - len(v)))
        v[off:off + len(data)] = data
        self.clean[i] = False

    def do_write(self, i, off, data, what):
        if off + len(data) > self.max_size:
            data = data[:max(0, self.max_size - off)]
            if not data:
                return
        self.note(f"{what} {self.names[i]} off={off} len={len(data)} (size {len(self.view[i])})")
        n = os.pwrite(self.fd(i), data, off)
        if n != len(data):
            self.fail(f"{what}: pwrite of {len(data)} bytes at {off} returned {n}")
        same = bytes(self.view[i][off:off + len(data)]) == data and off + len(data) <= len(self.view[i])
        if same:
            pass  # a write that leaves the bytes as they are stages nothing (6.1)
        else:
            self.apply_write(i, off, data)
        if self.rnd.random() < 0.2:
            # Read back the pages around the write at once.
            a = max(0, (off // self.page - 1) * self.page)
            b = ((off + len(data)) // self.page + 2) * self.page
            self.read_check(i, a, b - a, "read-back")

    def read_check(self, i, off, n, what, fd=None):
        got = os.pread(self.fd(i) if fd is None else fd, n, off)
        want = self.view[i][off:off + n]
        if got != want:
            self.fail(describe_diff(f"{what} of {self.names[i]} off={off} len={n} (size {len(self.view[i])})",
                                    want, got, base=off, page_size=self.page))

    def op_read(self):
        i = self.pick_file()
        size = len(self.view[i])
        off = self.rnd.randrange(0, size + 1) if size else 0
        if self.rnd.random() < 0.3:
            off = off // self.page * self.page
        n = self.rand_len(big=True)
        self.note(f"read {self.names[i]} off={off} len={n} (size {size})")
        self.read_check(i, off, n, "read")

    def op_read_fresh(self):
        i = self.pick_file()
        size = len(self.view[i])
        off = self.rnd.randrange(0, size + 1) if size else 0
        n = self.rand_len(big=True)
        self.note(f"read on a fresh fd {self.names[i]} off={off} len={n} (size {size})")
        fd = os.open(self.mpath(i), os.O_RDONLY)
        try:
            self.read_check(i, off, n, "read (fresh fd)", fd=fd)
        finally:
            os.close(fd)

    def op_read_tail(self):
        # Around and past the end of file.
        i = self.pick_file()
        size = len(self.view[i])
        off = max(0, size - self.rnd.randint(0, 2 * self.page))
        n = self.rnd.randint(1, 4 * self.page)
        self.note(f"read tail {self.names[i]} off={off} len={n} (size {size})")
        self.read_check(i, off, n, "read tail")

    def op_write(self):
        i = self.pick_file()
        size = len(self.view[i])
        off = self.rnd.randrange(0, size + 1) if size else 0
        if self.rnd.random() < 0.25:
            off = off // self.page * self.page
        n = self.rand_len(big=True)
        data = self.rnd.randbytes(n)
        if self.rnd.random() < 0.15 and n > 2:
            # Only part of the range changes: the rest rewrites the same bytes.
            cur = bytearray(self.view[i][off:off + n])
            cur.extend(bytes(n - len(cur)))
            k = self.rnd.randrange(n)
            cur[k] = (cur[k] + 1 + self.rnd.randrange(255)) % 256
            data = bytes(cur)
        self.do_write(i, off, data, "write")

    def op_write_small(self):
        i = self.pick_file()
        size = len(self.view[i])
        off = self.rnd.randrange(0, size + 1) if size else 0
        self.do_write(i, off, self.rnd.randbytes(self.rnd.randint(1, 16)), "write small")

    def op_write_cross(self):
        i = self.pick_file()
        size = len(self.view[i])
        pages = max(1, (size + self.page - 1) // self.page)
        b = self.rnd.randrange(1, pages + 1) * self.page  # a page boundary
        before = self.rnd.randint(1, min(b, 2 * self.page))
        after = self.rnd.randint(1, 2 * self.page)
        self.do_write(i, b - before, self.rnd.randbytes(before + after), "write across a page boundary")

    def op_write_same(self):
        i = self.pick_file()
        size = len(self.view[i])
        if size == 0:
            return self.op_write_extend()
        off = self.rnd.randrange(0, size)
        n = min(size - off, self.rand_len(big=True))
        data = bytes(self.view[i][off:off + n])
        was_clean = self.clean[i]
        self.do_write(i, off, data, "write same bytes")
        if was_clean and self.rnd.random() < 0.05:
            self.note(f"status: {self.names[i]} must still be clean")
            self.check_status(clean_files=(i,))

    def op_write_extend(self):
        i = self.pick_file()
        size = len(self.view[i])
        if size >= self.max_size:
            return self.op_truncate_shrink()
        gap = 0 if self.rnd.random() < 0.5 else self.rnd.randint(1, 3 * self.page)
        n = self.rand_len()
        self.do_write(i, size + gap, self.rnd.randbytes(n), "write extending")

    def op_append(self):
        i = self.pick_file()
        size = len(self.view[i])
        n = self.rnd.randint(1, 2 * self.page)
        if size + n > self.max_size:
            return self.op_truncate_shrink()
        data = self.rnd.randbytes(n)
        self.note(f"append {self.names[i]} len={n} (size {size})")
        fd = os.open(self.mpath(i), os.O_WRONLY | os.O_APPEND)
        try:
            w = os.write(fd, data)
        finally:
            os.close(fd)
        if w != n:
            self.fail(f"append: write of {n} returned {w}")
        self.apply_write(i, size, data)

    def do_truncate(self, i, new, what):
        self.note(f"{what} {self.names[i]} {len(self.view[i])} -> {new}")
        os.ftruncate(self.fd(i), new)
        v = self.view[i]
        if new < len(v):
            del v[new:]
        else:
            v.extend(bytes(new - len(v)))
        self.clean[i] = False
        if self.rnd.random() < 0.3:
            st = os.fstat(self.fd(i))
            if st.st_size != new:
                self.fail(f"fstat after {what}: size {st.st_size}, expected {new}")
            a = max(0, new - 2 * self.page)
            self.read_check(i, a, 4 * self.page, f"read after {what}")

    def op_truncate_shrink(self):
        i = self.pick_file()
        size = len(self.view[i])
        if self.rnd.random() < 0.05:
            new = 0
        else:
            new = self.rnd.randrange(0, size + 1) if size else 0
            if self.rnd.random() < 0.5:
                new = max(new, size - self.rnd.randint(0, 3 * self.page))
        self.do_truncate(i, new, "truncate (shrink)")

    def op_truncate_extend(self):
        i = self.pick_file()
        size = len(self.view[i])
        new = min(self.max_size, size + self.rnd.choice([1, self.rnd.randint(1, 3 * self.page),
                                                          self.rnd.randint(1, 256 * KiB)]))
        self.do_truncate(i, new, "truncate (extend)")

    def op_truncate_page(self):
        i = self.pick_file()
        size = len(self.view[i])
        new = min(self.max_size // self.page, self.rnd.randint(0, size // self.page + 2)) * self.page
        self.do_truncate(i, new, "truncate (page boundary)")

    def op_mmap_read(self):
        i = self.pick_file()
        size = len(self.view[i])
        if size == 0:
            return self.op_read()
        off = self.rnd.randrange(0, size)
        n = min(size - off, self.rand_len(big=True))
        self.note(f"mmap read {self.names[i]} off={off} len={n} (size {size})")
        mm = mmap.mmap(self.fd(i), size, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            got = mm[off:off + n]
        finally:
            mm.close()
        want = self.view[i][off:off + n]
        if got != want:
            self.fail(describe_diff(f"mmap read of {self.names[i]} off={off} len={n}", want, got, base=off,
                                    page_size=self.page))

    def op_mmap_write(self):
        i = self.pick_file()
        size = len(self.view[i])
        if size == 0:
            return self.op_write_extend()
        off = self.rnd.randrange(0, size)
        n = min(size - off, self.rand_len())
        data = self.rnd.randbytes(n)
        self.note(f"mmap write + msync(MS_SYNC) {self.names[i]} off={off} len={n} (size {size}): commits the file")
        mm = mmap.mmap(self.fd(i), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            mm[off:off + n] = data
            mm.flush()  # msync(MS_SYNC): commits the file (spec 6.4)
        finally:
            mm.close()
        self.apply_write(i, off, data)
        self.src[i] = bytearray(self.view[i])
        self.clean[i] = True
        if self.rnd.random() < 0.2:
            self.check_source(i)

    def do_fsync(self, how):
        i = self.pick_file()
        self.note(f"{how} {self.names[i]}: commits the file")
        getattr(os, how)(self.fd(i))
        self.src[i] = bytearray(self.view[i])
        self.clean[i] = True
        if self.rnd.random() < 0.3:
            self.check_source(i)

    def op_fsync(self):
        self.do_fsync("fsync")

    def op_fdatasync(self):
        self.do_fsync("fdatasync")

    def op_reopen(self):
        i = self.pick_file()
        self.note(f"reopen {self.names[i]}")
        if self.fds[i] is not None:
            os.close(self.fds[i])
            self.fds[i] = None
        if self.rnd.random() < 0.5:
            self.fd(i)

    def op_open_trunc(self):
        i = self.pick_file()
        self.note(f"open {self.names[i]} with O_TRUNC (size {len(self.view[i])})")
        fd = os.open(self.mpath(i), os.O_RDWR | os.O_TRUNC)
        if self.rnd.random() < 0.5:
            if self.fds[i] is not None:
                os.close(self.fds[i])
            self.fds[i] = fd
        else:
            os.close(fd)
        del self.view[i][:]
        self.clean[i] = False
        if self.rnd.random() < 0.3:
            self.read_check(i, 0, 2 * self.page, "read after open(O_TRUNC)")

    def check_cli(self, what, r, files=None):
        if r.rc != 0:
            self.fail(f"{what}: exit {r.rc}\nstdout: {r.out}\nstderr: {r.err}")
        if r.json is None:
            self.fail(f"{what}: no JSON output: {r!r}")
        for k in ("conflicts", "failed"):
            if r.json.get(k):
                self.fail(f"{what}: {k} = {r.json[k]}")

    def op_sync_all(self):
        self.note("deferfs sync (mount)")
        r = mountlib.cli("sync", "--json", self.mnt)
        self.check_cli("deferfs sync", r)
        for i in range(self.nfiles):
            self.src[i] = bytearray(self.view[i])
            self.clean[i] = True
        self.check_status(must_be_empty=True)
        if self.rnd.random() < 0.2:
            for i in range(self.nfiles):
                self.check_source(i)

    def op_sync_one(self):
        i = self.pick_file()
        self.note(f"deferfs sync {self.names[i]}")
        r = mountlib.cli("sync", "--json", self.mpath(i))
        self.check_cli(f"deferfs sync {self.names[i]}", r)
        self.src[i] = bytearray(self.view[i])
        self.clean[i] = True
        self.check_status()
        if self.rnd.random() < 0.3:
            for j in range(self.nfiles):
                self.check_source(j)

    def op_discard_all(self):
        self.note("deferfs discard (mount)")
        r = mountlib.cli("discard", "--json", self.mnt)
        self.check_cli("deferfs discard", r)
        for i in range(self.nfiles):
            self.view[i] = bytearray(self.src[i])
            self.clean[i] = True
        self.check_status(must_be_empty=True)

    def op_discard_one(self):
        i = self.pick_file()
        self.note(f"deferfs discard {self.names[i]}")
        r = mountlib.cli("discard", "--json", self.mpath(i))
        self.check_cli(f"deferfs discard {self.names[i]}", r)
        self.view[i] = bytearray(self.src[i])
        self.clean[i] = True
        self.check_status()
        if self.rnd.random() < 0.3:
            self.check_file(i)

    def op_status(self):
        self.note("deferfs status")
        self.check_status()

    def op_remount(self, how="umount"):
        self.note({"umount": "deferfs umount (syncs) + mount",
                   "discard": "deferfs umount --discard + mount",
                   "fusermount": "fusermount3 -u (syncs) + mount"}[how])
        self.close_fds()
        if how == "fusermount":
            r = mountlib.run("fusermount3", "-u", self.mnt)
            if r.returncode != 0:
                self.fail(f"fusermount3 -u: exit {r.returncode}: {r.stderr}")
        else:
            args = ["umount"] + (["--discard"] if how == "discard" else []) + [self.mnt]
            r = mountlib.cli(*args)
            if r.rc != 0:
                self.fail(f"deferfs {' '.join(args)}: exit {r.rc}\nstdout: {r.out}\nstderr: {r.err}")
        self.wait_daemon_exit(how)
        for i in range(self.nfiles):
            if how == "discard":
                self.view[i] = bytearray(self.src[i])
            else:
                self.src[i] = bytearray(self.view[i])
            self.clean[i] = True
        for i in range(self.nfiles):
            self.check_source(i)
        self.mount()
        self.check_all(f"after {how} + mount")

    def op_remount_discard(self):
        self.op_remount("discard")

    def op_fusermount(self):
        self.op_remount("fusermount")

    def op_kill(self):
        staged = [self.names[i] for i in range(self.nfiles) if self.view[i] != self.src[i]]
        self.note(f"SIGKILL of the daemon + fusermount3 -uz + mount (staged, must survive: {staged})")
        self.proc.kill()
        self.proc.wait()
        self.close_fds(ignore_errors=True)
        r = mountlib.run("fusermount3", "-uz", self.mnt)
        if r.returncode != 0 and mountlib.mounts_at(self.mnt, mountlib.FSTYPE):
            self.fail(f"fusermount3 -uz after SIGKILL: {r.stderr}")
        for i in range(self.nfiles):
            self.check_source(i)
        self.mount()
        # Spec 6.5: the staged pages are shown again, staged; status lists them.
        self.check_all("after SIGKILL + mount: staged data kept (spec 6.5)")

    # ---------------------------------------------------------------- run

    def step(self):
        name = self.rnd.choices(self.op_names, self.op_weights)[0]
        self.counts[name] += 1
        t = time.perf_counter()
        getattr(self, "op_" + name)()
        self.times[name] += time.perf_counter() - t

    def run(self, nops):
        """Runs nops operations; returns None on success, the report text on a mismatch."""
        dog = threading.Thread(target=self._watchdog, daemon=True)
        dog.start()
        try:
            self.setup()
            self.check_all("initial")
            for self.opno in range(1, nops + 1):
                self.progress = time.monotonic()
                self.step()
                if self.opno % self.check_every == 0:
                    self.check_all("periodic")
            self.opno = nops
            self.op_remount("umount")
            return None
        except Mismatch as e:
            return self.report(e)
        except (OSError, subprocess.SubprocessError) as e:
            extra = " (the op hung: the watchdog killed the daemon)" if self.hung else ""
            return self.report(f"unexpected error{extra}: {type(e).__name__}: {e}")


def run_fsx(workdir, seed, nops, **kw):
    """One fsx run in workdir (created, then left for inspection on failure)."""
    os.makedirs(workdir, exist_ok=True)
    f = Fsx(workdir, seed, **kw)
    t0 = time.monotonic()
    failure = None
    try:
        failure = f.run(nops)
    finally:
        notes = f.cleanup()
    elapsed = time.monotonic() - t0
    if notes and failure is None:
        failure = f.report("cleanup problems: " + "; ".join(notes))
    # The last daemon is unmounted by cleanup: it too must exit 0, and no
    # daemon of the run may have printed a sanitizer report (issue 16.6).
    if failure is None and f.proc is not None and f.proc.returncode != 0:
        failure = f.report(f"the last daemon exited with status {f.proc.returncode} at the final unmount")
    try:
        with open(f.daemon_log, errors="replace") as log:
            reports = mountlib.daemonwatch.log_problems(log.read())
    except OSError:
        reports = []
    if failure is None and reports:
        failure = f.report("sanitizer reports in the daemon log: " + "; ".join(reports[:5]))
    return failure, f, elapsed


def parse_weights(text):
    w = {}
    if not text:
        return w
    for item in text.split(","):
        k, v = item.split("=")
        if k not in DEFAULT_WEIGHTS:
            raise SystemExit(f"fsx: unknown op {k!r}; ops: {', '.join(DEFAULT_WEIGHTS)}")
        w[k] = float(v)
    return w


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("-o", dest="opts", action="append", default=[], help="mount option(s), e.g. page_size=16k")
    ap.add_argument("--files", type=int, default=3)
    ap.add_argument("--max-size", default="4M")
    ap.add_argument("--check-every", type=int, default=1000)
    ap.add_argument("--weights", default="", help="override op weights, e.g. kill=0,remount=0.1 (debugging only)")
    ap.add_argument("--workdir", default=None, help="parent directory of the run's private directory")
    ap.add_argument("--keep", action="store_true", help="keep the run's directory")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every op")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("fsx: needs root (FUSE mounts, SIGKILL of the daemon, lazy unmount)")
        return 77
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    work = tempfile.mkdtemp(prefix=f"deferfs-fsx-{seed}-", dir=args.workdir)
    print(f"fsx: seed {seed}, {args.ops} ops, options {args.opts or '(defaults)'}, dir {work}", flush=True)
    failure, f, elapsed = run_fsx(work, seed, args.ops, nfiles=args.files, max_size=parse_size(args.max_size),
                                  opts=args.opts, check_every=args.check_every,
                                  weights=parse_weights(args.weights), verbose=args.verbose)
    print(f"fsx: {f.opno} ops in {elapsed:.1f} s ({f.opno / max(elapsed, 1e-9):.0f} ops/s); "
          + ", ".join(f"{k} {v}" for k, v in sorted(f.counts.items())), flush=True)
    if args.verbose:
        for k, v in sorted(f.times.items(), key=lambda kv: -kv[1]):
            print(f"  {k:16s} {f.counts[k]:7d} ops {v:7.2f} s {v / f.counts[k] * 1e3:8.3f} ms/op")
    if failure:
        print(failure, flush=True)
        print(f"fsx: run directory kept: {work}")
        return 1
    print(f"fsx: seed {seed}: {args.ops} ops, no mismatch")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
