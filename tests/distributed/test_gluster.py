"""deferfs over GlusterFS, two mounts of one shared source (issue 13.3).

A private replica-2 volume (glusterlib.Gluster) is mounted through two gluster
clients, as two machines would mount it; a deferfs mount runs on each client,
both of the same directory of the volume. Checked:
- lazy open: a 64 MiB file opens and serves its first 4 KiB having loaded a
  bounded number of bytes;
- staged writes stay in the mount until `sync`, then the other client sees
  them;
- the guard (spec 5.2): a commit by one mount is an outside change for the
  other: a conflict where it has staged pages (sync refused), a new snapshot
  where it has none;
- 100 rounds of both mounts rewriting the same files at once and syncing at
  once: every file ends wholly one mount's version of one round;
- SIGKILL of one mount mid-sync while the other keeps syncing its own file:
  the live one is unaffected, and the killed one's next mount finds every file
  all old or all new.
"""
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from glusterlib import Gluster, mounted  # noqa: E402

DEFERFS = os.environ.get("DEFERFS") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "../../build/src/deferfs")
PAGE = 4096
# The gluster client's FUSE attribute timeout (1 s by default): a change by
# another client is seen by fstat after it (README: guard granularity).
ATTR_TIMEOUT = 1.2


class Mount:
    def __init__(self, src, mnt, log):
        self.src, self.mnt, self.logpath = src, mnt, log
        os.makedirs(mnt, exist_ok=True)
        self.proc = subprocess.Popen([DEFERFS, src, mnt, "-f"], stderr=open(log, "a"))
        end = time.time() + 20
        while not mounted(mnt):
            assert time.time() < end, "the deferfs mount did not appear"
            assert self.proc.poll() is None, "the daemon exited:\n" + open(log).read()
            time.sleep(0.05)

    def cli(self, *args, check=False):
        r = subprocess.run([DEFERFS, *args, self.mnt], capture_output=True, text=True, timeout=120)
        if check:
            assert r.returncode == 0, r.stderr
        j = json.loads(r.stdout) if "--json" in args and r.stdout.strip() else None
        return r.returncode, j, r.stderr

    def m(self, name):
        return os.path.join(self.mnt, name)

    def log(self):
        return open(self.logpath).read()

    def stop(self, discard=True):
        if self.proc.poll() is None:
            subprocess.run([DEFERFS, "umount", *(["--discard"] if discard else []), self.mnt],
                           capture_output=True, timeout=120)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    g = Gluster(clients=2, workdir=str(tmp_path_factory.mktemp("gluster")))
    yield g
    g.close()


@pytest.fixture
def pair(volume, tmp_path):
    """A fresh shared directory on the volume, a deferfs mount on each client."""
    name = "t-" + os.urandom(4).hex()
    srcs = [os.path.join(c, name) for c in volume.mounts]
    os.mkdir(srcs[0])
    mounts = []
    started = []

    def start(i):
        m = Mount(srcs[i], str(tmp_path / f"d{i}-{len(started)}"), str(tmp_path / f"daemon{i}.log"))
        started.append(m)
        return m

    mounts = [start(0), start(1)]

    def bricks(rel):
        """The file's content on each brick (the replicas themselves: no
        client cache in between)."""
        out = []
        for b in ("b1", "b2"):
            with open(os.path.join(volume.dir, "bricks", b, name, rel), "rb") as f:
                out.append(f.read())
        return out

    start.bricks = bricks
    yield srcs, mounts, start
    for m in started:
        m.stop()
    subprocess.run(["rm", "-rf", srcs[0]])
    for i in (0, 1):
        print(f"--- daemon {i} log\n" + (open(tmp_path / f"daemon{i}.log").read()
                                          if (tmp_path / f"daemon{i}.log").exists() else ""))


def read_direct(path, off, length=PAGE):
    """`length` bytes at `off`, read with O_DIRECT (an aligned buffer)."""
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], off)
    finally:
        os.close(fd)
    return bytes(buf[:n])


def fill(tag, n):
    return bytes([tag]) * (n * PAGE)


