"""Staged data belongs to the file it was staged for (issue 16.1), and each
mount of a source is an instance of its own (issue 13.1).

After a daemon is killed with staged pages, the next mount restores them only
onto the very file they were staged for:
- inode reused: the file is deleted and a new file takes its inode number
  (and its name): the new file is served as it is, the staged pages are kept
  aside in SOURCE/.deferfs/orphans, reported by the log and `status`, and
  removed only by `deferfs orphans --remove`;
- inode not reused: the same, with the file simply gone;
- source root recreated: `rm -rf SRC; mkdir SRC` and new files: kept aside;
- renamed outside while no daemon ran: the staged pages follow the file.
Two mounts of one source on one machine have their own segment names, lock
files and journals; `umount --discard` of both leaves nothing; a mount killed
while another lives is recovered by the next mount, never by the live one.
"""
import glob
import json
import os
import signal
import subprocess
import time

import pytest

DEFERFS = os.environ.get("DEFERFS") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "../../build/src/deferfs")
PAGE = 4096
ROOT_OFF = 2168  # PersistedHeader.source_root (persist.h)


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.realpath(path) for line in f)


class Daemon:
    def __init__(self, src, mnt, log):
        self.src, self.mnt = str(src), str(mnt)
        self.log = open(log, "a")
        self.proc = subprocess.Popen([DEFERFS, self.src, self.mnt, "-f"], stderr=self.log)
        end = time.time() + 10
        while not mounted(self.mnt):
            assert time.time() < end, "the mount did not appear"
            assert self.proc.poll() is None, "the daemon exited"
            time.sleep(0.02)

    def cli(self, *args, path=None):
        r = subprocess.run([DEFERFS, *args, path or self.mnt], capture_output=True, text=True, timeout=60)
        return r.returncode, (json.loads(r.stdout) if "--json" in args and r.stdout else None), r.stderr

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)


def shm_of(src):
    """The named segments' metadata files in /dev/shm that belong to `src`."""
    out = []
    for p in glob.glob("/dev/shm/deferfs.*.meta"):
        try:
            with open(p, "rb") as f:
                f.seek(ROOT_OFF)
                root = f.read(1504).split(b"\0")[0].decode()
        except OSError:
            continue
        if root == str(src):
            out.append(p)
    return out


