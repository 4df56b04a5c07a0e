"""-o transport: FUSE over io_uring (one ring per CPU) and /dev/fuse (issue 12).

The uring tests hold enable_uring at Y (uring_param.py) whatever suite runs
them; every mount names its transport.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import uring_param
from conftest import (force_cleanup, mountinfo, mounts_at, pid_alive, read_file, run, start_daemon, wait_for,
                      write_file)

CHILD_TIMEOUT = 60


def possible_cpus():
    out = set()
    with open("/sys/devices/system/cpu/possible") as f:
        for part in f.read().strip().split(","):
            a, _, b = part.partition("-")
            out.update(range(int(a), int(b or a) + 1))
    return sorted(out)


CPUS = possible_cpus()
ONLINE = sorted(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def uring():
    if not uring_param.available():
        pytest.skip(f"needs root and {uring_param.PARAM}")
    with uring_param.uring_enabled():
        yield


def ring_threads(pid):
    """[(name, allowed cpus)] of the daemon's ring threads."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            if not name.startswith("deferfs-uring"):
                continue
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                allowed = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("Cpus_allowed_list")][0]
            out.append((name, allowed))
        except OSError:
            pass
    return sorted(out)


def io_uring_fds(pid):
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "io_uring" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                n += 1
        except OSError:
            pass
    return n


def connection_id(mnt):
    """The kernel's FUSE connection number of the mount (minor of its device)."""
    return int(mounts_at(mnt)[0]["dev"].split(":")[1])


def fuse_connections():
    """Live FUSE connections, from fusectl mounted in a private mount
    namespace (nothing is left mounted here)."""
    r = run("unshare", "-m", "sh", "-c",
            "mount -t fusectl none /sys/fs/fuse/connections && ls /sys/fs/fuse/connections")
    assert r.returncode == 0, r
    return {int(n) for n in r.stdout.split()}


def connection_gone(conn):
    """Connection `conn` ended (its number may already serve a new mount of
    another test: then a mount with that device exists again)."""
    return conn not in fuse_connections() or any(e["dev"] == f"0:{conn}" for e in mountinfo())


def shm_files_of(src):
    """Staged-state files in /dev/shm that name the source directory `src`."""
    out = []
    for n in os.listdir("/dev/shm"):
        if n.startswith("deferfs.") and n.endswith(".meta"):
            try:
                with open(f"/dev/shm/{n}", "rb") as f:
                    if os.fsencode(str(src)) in f.read(8192):
                        out.append(n)
            except OSError:
                pass
    return out


# A child process pinned to one CPU; its work is Python code given as text.
CHILD = r"""
import hashlib, os, sys, random
cpu = int(sys.argv[1]); os.sched_setaffinity(0, {cpu})
exec(sys.argv[2])
"""


def child(cpu, code, *args):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(cpu), code] + [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs, timeout=CHILD_TIMEOUT):
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            pytest.fail(f"a client hung for {timeout}s (a request never answered?)\n{err}")
        results.append((p.returncode, out, err))
    return results


# ----------------------------------------------------------------- choice

def test_dev_is_reported(mount_factory):
    m = mount_factory(opts=["transport=dev"])
    write_file(m.m("a"), b"x" * 10000)
    assert read_file(m.m("a")) == b"x" * 10000
    st = m.stats()
    assert st["transport"] == "dev"
    assert st["transport_reason"] == "transport=dev"
    assert st["transport_queue_requests"] == []
    assert ring_threads(m.proc.pid) == []
    human = m.cli("stats", m.mnt)
    assert "transport: dev (transport=dev)" in human.out
    assert "transport: /dev/fuse (transport=dev)" in m.log()


def test_uring_serves_every_request_kind(uring, mount_factory):
    m = mount_factory(opts=["transport=uring"])
    data = os.urandom(3 << 20)
    write_file(m.m("big"), data)
    os.mkdir(m.m("d"))
    os.symlink("big", m.m("d/link"))
    os.rename(m.m("big"), m.m("d/big"))
    assert read_file(m.m("d/link")) == data
    assert sorted(os.listdir(m.m("d"))) == ["big", "link"]
    os.setxattr(m.m("d/big"), "user.k", b"v")
    assert os.getxattr(m.m("d/big"), "user.k") == b"v"
    os.truncate(m.m("d/big"), 1000)
    assert os.stat(m.m("d/big")).st_size == 1000
    st = m.stats()
    assert st["transport"] == "uring", st
    assert len(st["transport_queue_requests"]) == len(CPUS)
    assert sum(st["transport_queue_requests"]) > 20
    assert "transport: uring (one io_uring per CPU" in m.log()
    # One ring thread per CPU, each pinned to its CPU.
    threads = ring_threads(m.proc.pid)
    assert sorted(a for _, a in threads) == sorted(str(c) for c in CPUS), threads
    assert io_uring_fds(m.proc.pid) == len(CPUS)
    m.sync()
    assert read_file(m.s("d/big")) == data[:1000]