def test_lazy_open_staged_writes_and_sync(pair):
    srcs, (a, b), start = pair
    with open(os.path.join(srcs[0], "big"), "wb") as f:
        f.truncate(64 << 20)
        f.seek(0)
        f.write(os.urandom(1 << 20))
    time.sleep(ATTR_TIMEOUT)
    _, before, _ = a.cli("stats", "--json")
    with open(a.m("big"), "rb") as f:
        head = f.read(PAGE)
    assert head == open(os.path.join(srcs[1], "big"), "rb").read(PAGE)
    _, after, _ = a.cli("stats", "--json")
    loaded = after["loaded_bytes"] - before["loaded_bytes"]
    assert loaded <= 1 << 20, f"the first 4 KiB of a 64 MiB file loaded {loaded} bytes"
    # Staged until sync: the other client sees nothing, then everything.
    fd = os.open(a.m("big"), os.O_WRONLY)
    os.pwrite(fd, b"staged" * 100, 5 * PAGE)
    os.close(fd)
    with open(os.path.join(srcs[1], "big"), "rb") as f:
        f.seek(5 * PAGE)
        assert f.read(6) != b"staged"
    a.cli("sync", check=True)
    for replica in start.bricks("big"):
        assert replica[5 * PAGE:5 * PAGE + 600] == b"staged" * 100
    # The other client, past its own page cache (O_DIRECT): it still holds
    # the old pages it read above, and gluster does not invalidate them.
    assert read_direct(os.path.join(srcs[1], "big"), 5 * PAGE)[:600] == b"staged" * 100


def test_guard_sees_the_other_mounts_commit(pair):
    srcs, (a, b), start = pair
    for n in ("s", "c"):
        with open(os.path.join(srcs[0], n), "wb") as f:
            f.write(fill(ord("o"), 8))
    time.sleep(ATTR_TIMEOUT)
    # b opens both (snapshots) and stages a page of "s" only.
    assert open(b.m("s"), "rb").read(PAGE) == fill(ord("o"), 1)
    assert open(b.m("c"), "rb").read(PAGE) == fill(ord("o"), 1)
    fd = os.open(b.m("s"), os.O_WRONLY)
    os.pwrite(fd, fill(ord("b"), 1), 6 * PAGE)
    os.close(fd)
    # a commits both files.
    for n in ("s", "c"):
        fd = os.open(a.m(n), os.O_WRONLY)
        os.pwrite(fd, fill(ord("a"), 8), 0)
        os.close(fd)
    a.cli("sync", check=True)
    # b's sync is refused at once (the check under the lock asks the server).
    rc, r, err = b.cli("sync", "--json")
    assert rc != 0 and r["conflicts"] == ["s"], (rc, r, err)
    assert start.bricks("s") == [fill(ord("a"), 8)] * 2, "no page of b's landed"
    time.sleep(ATTR_TIMEOUT)
    rc, st, _ = b.cli("status", "--json")
    assert st["files"][0]["path"] == "s" and st["files"][0]["state"] == "conflict", st
    # Nothing staged on "c": b shows the new content (a new snapshot).
    assert open(b.m("c"), "rb").read() == fill(ord("a"), 8)
    b.cli("discard", check=True)
    assert open(b.m("s"), "rb").read() == fill(ord("a"), 8)