@pytest.fixture
def env(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    mnts = []
    daemons = []
    log = tmp_path / "daemon.log"

    def mnt(i=0):
        while len(mnts) <= i:
            m = tmp_path / f"mnt{len(mnts)}"
            m.mkdir()
            mnts.append(m)
        return mnts[i]

    def start(i=0):
        d = Daemon(src, mnt(i), log)
        daemons.append(d)
        return d

    yield src, start, log
    live = [d for d in daemons if d.proc.poll() is None]
    for d in live:
        subprocess.run([DEFERFS, "umount", "--discard", d.mnt], capture_output=True, timeout=60)
    for d in daemons:
        d.stop(signal.SIGKILL)
    for m in mnts:
        if mounted(m):
            subprocess.run(["fusermount3", "-uz", str(m)], capture_output=True)
    # Whatever a killed daemon left for a source that a test then removed.
    for p in shm_of(src):
        os.unlink(p)
        if os.path.exists(p[:-5] + ".seg"):
            os.unlink(p[:-5] + ".seg")
    print(open(log).read() if log.exists() else "")


def stage_and_kill(d, name, pages, fill=b"S"):
    fd = os.open(os.path.join(d.mnt, name), os.O_WRONLY)
    for p in pages:
        os.pwrite(fd, fill * PAGE, p * PAGE)
    os.close(fd)
    rc, st, err = d.cli("status", "--json")
    assert rc == 0 and st["dirty_pages"] == len(pages), (st, err)
    d.stop(signal.SIGKILL)


def check_orphan(d, src, name, pages, fill=b"S"):
    """One orphan of `name` with exactly the staged bytes, reported by status,
    removed only by `deferfs orphans --remove`."""
    rc, st, err = d.cli("status", "--json")
    assert rc == 0, err
    assert len(st["orphans"]) == 1, st
    o = st["orphans"][0]
    odir = os.path.join(src, ".deferfs", "orphans", o)
    manifest = open(os.path.join(odir, "manifest")).read()
    assert f"path: {name}\n" in manifest, manifest
    assert f"pages: {len(pages)} " in manifest, manifest
    data = open(os.path.join(odir, "pages"), "rb").read()
    for p in pages:
        assert data[p * PAGE:(p + 1) * PAGE] == fill * PAGE, f"page {p} of the orphan"
    text = out_text(d, "status")
    assert "orphaned staged file" in text and o in text, text
    # Not removed by anything but the explicit command: not by a sync, not
    # by another mount.
    assert d.cli("sync")[0] == 0
    assert os.path.isdir(odir)
    r = subprocess.run([DEFERFS, "orphans", "--json", d.mnt], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and json.loads(r.stdout)["orphans"] == [o], (r.stdout, r.stderr)
    r = subprocess.run([DEFERFS, "orphans", "--remove", o, d.mnt], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(odir)
    assert d.cli("status", "--json")[1]["orphans"] == []


def out_text(d, *args):
    return subprocess.run([DEFERFS, *args, d.mnt], capture_output=True, text=True, timeout=60).stdout


def test_inode_reused_by_a_new_file(env):
    src, start, log = env
    (src / "a").write_bytes(b"o" * 8 * PAGE)
    d = start()
    stage_and_kill(d, "a", [1, 2, 5])
    ino = os.stat(src / "a").st_ino
    os.unlink(src / "a")
    # A new file takes the inode number (ext4 hands a freed one out again).
    reused = None
    for i in range(3000):
        p = src / f"n{i}"
        p.write_bytes(b"")
        if os.stat(p).st_ino == ino:
            reused = p
            break
    assert reused is not None, "no new file got the freed inode number back"
    for p in src.glob("n*"):
        if p != reused:
            p.unlink()
    os.rename(reused, src / "a")
    (src / "a").write_bytes(b"N" * 3 * PAGE)
    assert os.stat(src / "a").st_ino == ino

    d2 = start()
    assert open(os.path.join(d2.mnt, "a"), "rb").read() == b"N" * 3 * PAGE, "the new file is served as it is"
    assert "kept aside" in open(log).read()
    rc, st, _ = d2.cli("status", "--json")
    assert st["files"] == [], "nothing is staged on the new file"
    check_orphan(d2, src, "a", [1, 2, 5])
    assert (src / "a").read_bytes() == b"N" * 3 * PAGE


def test_file_gone_inode_not_reused(env):
    src, start, log = env
    (src / "a").write_bytes(b"o" * 8 * PAGE)
    (src / "keep").write_bytes(b"k" * PAGE)
    d = start()
    stage_and_kill(d, "a", [0, 7])
    os.unlink(src / "a")
    d2 = start()
    assert "kept aside" in open(log).read()
    assert sorted(os.listdir(d2.mnt)) == ["keep"]
    check_orphan(d2, src, "a", [0, 7])


def test_source_root_recreated(env):
    src, start, log = env
    (src / "a").write_bytes(b"o" * 8 * PAGE)
    (src / "b").write_bytes(b"o" * 8 * PAGE)
    d = start()
    stage_and_kill(d, "a", [1, 2, 3])
    subprocess.run(["rm", "-rf", str(src)], check=True)
    src.mkdir()
    (src / "a").write_bytes(b"A" * 2 * PAGE)
    (src / "b").write_bytes(b"B" * 2 * PAGE)
    d2 = start()
    assert open(os.path.join(d2.mnt, "a"), "rb").read() == b"A" * 2 * PAGE
    assert open(os.path.join(d2.mnt, "b"), "rb").read() == b"B" * 2 * PAGE
    assert "source directory was made again" in open(log).read()
    rc, st, _ = d2.cli("status", "--json")
    assert st["files"] == [], st
    check_orphan(d2, src, "a", [1, 2, 3])


def test_renamed_outside_while_no_daemon_ran(env):
    src, start, log = env
    original = os.urandom(8 * PAGE)
    (src / "a").write_bytes(original)
    d = start()
    stage_and_kill(d, "a", [2, 4])
    (src / "sub").mkdir()
    os.rename(src / "a", src / "sub" / "c")
    d2 = start()
    assert "renamed to sub/c" in open(log).read()
    rc, st, _ = d2.cli("status", "--json")
    assert [f["path"] for f in st["files"]] == ["sub/c"] and st["dirty_pages"] == 2, st
    assert st["orphans"] == []
    want = bytearray(original)
    for p in (2, 4):
        want[p * PAGE:(p + 1) * PAGE] = b"S" * PAGE
    assert open(os.path.join(d2.mnt, "sub", "c"), "rb").read() == bytes(want)
    rc, r, err = d2.cli("sync", "--json")
    assert rc == 0 and r["pages_written"] == 2, (r, err)
    assert (src / "sub" / "c").read_bytes() == bytes(want)


def test_two_mounts_of_one_source_are_separate_instances(env):
    src, start, log = env
    (src / "f").write_bytes(b"o" * 16 * PAGE)
    (src / "g").write_bytes(b"o" * 16 * PAGE)
    a, b = start(0), start(1)
    for d, fill in ((a, b"a"), (b, b"b")):
        for name in ("f", "g"):
            fd = os.open(os.path.join(d.mnt, name), os.O_WRONLY)
            os.pwrite(fd, fill * PAGE, (3 if fill == b"a" else 9) * PAGE)
            os.close(fd)
    metas = shm_of(src)
    assert len(metas) == 4, metas  # two files on each mount, no name shared
    locks = [n for n in os.listdir(src / ".deferfs") if n.startswith("instance.")]
    assert len(locks) == 2, locks
    # Each sees its own staged pages only.
    for d in (a, b):
        rc, st, _ = d.cli("status", "--json")
        assert st["dirty_pages"] == 2, st
    for d in (a, b):
        r = subprocess.run([DEFERFS, "umount", "--discard", d.mnt], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        d.proc.wait(timeout=30)
    assert shm_of(src) == [], "umount --discard of both leaves nothing in /dev/shm"
    assert sorted(os.listdir(src / ".deferfs")) == [], os.listdir(src / ".deferfs")
    assert (src / "f").read_bytes() == b"o" * 16 * PAGE


def test_killed_mount_is_recovered_by_the_next_not_by_the_live_one(env):
    src, start, log = env
    (src / "f").write_bytes(b"o" * 16 * PAGE)
    a, b = start(0), start(1)
    fd = os.open(os.path.join(b.mnt, "f"), os.O_WRONLY)
    os.pwrite(fd, b"b" * PAGE, 9 * PAGE)
    os.close(fd)
    stage_and_kill(a, "f", [3, 4])
    # The live mount goes on: its staged page, its sync.
    rc, st, _ = b.cli("status", "--json")
    assert st["dirty_pages"] == 1, st
    # A's next mount (a third mount of the source) restores A's pages, not B's.
    c = start(2)
    rc, st, _ = c.cli("status", "--json")
    assert st["dirty_pages"] == 2 and st["files"][0]["path"] == "f", st
    assert "restored 2 staged pages" in open(log).read()
    rc, r, err = b.cli("sync", "--json")
    assert rc == 0 and r["pages_written"] == 1, (r, err)
    data = (src / "f").read_bytes()
    assert data[9 * PAGE:10 * PAGE] == b"b" * PAGE and data[3 * PAGE:4 * PAGE] == b"o" * PAGE
    # C now sees B's commit as an outside change: its staged file conflicts.
    rc, st, _ = c.cli("status", "--json")
    assert st["files"][0]["state"] == "conflict", st
    rc, r, err = c.cli("sync", "--force", "--json")
    assert rc == 0, err
    data = (src / "f").read_bytes()
    assert data[3 * PAGE:5 * PAGE] == b"S" * 2 * PAGE and data[9 * PAGE:10 * PAGE] == b"b" * PAGE


def test_spill_file_without_metadata_is_kept_aside(env):
    """A spill file of an ended daemon whose metadata in /dev/shm is gone
    (a reboot) is kept aside with its pages, not deleted."""
    src, start, log = env
    (src / "f").write_bytes(b"o" * 8 * PAGE)
    os.mkdir(src / ".deferfs", 0o700)
    spill = src / ".deferfs" / "spill.0123456789abcdef.66.77"
    with open(spill, "wb") as f:
        f.seek(PAGE)
        f.write(b"S" * PAGE)
        f.seek(3 * PAGE)
        f.write(b"S" * PAGE)
    d = start()
    assert not spill.exists()
    assert "metadata is lost; kept aside" in open(log).read()
    rc, st, _ = d.cli("status", "--json")
    assert len(st["orphans"]) == 1, st
    odir = src / ".deferfs" / "orphans" / st["orphans"][0]
    data = (odir / "pages").read_bytes()
    assert data[PAGE:2 * PAGE] == b"S" * PAGE and data[3 * PAGE:4 * PAGE] == b"S" * PAGE
    assert "spill.0123456789abcdef.66.77" in (odir / "manifest").read_text()
    r = subprocess.run([DEFERFS, "orphans", "--remove-all", d.mnt], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and not odir.exists(), r.stderr