def test_each_cpu_is_served_by_its_own_ring(uring, mount_factory):
    m = mount_factory(opts=["transport=uring"])
    for cpu in ONLINE:
        os.mkdir(m.s(f"c{cpu}"))
        for i in range(300):
            write_file(m.s(f"c{cpu}/f{i}"), f"{cpu}:{i}".encode())
    before = m.stats()["transport_queue_requests"]
    # All CPUs at once: lookups and reads of names no one asked for yet.
    code = r"""
d = sys.argv[3]
for i in range(300):
    with open(f"{d}/c{cpu}/f{i}", "rb") as f:
        assert f.read() == f"{cpu}:{i}".encode()
print("ok")
"""
    res = finish([child(cpu, code, m.mnt) for cpu in ONLINE])
    assert all(rc == 0 and out.strip() == "ok" for rc, out, _ in res), res
    after = m.stats()["transport_queue_requests"]
    for cpu in ONLINE:
        # 300 LOOKUPs + 300 OPENs + 300 READs + 300 RELEASEs (FLUSH too) from that CPU.
        assert after[cpu] - before[cpu] >= 900, (cpu, before, after)


def test_concurrent_writers_and_readers_on_every_cpu(uring, mount_factory):
    m = mount_factory(opts=["transport=uring"])
    code = r"""
d, k = sys.argv[3], int(sys.argv[4])
rnd = random.Random(cpu * 100 + k)
sums = {}
for i in range(12):
    size = rnd.randrange(1, 3 << 20)
    data = rnd.randbytes(size)
    p = f"{d}/w{cpu}.{k}.{i}"
    with open(p, "wb") as f:
        for off in range(0, size, 200000):
            f.write(data[off:off + 200000])
    sums[p] = hashlib.sha256(data).hexdigest()
for p, h in sums.items():
    with open(p, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == h, p
    os.unlink(p)
print("ok")
"""
    procs = [child(cpu, code, m.mnt, k) for cpu in ONLINE for k in range(3)]
    res = finish(procs, timeout=120)
    assert all(rc == 0 and out.strip() == "ok" for rc, out, _ in res), res
    assert [n for n in os.listdir(m.mnt) if n.startswith("w")] == []
    assert m.stats()["transport"] == "uring"


# ------------------------------------------------- /dev/fuse beside the rings

def test_interrupts_while_requests_run(uring, tmp_path):
    """Signals to clients in the middle of requests: the kernel sends
    INTERRUPT through /dev/fuse while the request is in a ring; every read
    still returns the right bytes."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    data = os.urandom(32 << 20)
    write_file(src / "f", data)
    log = tmp_path / "deferfs.log"
    proc = start_daemon(src, mnt, ["transport=uring"], log, extra_args=["-d"])
    try:
        assert wait_for(lambda: mounts_at(mnt), 10), log.read_text()
        # O_DIRECT reads and fsyncs wait for their answer (page-cache reads
        # do not: readahead is asynchronous), so a signal interrupts them.
        code = r"""
import mmap, signal, time
signal.signal(signal.SIGUSR1, lambda *a: None)
print("ready", flush=True)
src, path = sys.argv[3], sys.argv[4]
want = open(src, "rb").read()
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
wfd = os.open(path + f".w{cpu}", os.O_WRONLY | os.O_CREAT, 0o644)
buf = mmap.mmap(-1, 1 << 20)
end = time.monotonic() + 3
n = 0
while time.monotonic() < end:
    off = random.randrange(0, len(want) - (1 << 20)) & ~4095
    assert os.preadv(fd, [buf], off) == 1 << 20
    assert buf[:] == want[off:off + (1 << 20)], off
    os.pwrite(wfd, want[off:off + 65536], 0)
    os.fsync(wfd)
    n += 1
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
print(n)
"""
        procs = [child(cpu, code, src / "f", mnt / "f") for cpu in ONLINE]
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        end = time.monotonic() + 3.5
        while time.monotonic() < end and any(p.poll() is None for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGUSR1)
            time.sleep(0.0005)
        res = finish(procs)
        assert all(rc == 0 for rc, _, _ in res), res
        text = log.read_text(errors="replace")
        assert "transport: uring" in text
        assert "opcode: INTERRUPT" in text, "no INTERRUPT reached the daemon"
        assert proc.poll() is None
    finally:
        force_cleanup(mnt, proc=proc)


def test_forget_storm_beside_ring_requests(uring, mount_factory):
    """Thousands of FORGETs (unlinked inodes) through /dev/fuse while other
    CPUs' requests go through the rings."""
    m = mount_factory(opts=["transport=uring"])
    code = r"""
d = sys.argv[3]
for r in range(3):
    for i in range(1000):
        with open(f"{d}/t{cpu}_{i}", "wb") as f:
            f.write(b"z")
    for i in range(1000):
        os.stat(f"{d}/t{cpu}_{i}")
        os.unlink(f"{d}/t{cpu}_{i}")
print("ok")
"""
    res = finish([child(cpu, code, m.mnt) for cpu in ONLINE], timeout=120)
    assert all(rc == 0 and out.strip() == "ok" for rc, out, _ in res), res
    assert [n for n in os.listdir(m.mnt) if n.startswith("t")] == []
    write_file(m.m("after"), b"still serving")
    assert read_file(m.m("after")) == b"still serving"
    assert m.proc.poll() is None
    assert m.stats()["transport"] == "uring"


