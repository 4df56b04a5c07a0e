"""Views (spec 9) through a real mount: libdeferfs through the `deferfs`
Python module. Each test mounts its own deferfs (mount suite fixtures)."""

import ctypes
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from conftest import PAGE, pread, pwrite, read_file, write_file, wait_for, daemon_pid_of

deferfs = pytest.importorskip("deferfs")
np = pytest.importorskip("numpy")

PY = "/usr/bin/python3"
SIGBUS = signal.SIGBUS


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def run_py(code, *args, timeout=120, user=None):
    cmd = [PY, "-c", textwrap.dedent(code), *map(str, args)]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(), cwd="/")


def address_of(view):
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0


def stats(m):
    return deferfs.stats(str(m.mnt))


# ------------------------------------------------------------------ content

def make_mixed_file(m, rng):
    """8 MiB source file: data, a hole, data, a trailing hole; returns its bytes."""
    size = 8 << 20
    data = bytearray(size)
    with open(m.s("f"), "wb") as f:
        for off, n in ((0, 2 << 20), (5 << 20, 1 << 20)):
            chunk = rng.randbytes(n)
            f.seek(off)
            f.write(chunk)
            data[off:off + n] = chunk
        f.truncate(size - 1234)  # the last page is partial
    return bytearray(data[:size - 1234])


def test_view_bytes_equal_mount_reads(mount_factory):
    """Random ranges over staged, spilled, hole, cut and past-the-end pages:
    the view's memory and View.read() equal read() through the mount."""
    rng = random.Random(14)
    m = mount_factory(opts=["dirty_limit=1M,cache_size=4M"])
    expect = make_mixed_file(m, rng)
    fd = os.open(m.m("f"), os.O_RDWR)
    try:
        # Staged pages: more than dirty_limit, so some are spilled.
        for i in range(600):
            off = rng.randrange(0, len(expect) - 100)
            b = rng.randbytes(rng.randrange(1, 100))
            os.pwrite(fd, b, off)
            expect[off:off + len(b)] = b
        # A truncate and extend: pages past the cut read zeros.
        os.ftruncate(fd, 7 << 20)
        os.ftruncate(fd, len(expect))
        expect[7 << 20:] = bytes(len(expect) - (7 << 20))
    finally:
        os.close(fd)
    assert stats(m)["spilled_bytes"] > 0
    v = deferfs.view(str(m.m("f")))
    assert v.size == len(expect) == len(v)
    mv = memoryview(v)
    assert mv.readonly
    for _ in range(300):
        off = rng.randrange(0, len(expect))
        n = rng.randrange(1, 200_000)
        via_mount = pread(m.m("f"), n, off)
        assert via_mount == expect[off:off + n]
        assert bytes(mv[off:off + n]) == via_mount, off
        assert v.read(off, n) == via_mount, off
    # The whole file at once.
    assert bytes(mv) == bytes(expect)
    # Past the end: read() is short, the rest of the last page reads zeros.
    assert v.read(len(expect) - 10, 100) == bytes(expect[-10:])
    assert v.read(len(expect) + 5, 10) == b""
    tail = (-len(expect)) % PAGE
    assert ctypes.string_at(address_of(v) + len(expect), tail) == bytes(tail)


def test_page_past_the_end_gives_sigbus(mount_factory):
    """A page wholly past the end (the file shrank under the view) raises
    SIGBUS, as a mapped file truncated underneath does; read() stops short."""
    m = mount_factory()
    write_file(m.s("f"), os.urandom(5 * PAGE))
    r = run_py("""
        import ctypes, os, sys, numpy as np, deferfs
        v = deferfs.view(sys.argv[1])
        addr = np.frombuffer(v, dtype=np.uint8).ctypes.data
        os.truncate(sys.argv[1], 4096)
        assert v.read(0, 5 * 4096) == open(sys.argv[1], 'rb').read(), 'read stops at the new end'
        print('touching', flush=True)
        ctypes.string_at(addr + 3 * 4096, 1)
        print('not reached', flush=True)
    """, m.m("f"))
    assert r.returncode == -SIGBUS, (r.returncode, r.stdout, r.stderr)
    assert "touching" in r.stdout and "not reached" not in r.stdout