def test_concurrent_syncs_100_rounds_every_file_whole(pair):
    srcs, (a, b), start = pair
    files, pages = ["f0", "f1", "f2"], 16
    for n in files:
        with open(os.path.join(srcs[0], n), "wb") as f:
            f.write(fill(0, pages))
    time.sleep(ATTR_TIMEOUT)
    versions = {bytes([0])}
    wins = {"a": 0, "b": 0}
    for r in range(100):
        tags = {"a": 1 + (2 * r) % 254, "b": 2 + (2 * r) % 254}
        for who, m in (("a", a), ("b", b)):
            for n in files:
                fd = os.open(m.m(n), os.O_WRONLY)
                os.pwrite(fd, fill(tags[who], pages), 0)
                os.close(fd)
            versions.add(bytes([tags[who]]))
        procs = [subprocess.Popen([DEFERFS, "sync", "--json", m.mnt], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for m in (a, b)]
        outs = [p.communicate(timeout=120) for p in procs]
        for n in files:
            # On both replicas, the same whole version.
            r1, r2 = start.bricks(n)
            assert r1 == r2, f"round {r}: {n} differs between the replicas"
            assert len(r1) == pages * PAGE, (r, n, len(r1))
            assert r1 == r1[:1] * len(r1), f"round {r}: {n} is a mix of versions"
            assert r1[:1] in versions, (r, n, r1[:1])
        for who, (out, err) in zip(("a", "b"), outs):
            rep = json.loads(out)
            wins[who] += rep["files"]
        # The loser's staged pages conflict: drop them for the next round.
        for m in (a, b):
            m.cli("discard")
    print("files committed by each mount over 100 rounds:", wins)
    assert wins["a"] + wins["b"] >= 100 * len(files) / 2, wins


def wait_for_journal(state_dir, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        if any(n.startswith("journal.") for n in os.listdir(state_dir)):
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("when", ["early", "journal", "late"])
def test_sigkill_mid_sync_while_the_other_keeps_syncing(pair, when):
    """Killed before its journal exists, as soon as it exists, or a moment
    later (decided, applying): the other mount keeps syncing meanwhile."""
    srcs, (a, b), start = pair
    files, pages = ["k0", "k1", "k2"], 1500
    old = {}
    for n in files:
        data = os.urandom(pages * PAGE)
        with open(os.path.join(srcs[0], n), "wb") as f:
            f.write(data)
        old[n] = data
    with open(os.path.join(srcs[0], "g"), "wb") as f:
        f.write(fill(0, 4))
    time.sleep(ATTR_TIMEOUT)
    new = {}
    for n in files:
        data = os.urandom(pages * PAGE)
        fd = os.open(a.m(n), os.O_WRONLY)
        os.pwrite(fd, data, 0)
        os.close(fd)
        new[n] = data
    sync_a = subprocess.Popen([DEFERFS, "sync", a.mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if when == "early":
        time.sleep(random.uniform(0.05, 0.3))
    else:
        assert wait_for_journal(os.path.join(srcs[0], ".deferfs")), "the sync never wrote its journal"
        if when == "late":
            time.sleep(random.uniform(0.2, 0.6))
    a.kill()
    sync_a.wait(timeout=60)
    # b syncs its own file again and again: unaffected.
    stop = time.time() + 3
    b_syncs = 0
    while time.time() < stop:
        fd = os.open(b.m("g"), os.O_WRONLY)
        os.pwrite(fd, fill(1 + b_syncs % 250, 4), 0)
        os.close(fd)
        rc, r, err = b.cli("sync", "--json")
        assert rc == 0 and r["files"] == 1, (rc, r, err)
        assert start.bricks("g") == [fill(1 + b_syncs % 250, 4)] * 2
        b_syncs += 1
    assert b.proc.poll() is None, "the live mount died"
    # a's next mount, on the same client: every file whole, on both replicas.
    a2 = start(0)
    state = []
    for n in files:
        r1, r2 = start.bricks(n)
        data = r1 if r1 == r2 else b"replicas differ"
        state.append("old" if data == old[n] else "new" if data == new[n] else "TORN")
    assert state in (["old"] * 3, ["new"] * 3), state
    log = a2.log() + b.log()
    print(f"kill {when}: {state}, b synced {b_syncs} times meanwhile; the journal was "
          f"{'finished' if 'finished an interrupted sync' in log else 'dropped' if 'had not committed' in log else 'absent'}")
    rc, st, _ = a2.cli("status", "--json")
    if state == ["old"] * 3:
        # Not committed: the killed mount's staged pages are back, staged.
        assert st["dirty_pages"] == 3 * pages, st
        rc, r, err = a2.cli("sync", "--json")
        assert rc == 0 and r["files"] == 3, (r, err)
        for n in files:
            assert start.bricks(n) == [new[n]] * 2
    rc, st, _ = b.cli("status", "--json")
    assert st["files"] == [], st
    assert not [n for n in os.listdir(os.path.join(srcs[0], ".deferfs")) if n.startswith("journal")]