# ------------------------------------------------------------- going away

def _load(m, seconds=30, write=True):
    """Clients on every CPU reading (and writing) until they fail or time out."""
    write_file(m.s("r"), os.urandom(1 << 20))
    code = r"""
import time, errno
d, secs, write = sys.argv[3], float(sys.argv[4]), sys.argv[5] == "1"
end = time.monotonic() + secs
n = 0
try:
    while time.monotonic() < end:
        p = f"{d}/l{cpu}" if write else f"{d}/r"
        if write:
            with open(p, "wb") as f:
                f.write(os.urandom(256 << 10))
        with open(p, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            f.read()
        n += 1
except OSError as e:
    print("error", e.errno, n)
    sys.exit(0)
print("done", n)
"""
    return [child(cpu, code, m.mnt, seconds, int(write)) for cpu in ONLINE]


def test_lazy_unmount_under_fio(uring, mount_factory):
    m = mount_factory(opts=["transport=uring"])
    conn = connection_id(m.mnt)
    assert conn in fuse_connections()
    write_file(m.s("f"), os.urandom(16 << 20))
    # fio keeps its file open for the whole run (a reopen after the lazy
    # unmount would miss the mount); a checker keeps one open too.
    fio = subprocess.Popen(["fio", "--name=t", f"--filename={m.m('f')}", "--rw=randread", "--bs=4k",
                            "--size=16M", "--ioengine=psync", "--time_based", "--runtime=5", "--invalidate=1",
                            "--output-format=json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checker = child(ONLINE[-1], r"""
import time
want = open(sys.argv[3], "rb").read()
fd = os.open(sys.argv[4], os.O_RDONLY)
end = time.monotonic() + 5
while time.monotonic() < end:
    off = random.randrange(0, len(want) - 65536)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert os.pread(fd, 65536, off) == want[off:off + 65536]
print("ok")
""", m.s("f"), m.m("f"))
    # Both have the file open (fio starts slowly on a loaded machine).
    assert wait_for(lambda: m.stats()["files_open"] >= 2 or fio.poll() is not None, 30), m.stats()
    assert fio.poll() is None, fio.communicate()
    # Busy: a plain unmount is refused and changes nothing.
    r = run("fusermount3", "-u", m.mnt)
    assert r.returncode != 0 and "busy" in r.stderr.lower(), r
    assert m.mounted()
    # Lazy: the name goes now, the connection when fio closes its file.
    r = run("fusermount3", "-uz", m.mnt)
    assert r.returncode == 0, r
    out, err = fio.communicate(timeout=120)
    assert fio.returncode == 0, (out, err)
    job = json.loads(out)["jobs"][0]
    assert job["error"] == 0 and job["read"]["total_ios"] > 100, job["read"]
    assert finish([checker])[0][:2] == (0, "ok\n")
    assert m.wait_exit(15) == 0, m.log()
    assert wait_for(lambda: connection_gone(conn), 10), "the kernel connection outlived the daemon"
    assert "transport: uring" in m.log()


def test_sigterm_under_load(uring, mount_factory):
    m = mount_factory(opts=["transport=uring"])
    procs = _load(m)
    time.sleep(1)
    m.proc.send_signal(signal.SIGTERM)
    status = m.wait_exit(20)
    assert status is not None, "daemon did not exit after SIGTERM\n" + m.log()
    res = finish(procs, timeout=20)  # no client hangs
    assert all(rc == 0 for rc, _, _ in res), res
    assert wait_for(lambda: not m.mounted(), 10)


def test_sigkill_under_load(uring, mount_factory):
    m = mount_factory(opts=["transport=uring"])
    conn = connection_id(m.mnt)
    procs = _load(m, write=False)  # nothing staged: a killed daemon leaves nothing in /dev/shm
    time.sleep(1)
    m.expect_exit = (-9,)  # the kill is the test
    m.proc.kill()
    assert m.wait_exit(10) is not None
    res = finish(procs, timeout=20)  # the connection aborts: clients see errors, none hangs
    assert all(rc == 0 for rc, _, _ in res), res
    assert any(out.startswith("error") for _, out, _ in res), res
    r = run("fusermount3", "-uz", m.mnt)
    assert r.returncode == 0, r
    assert wait_for(lambda: connection_gone(conn), 10), "connection left after SIGKILL and unmount"
    # What the killed daemon kept in /dev/shm (its files' metadata) goes
    # with the next mount of the source and its clean unmount.
    m2 = mount_factory(opts=["transport=dev"], src=m.src)
    m2.discard()
    assert run("fusermount3", "-u", m2.mnt).returncode == 0
    assert m2.wait_exit(15) is not None
    assert shm_files_of(m.src) == []


def test_failed_registration_falls_back_to_dev(uring, mount_factory, monkeypatch):
    monkeypatch.setenv("DEFERFS_TEST_URING_FAIL_REGISTER", "1")  # queue 0 registers a too small buffer
    m = mount_factory(opts=["transport=uring"])
    monkeypatch.delenv("DEFERFS_TEST_URING_FAIL_REGISTER")
    data = os.urandom(1 << 20)
    write_file(m.m("f"), data)
    assert read_file(m.m("f")) == data
    st = m.stats()
    assert st["transport"] == "dev", st
    assert "ring registration failed on queue 0" in st["transport_reason"]
    log = m.log()
    assert log.count("ring registration failed") == 1, log
    # The rings are gone: no ring thread, no io_uring fd left.
    assert wait_for(lambda: ring_threads(m.proc.pid) == [] and io_uring_fds(m.proc.pid) == 0, 10), \
        (ring_threads(m.proc.pid), io_uring_fds(m.proc.pid))
    assert sum(st["transport_queue_requests"]) == 0


# ------------------------------------------------------ ring threads' policy

AUTOGROUP = "/proc/sys/kernel/sched_autogroup_enabled"


@pytest.fixture
def autogroup_off():
    """Autogroup off for the processes the test starts, put back whatever
    happens: the daemon and the busy loops then share one scheduling group,
    as under a service manager that groups nothing, so a busy thread can
    starve a SCHED_IDLE one."""
    if not os.access(AUTOGROUP, os.W_OK):
        pytest.skip(f"needs root and {AUTOGROUP}")
    with open(AUTOGROUP) as f:
        old = f.read().strip()
    with open(AUTOGROUP, "w") as f:
        f.write("0\n")
    try:
        yield
    finally:
        with open(AUTOGROUP, "w") as f:
            f.write(old + "\n")


def ring_tids(pid):
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().startswith("deferfs-uring"):
                    out.append(int(tid))
        except OSError:
            pass
    return out


def test_ring_threads_idle_yet_served_beside_busy_cpus(uring, autogroup_off, mount_factory):
    m = mount_factory(opts=["transport=uring"])
    assert "ring threads SCHED_IDLE" in m.stats()["transport_reason"]
    tids = ring_tids(m.proc.pid)
    assert len(tids) == len(CPUS)
    assert all(os.sched_getscheduler(t) == os.SCHED_IDLE for t in tids)
    data = os.urandom(8 << 20)
    write_file(m.s("f"), data)
    assert read_file(m.m("f")) == data  # every page in the segment now
    # A busy loop on every CPU, in the daemon's scheduling group: an idle
    # ring thread left alone would get a request through every ~40 ms.
    hogs = [child(cpu, "while True: pass") for cpu in ONLINE]
    lat = []
    try:
        time.sleep(0.3)
        fd = os.open(m.m("f"), os.O_RDONLY)
        try:
            end = time.monotonic() + 3
            i = 0
            while time.monotonic() < end:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # so each read asks the daemon
                off = (i * 7919 % 2048) * 4096
                t = time.monotonic()
                assert os.pread(fd, 4096, off) == data[off:off + 4096]
                lat.append(time.monotonic() - t)
                i += 1
        finally:
            os.close(fd)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    lat.sort()
    st = m.stats()
    assert st["transport_sched_raised"] >= 1, st
    assert "waited over" in m.log()
    assert len(lat) >= 300 and lat[len(lat) // 2] < 0.005, (len(lat), lat[len(lat) // 2], lat[-1])
    # Back to idle once the CPUs are free again (kRaisedFor, 2 s).
    assert wait_for(lambda: all(os.sched_getscheduler(t) == os.SCHED_IDLE for t in tids), 10)