def test_staged_write_is_seen_at_once(mount_factory):
    m = mount_factory()
    write_file(m.s("f"), b"a" * (4 * PAGE))
    v = deferfs.view(str(m.m("f")))
    mv = memoryview(v)
    assert bytes(mv[:4]) == b"aaaa"  # resident now, mapped in the view
    pwrite(m.m("f"), b"XYZ", 1)
    assert bytes(mv[:5]) == b"aXYZa"
    pwrite(m.m("f"), b"late", 3 * PAGE)  # a page the view never touched
    assert bytes(mv[3 * PAGE:3 * PAGE + 4]) == b"late"
    # A size change shows after refresh().
    pwrite(m.m("f"), b"grown", 10 * PAGE)
    assert len(v) == 4 * PAGE
    mv.release()
    v.refresh()
    assert len(v) == 10 * PAGE + 5
    assert bytes(memoryview(v)[10 * PAGE:]) == b"grown"
    assert bytes(memoryview(v)[5 * PAGE:6 * PAGE]) == bytes(PAGE)


def test_resident_pages_need_no_request(mount_factory):
    """A page once mapped is plain memory: touching it again loads nothing."""
    m = mount_factory()
    write_file(m.s("f"), os.urandom(64 * PAGE))
    v = deferfs.view(str(m.m("f")))
    a = np.frombuffer(v, dtype=np.uint64)
    s1 = int(a.sum())
    before = stats(m)["loaded_bytes"]
    assert int(a.sum()) == s1
    assert stats(m)["loaded_bytes"] == before


# -------------------------------------------------------------- one load

TOUCHER = """
    import ctypes, os, sys, threading, time, numpy as np, deferfs
    path, pages, go, nthreads = sys.argv[1], [int(p) for p in sys.argv[2].split(',')], sys.argv[3], int(sys.argv[4])
    v = deferfs.view(path)
    addr = np.frombuffer(v, dtype=np.uint8).ctypes.data
    buf = ctypes.create_string_buffer(8)
    while not os.path.exists(go):
        time.sleep(0.001)
    def touch(order):
        for p in order:
            ctypes.memmove(buf, addr + p * 4096 + 8, 8)  # releases the GIL: threads fault at once
    ts = []
    for i in range(nthreads):
        order = list(pages)
        if i % 2:
            order.reverse()
        ts.append(threading.Thread(target=touch, args=(order,)))
    for t in ts: t.start()
    for t in ts: t.join()
    print('ok')
"""


def test_threads_and_processes_load_each_page_once(mount_factory, tmp_path):
    m = mount_factory(opts=["readahead=0"])
    npages = 2048
    write_file(m.s("f"), os.urandom(npages * PAGE))
    rng = random.Random(3)
    pages = sorted(rng.sample(range(0, npages, 3), 200))  # spaced: never sequential
    go = tmp_path / "go"
    procs = [subprocess.Popen([PY, "-c", textwrap.dedent(TOUCHER), str(m.m("f")), ",".join(map(str, pages)),
                               str(go), "4"], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    time.sleep(1.0)
    before = stats(m)["loaded_bytes"]
    go.write_text("go")
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "ok" in out, err
    loaded = stats(m)["loaded_bytes"] - before
    assert loaded == len(pages) * PAGE, (loaded, len(pages))


# ------------------------------------------------------------- big file

def test_4g_view_scanned_twice_stays_within_the_cache(mount_factory):
    """4 GiB (sparse, with 16 MiB of random data spread over it), scanned
    twice through a view with cache_size=256M: the sums are right and the
    materialized bytes stay within the cache."""
    m = mount_factory(opts=["cache_size=256M,page_size=64k"])
    size = 4 << 30
    expect = 0
    with open(m.s("big"), "wb") as f:
        f.truncate(size)
        for i in range(16):
            chunk = os.urandom(1 << 20)
            f.seek(i * (256 << 20) + 12345 * 8)
            f.write(chunk)
            expect += int(np.frombuffer(chunk, dtype=np.uint64).sum(dtype=np.uint64))
    expect %= 1 << 64
    v = deferfs.view(str(m.m("big")))
    a = np.frombuffer(v, dtype=np.uint64)
    limit = stats(m)["cache_limit_bytes"]
    peak = 0
    for _ in range(2):
        total = 0
        for start in range(0, len(a), 1 << 24):  # 128 MiB at a time
            total += int(a[start:start + (1 << 24)].sum(dtype=np.uint64))
            peak = max(peak, stats(m)["materialized_bytes"])
        assert total % (1 << 64) == expect
    assert peak <= limit + (16 << 20), (peak, limit)


# ------------------------------------------------------------- conflicts

def test_conflict_gives_sigbus_and_eio(mount_factory):
    m = mount_factory(opts=["snapshot=guard"])
    write_file(m.s("f"), os.urandom(64 * PAGE))
    pwrite(m.m("f"), b"staged", 0)
    # An outside change of a file with staged pages: a conflict.
    time.sleep(0.02)
    with open(m.s("f"), "r+b") as f:
        f.seek(40 * PAGE)
        f.write(b"outside")
    st = m.status()
    assert st["files"][0]["state"] == "conflict", st
    r = run_py("""
        import ctypes, errno, sys, numpy as np, deferfs
        v = deferfs.view(sys.argv[1])
        addr = np.frombuffer(v, dtype=np.uint8).ctypes.data
        assert ctypes.string_at(addr, 6) == b'staged'      # a staged page still reads
        try:
            v.read(30 * 4096, 10)
            print('read: no error')
        except OSError as e:
            print('read:', errno.errorcode[e.errno], flush=True)
        ctypes.string_at(addr + 30 * 4096, 1)              # needs the changed source
        print('not reached', flush=True)
    """, m.m("f"))
    assert r.returncode == -SIGBUS, (r.returncode, r.stdout, r.stderr)
    assert "read: EIO" in r.stdout and "not reached" not in r.stdout, r.stdout
    assert m.mounted()
    m.discard()
    # Once discarded, a new view reads the new source.
    v = deferfs.view(str(m.m("f")))
    assert bytes(memoryview(v)[40 * PAGE:40 * PAGE + 7]) == b"outside"


# ------------------------------------------------------------------ access

@pytest.fixture
def shared_mount(mount_factory):
    top = tempfile.mkdtemp(prefix="deferfs-views-", dir="/tmp")
    os.chmod(top, 0o755)
    src, mnt = os.path.join(top, "src"), os.path.join(top, "mnt")
    os.mkdir(src)
    os.chmod(src, 0o755)
    os.mkdir(mnt)
    m = mount_factory(opts=["allow_other,default_permissions"], src=src, mnt=mnt)
    yield m
    import shutil
    shutil.rmtree(top, ignore_errors=True) if not m.mounted() else None


def test_who_may_not_read_gets_eacces_and_no_fd(shared_mount):
    m = shared_mount
    write_file(m.s("secret"), b"s" * PAGE)
    os.chmod(m.s("secret"), 0o600)
    write_file(m.s("public"), b"p" * PAGE)
    os.chmod(m.s("public"), 0o644)
    r = run_py("""
        import errno, json, os, sys, deferfs
        out = {}
        for name in ('secret', 'public'):
            before = set(os.listdir('/proc/self/fd'))
            try:
                v = deferfs.view(sys.argv[1] + '/' + name)
                out[name] = bytes(memoryview(v)[:1]).decode()
                del v
            except OSError as e:
                out[name] = errno.errorcode[e.errno]
            out[name + '_fds_left'] = len(set(os.listdir('/proc/self/fd')) - before)
        print(json.dumps(out))
    """, m.mnt, user=65534)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {"secret": "EACCES", "secret_fds_left": 0, "public": "p", "public_fds_left": 0}, out


# ------------------------------------------------------------- robustness

def test_client_killed_mid_fault_leaves_others_served(mount_factory):
    m = mount_factory()
    with open(m.s("big"), "wb") as f:
        f.truncate(1 << 30)
    write_file(m.s("small"), b"q" * (16 * PAGE))
    pid = daemon_pid_of(m.mnt)
    # A client scanning absent pages as fast as it can, killed mid-scan.
    p = subprocess.Popen([PY, "-c", textwrap.dedent("""
        import sys, numpy as np, deferfs
        v = deferfs.view(sys.argv[1])
        print('go', flush=True)
        np.frombuffer(v, dtype=np.uint64).sum()
    """), str(m.m("big"))], env=child_env(), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "go"
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    os.kill(pid, 0)  # the daemon lives
    v = deferfs.view(str(m.m("small")))
    assert bytes(memoryview(v)) == b"q" * (16 * PAGE)
    assert read_file(m.m("small")) == b"q" * (16 * PAGE)
    # The killed client's view ended: only ours is open.
    assert wait_for(lambda: stats(m)["files_open"] == 1, 10), stats(m)


def _fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_malformed_view_requests_change_nothing(mount_factory):
    m = mount_factory()
    write_file(m.s("f"), os.urandom(8 * PAGE))
    os.mkdir(m.s("d"))
    pwrite(m.m("f"), b"staged", 0)
    sock_path = os.getxattr(str(m.mnt), "user.deferfs.control").decode()
    pid = daemon_pid_of(m.mnt)
    status_before = m.status()
    rfd, wfd = os.pipe()

    def req(paths):
        return json.dumps({"version": 1, "op": "view", "paths": paths}).encode()

    def one(i):
        kind = i % 10
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(10)
        s.connect(sock_path)
        try:
            if kind == 0:
                s.send(req(["f", "f"]))                  # two files
            elif kind == 1:
                s.send(req(["d"]))                       # a directory
            elif kind == 2:
                s.send(req(["nope"]))                    # missing
            elif kind == 3:
                s.send(req([".deferfs/journal"]))        # the hidden directory
            elif kind == 4:
                s.send(req(["../etc/passwd"]))           # outside
            else:
                s.send(req(["f"]))
                msg, fds, _, _ = socket.recv_fds(s, 65536, 4)
                for fd in fds:
                    os.close(fd)
                assert json.loads(msg)["ok"], msg
                if kind == 5:
                    s.send(b"{not json")                 # garbage instead of map
                elif kind == 6:
                    s.send(json.dumps({"op": "map", "addr": 4096, "len": 4096}).encode())  # no uffd
                elif kind == 7:                          # a pipe instead of a uffd
                    socket.send_fds(s, [json.dumps({"op": "map", "addr": 4096, "len": 4096}).encode()], [rfd])
                elif kind == 8:
                    s.send(json.dumps({"op": "map", "addr": 4097, "len": -1}).encode())
                else:
                    pass                                 # hang up mid-handshake
                if kind != 9:
                    r = s.recv(65536)
                    assert not r or json.loads(r)["ok"] is False, r
            if kind < 5:
                r = json.loads(s.recv(65536))
                assert r["ok"] is False, r
        finally:
            s.close()

    for i in range(50):  # warm up: threads, allocator
        one(i)
    time.sleep(0.5)
    fds0, rss0 = _fd_count(pid), _rss(pid)
    for i in range(1000):
        one(i)
    os.close(rfd)
    os.close(wfd)
    assert wait_for(lambda: _fd_count(pid) <= fds0, 10), (_fd_count(pid), fds0)
    assert _rss(pid) < rss0 + (8 << 20), (_rss(pid), rss0)
    assert m.status() == status_before
    assert wait_for(lambda: stats(m)["files_open"] == 0, 10), stats(m)
    v = deferfs.view(str(m.m("f")))
    assert bytes(memoryview(v)[:6]) == b"staged"


# -------------------------------------------------------- control functions

def test_control_functions_return_spec_fields(mount_factory):
    m = mount_factory()
    write_file(m.s("f"), b"x" * (2 * PAGE))
    pwrite(m.m("f"), b"y", 5)
    st = deferfs.status(str(m.mnt))
    assert {"files", "dirty_pages", "dirty_bytes"} <= st.keys()
    assert st["files"] == [{"path": "f", "size": 2 * PAGE, "dirty_pages": 1, "dirty_bytes": PAGE,
                            "state": "staged"}], st
    s = deferfs.stats(str(m.mnt))
    for k in ("page_size", "files_open", "snapshots", "materialized_bytes", "loaded_bytes", "dirty_pages",
              "dirty_bytes", "skipped_pages", "synced_bytes", "evicted_bytes", "cache_limit_bytes",
              "daemon_rss_bytes"):
        assert k in s, k
    r = deferfs.sync(str(m.m("f")))
    assert r["files"] == 1 and r["pages_written"] == 1 and r["conflicts"] == [] and r["failed"] == [], r
    assert read_file(m.s("f"))[:6] == b"xxxxxy"
    pwrite(m.m("f"), b"z", 0)
    d = deferfs.discard(str(m.mnt))
    assert d["files"] == 1, d
    with pytest.raises(OSError) as e:
        deferfs.status("/proc")
    assert "not on a deferfs mount" in str(e.value)
