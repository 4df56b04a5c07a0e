"""Changes made to a source file outside the mount, snapshot=guard (spec 5.2,
issue 4 item 3): stale data is never served silently.

(a) a file with nothing staged is re-snapshotted: the next open shows the new
    content, whatever the kernel cached before (same size, grown, shrunk,
    mtime put back);
(b) a file with staged pages is in conflict: status says "conflict", a page
    that needs the changed source is EIO (with a log line naming the file),
    pages already in the segment (read or written) are still served, sync
    refuses it (exit 1, named) and the source keeps the outside change,
    sync --force writes the staged pages over the new source, discard drops
    them and the mount shows the outside content;
(c) an outside change that lands while a sync of the file runs is never
    adopted silently: either the sync refuses the file, or afterwards the
    mount shows the source as it is now (outside change included).

Every test runs with -o snapshot=guard and, when the test's directory is on a
filesystem without FICLONE (ext4, tmpfs: where auto means guard), with the
default options too.
"""

import errno
import fcntl
import mmap
import os
import random
import subprocess
import time

import pytest

import mountlib
from mountlib import pread, pwrite, read_file, write_file

PAGE = 4096
MiB = 1 << 20
FICLONE = 0x40049409


def reflink_capable(d):
    a, b = d / ".ficlone-a", d / ".ficlone-b"
    write_file(a, b"x" * PAGE)
    try:
        with open(a, "rb") as fa, open(b, "wb") as fb:
            fcntl.ioctl(fb.fileno(), FICLONE, fa.fileno())
        return True
    except OSError:
        return False
    finally:
        for p in (a, b):
            try:
                os.unlink(p)
            except OSError:
                pass


@pytest.fixture(params=["snapshot=guard", "default"])
def gmount(request, tmp_path, mount_factory):
    """gmount(files={name: bytes}) -> Mount with those files in its source, in guard mode."""
    (tmp_path / "src").mkdir(exist_ok=True)
    if request.param == "default" and reflink_capable(tmp_path):
        pytest.skip("the test directory's filesystem supports FICLONE: auto would mean reflink, not guard")
    opts = [] if request.param == "default" else [request.param]

    def make(files):
        for name, data in files.items():
            write_file(tmp_path / "src" / name, data)
        return mount_factory(opts=opts)
    return make


def rnd_bytes(n, seed):
    return random.Random(seed).randbytes(n)


def read_fresh(path):
    """A whole-file read on a fresh open, and the size fstat reports on that fd."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        chunks = []
        off = 0
        while True:
            b = os.pread(fd, 1 << 20, off)
            if not b:
                break
            chunks.append(b)
            off += len(b)
        return b"".join(chunks), size
    finally:
        os.close(fd)


def state_of(m, rel):
    f = m.staged(rel)
    return None if f is None else f["state"]


def outside_write(path, data, off):
    fd = os.open(str(path), os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)


# ------------------------------------------------------- (a) clean files

CHANGES = ["same_size", "same_size_mtime_kept", "grown", "shrunk", "grown_partial_page"]


def change_outside(path, old, how, seed):
    """Changes the source file outside the mount; returns its new content."""
    r = random.Random(seed)
    new = bytearray(old)
    st = os.stat(path)
    if how in ("same_size", "same_size_mtime_kept"):
        for p in (0, 5, len(old) // PAGE - 1):
            patch = r.randbytes(PAGE)
            new[p * PAGE:(p + 1) * PAGE] = patch
            outside_write(path, patch, p * PAGE)
        if how == "same_size_mtime_kept":
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # only the ctime tells
    elif how == "grown":
        extra = r.randbytes(9 * PAGE)
        with open(path, "ab") as f:
            f.write(extra)
        new += extra
        patch = r.randbytes(100)
        new[3 * PAGE + 7:3 * PAGE + 107] = patch
        outside_write(path, patch, 3 * PAGE + 7)
    elif how == "grown_partial_page":
        extra = r.randbytes(123)
        with open(path, "ab") as f:
            f.write(extra)
        new += extra
    elif how == "shrunk":
        keep = len(old) - 5 * PAGE - 321
        os.truncate(path, keep)
        del new[keep:]
        patch = r.randbytes(PAGE)
        new[PAGE:2 * PAGE] = patch
        outside_write(path, patch, PAGE)
    return bytes(new)


@pytest.mark.parametrize("how", CHANGES)
@pytest.mark.parametrize("hold", ["closed", "other_handle_open"])
def test_clean_file_changed_outside_is_resnapshotted(gmount, how, hold):
    old = rnd_bytes(64 * PAGE + 100, 1)
    m = gmount({"f.bin": old})
    # Through the mount: read everything (the daemon's segment and the
    # kernel's page cache both hold the old content now).
    assert read_fresh(m.m("f.bin")) == (old, len(old))
    assert read_file(m.m("f.bin")) == old
    held = os.open(m.m("f.bin"), os.O_RDONLY) if hold == "other_handle_open" else None
    try:
        if held is not None:
            assert os.pread(held, len(old), 0) == old
        new = change_outside(m.s("f.bin"), old, how, 2)
        # The next open shows the new content: no stale byte, the right size.
        got, size = read_fresh(m.m("f.bin"))
        assert (got, size) == (new, len(new)), (
            f"after an outside change ({how}) and a new open: fstat size {size} (the source has {len(new)}, "
            f"the old size was {len(old)}); read: " + diff_pages(new, got))
        assert m.staged("f.bin") is None, m.status()
        # And again (the kernel may cache the new content now).
        assert read_fresh(m.m("f.bin")) == (new, len(new))
        # mmap of the new content.
        with open(m.m("f.bin"), "rb") as f:
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
                assert mm[:] == new
    finally:
        if held is not None:
            os.close(held)
    # Nothing was staged: nothing to sync, the source keeps the outside content.
    r = m.sync()
    assert r.json["files"] == 0 and r.json["pages_written"] == 0, r.json
    assert read_file(m.s("f.bin")) == new


def test_clean_file_changed_twice(gmount):
    """Re-snapshotted, changed again: the second change shows too."""
    old = rnd_bytes(32 * PAGE, 3)
    m = gmount({"f.bin": old})
    assert read_file(m.m("f.bin")) == old
    mid = change_outside(m.s("f.bin"), old, "same_size", 4)
    assert read_file(m.m("f.bin")) == mid
    new = change_outside(m.s("f.bin"), mid, "same_size", 5)
    assert read_file(m.m("f.bin")) == new
    # Then a write through the mount stages on top of the current snapshot.
    pwrite(m.m("f.bin"), b"Z" * 10, 2 * PAGE)
    want = bytearray(new)
    want[2 * PAGE:2 * PAGE + 10] = b"Z" * 10
    assert read_file(m.m("f.bin")) == bytes(want)
    m.sync()
    assert read_file(m.s("f.bin")) == bytes(want)


def diff_pages(want, got):
    n = min(len(want), len(got))
    bad = [p // PAGE for p in range(0, n, PAGE) if want[p:p + PAGE] != got[p:p + PAGE]]
    return f"lengths {len(want)} vs {len(got)}, differing pages {bad[:20]}"


# ---------------------------------------------------- (b) staged files

FILE_PAGES = 4096  # 16 MiB: a page far from the ones read is never read ahead
READ_PAGE = 1      # read through the mount before the outside change
WRITE_PAGE = 3     # staged through the mount
OUTSIDE_PAGES = (READ_PAGE, 10, 2000)  # changed outside (includes the page read)
FAR_PAGE = 3000    # never read through the mount


def page(data, p):
    return data[p * PAGE:(p + 1) * PAGE]


@pytest.fixture
def conflict(gmount):
    """A file with page READ_PAGE read, page WRITE_PAGE staged, then pages
    OUTSIDE_PAGES changed outside. Returns (m, old, staged, outside_content)."""
    old = rnd_bytes(FILE_PAGES * PAGE, 10)
    m = gmount({"f.bin": old, "other.bin": rnd_bytes(8 * PAGE, 11)})
    assert pread(m.m("f.bin"), PAGE, READ_PAGE * PAGE) == page(old, READ_PAGE)
    staged = rnd_bytes(PAGE, 12)
    pwrite(m.m("f.bin"), staged, WRITE_PAGE * PAGE)
    assert m.staged("f.bin")["state"] == "staged"
    # Another file with staged data: the conflict must not affect it (8.3).
    pwrite(m.m("other.bin"), b"other", 0)
    outside = bytearray(old)
    for i, p in enumerate(OUTSIDE_PAGES):
        b = rnd_bytes(PAGE, 100 + i)
        outside[p * PAGE:(p + 1) * PAGE] = b
        outside_write(m.s("f.bin"), b, p * PAGE)
    return m, old, staged, bytes(outside)


def expect_eio(path, off, n=PAGE):
    fd = os.open(str(path), os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            got = os.pread(fd, n, off)
            # Reaching here: data was served. Say which.
            raise AssertionError(f"read at {off} returned {len(got)} bytes instead of failing with EIO")
        assert ei.value.errno == errno.EIO, ei.value
    finally:
        os.close(fd)


def test_conflict_status_eio_and_segment_pages(conflict):
    m, old, staged, outside = conflict
    st = m.status()
    assert state_of(m, "f.bin") == "conflict", st
    f = m.staged("f.bin")
    assert f["dirty_pages"] == 1 and f["dirty_bytes"] == PAGE, f
    assert state_of(m, "other.bin") == "staged", st
    # A page never read needs the changed source: EIO, logged with the name.
    expect_eio(m.m("f.bin"), FAR_PAGE * PAGE)
    expect_eio(m.m("f.bin"), 2000 * PAGE)  # changed outside, never read
    assert "f.bin" in m.log(), m.log()
    # Pages already in the segment: the read one (snapshot content, not the
    # outside change) and the staged one.
    assert pread(m.m("f.bin"), PAGE, READ_PAGE * PAGE) == page(old, READ_PAGE)
    assert pread(m.m("f.bin"), PAGE, WRITE_PAGE * PAGE) == staged
    # Still a conflict, nothing lost; the other file is unaffected.
    assert state_of(m, "f.bin") == "conflict"
    assert m.staged("f.bin")["dirty_pages"] == 1
    assert pread(m.m("other.bin"), 5, 0) == b"other"


def test_conflict_eio_before_status(conflict):
    """The loader finds the change by itself (no status, no sync first)."""
    m, old, staged, outside = conflict
    expect_eio(m.m("f.bin"), FAR_PAGE * PAGE)
    assert pread(m.m("f.bin"), PAGE, WRITE_PAGE * PAGE) == staged
    assert state_of(m, "f.bin") == "conflict", m.status()


def test_conflict_sync_refuses_source_keeps_outside_change(conflict):
    m, old, staged, outside = conflict
    r = m.cli("sync", m.mnt)
    assert r.rc == 1, r
    assert "f.bin" in r.err + r.out, r
    r = m.sync(expect_rc=1)
    assert r.json["conflicts"] == ["f.bin"], r.json
    # The source has the outside change and nothing of ours.
    assert read_file(m.s("f.bin")) == outside
    # Every staged page is kept. other.bin (no conflict) is committed or still
    # staged, never lost.
    f = m.staged("f.bin")
    assert f is not None and f["state"] == "conflict" and f["dirty_pages"] == 1, m.status()
    assert pread(m.s("other.bin"), 5, 0) == b"other" or state_of(m, "other.bin") == "staged", m.status()
    assert pread(m.m("other.bin"), 5, 0) == b"other"
    assert pread(m.m("f.bin"), PAGE, WRITE_PAGE * PAGE) == staged
    # Syncing just the file: refused too.
    r = m.sync(m.m("f.bin"), expect_rc=1)
    assert r.json["conflicts"] == ["f.bin"], r.json
    assert read_file(m.s("f.bin")) == outside


def test_conflict_sync_force_writes_staged_over_outside(conflict):
    m, old, staged, outside = conflict
    m.sync(expect_rc=1)
    r = m.sync(m.m("f.bin"), force=True)
    assert r.json["conflicts"] == [] and r.json["failed"] == [], r.json
    want = bytearray(outside)
    want[WRITE_PAGE * PAGE:(WRITE_PAGE + 1) * PAGE] = staged
    want = bytes(want)
    got = read_file(m.s("f.bin"))
    assert got == want, "source after sync --force: " + diff_pages(want, got)
    assert m.staged("f.bin") is None, m.status()
    # The mount now shows the committed file, every page (also the far one).
    got, size = read_fresh(m.m("f.bin"))
    assert size == len(want) and got == want, "mount after sync --force: " + diff_pages(want, got)


def test_conflict_discard_shows_outside_content(conflict):
    m, old, staged, outside = conflict
    assert state_of(m, "f.bin") == "conflict"
    r = m.discard(m.m("f.bin"))
    assert r.json["files"] == 1, r.json
    assert m.staged("f.bin") is None, m.status()
    got, size = read_fresh(m.m("f.bin"))
    assert size == len(outside) and got == outside, "mount after discard: " + diff_pages(outside, got)
    assert read_file(m.s("f.bin")) == outside
    # other.bin keeps its staged data.
    assert state_of(m, "other.bin") == "staged"


@pytest.mark.parametrize("how", ["grown", "shrunk"])
def test_conflict_size_change_outside(gmount, how):
    """Outside size change of a staged file: conflict; discard shows the new file."""
    old = rnd_bytes(FILE_PAGES * PAGE, 20)
    m = gmount({"f.bin": old})
    assert pread(m.m("f.bin"), PAGE, 0) == page(old, 0)
    staged = rnd_bytes(PAGE, 21)
    pwrite(m.m("f.bin"), staged, 2 * PAGE)
    new = bytearray(old)
    if how == "grown":
        extra = rnd_bytes(3 * PAGE + 5, 22)
        with open(m.s("f.bin"), "ab") as f:
            f.write(extra)
        new += extra
    else:
        os.truncate(m.s("f.bin"), 100 * PAGE)
        del new[100 * PAGE:]
    new = bytes(new)
    assert state_of(m, "f.bin") == "conflict", m.status()
    expect_eio(m.m("f.bin"), 50 * PAGE)
    assert pread(m.m("f.bin"), PAGE, 2 * PAGE) == staged
    r = m.cli("sync", m.mnt)
    assert r.rc == 1 and "f.bin" in r.err + r.out, r
    assert read_file(m.s("f.bin")) == new
    m.discard()
    got, size = read_fresh(m.m("f.bin"))
    assert size == len(new) and got == new, "mount after discard: " + diff_pages(new, got)


def test_conflict_survives_restaging(conflict):
    """Writing more through the mount does not clear a conflict."""
    m, old, staged, outside = conflict
    assert state_of(m, "f.bin") == "conflict"
    # A page in the segment can be written; a whole page too.
    pwrite(m.m("f.bin"), b"more", WRITE_PAGE * PAGE + 100)
    pwrite(m.m("f.bin"), rnd_bytes(PAGE, 40), 7 * PAGE)
    # A partial write of a page never loaded needs the changed source: EIO.
    with pytest.raises(OSError) as ei:
        pwrite(m.m("f.bin"), b"more", FAR_PAGE * PAGE + 100)
    assert ei.value.errno == errno.EIO, ei.value
    assert state_of(m, "f.bin") == "conflict", m.status()
    assert m.staged("f.bin")["dirty_pages"] == 2, m.status()
    r = m.sync(expect_rc=1)
    assert r.json["conflicts"] == ["f.bin"], r.json
    assert read_file(m.s("f.bin")) == outside


# ----------------------------------------- (c) outside change during a sync

SYNC_FILE_PAGES = 8192       # 32 MiB
SYNC_STAGED = 3000           # pages staged per trial
MARK_PAGE = 7                # never staged, loaded into the segment before the sync
TRIALS = 12


def test_outside_change_during_sync_not_adopted(gmount, tmp_path):
    rnd = random.Random(30)
    old = rnd.randbytes(SYNC_FILE_PAGES * PAGE)
    m = gmount({"f.bin": old})
    cur = bytearray(old)  # the source's content as we know it
    staged_pages = [p for p in range(SYNC_FILE_PAGES) if p != MARK_PAGE]

    # Calibrate: how long does a sync of SYNC_STAGED pages take?
    def stage():
        pages = rnd.sample(staged_pages, SYNC_STAGED)
        patch = {p: rnd.randbytes(PAGE) for p in pages}
        fd = os.open(m.m("f.bin"), os.O_WRONLY)
        try:
            for p, b in patch.items():
                os.pwrite(fd, b, p * PAGE)
        finally:
            os.close(fd)
        return patch

    patch = stage()
    t0 = time.perf_counter()
    m.sync()
    full = time.perf_counter() - t0
    for p, b in patch.items():
        cur[p * PAGE:(p + 1) * PAGE] = b
    assert read_file(m.s("f.bin")) == bytes(cur)

    outcomes = {}
    for trial in range(TRIALS):
        # The mark page is in the segment (clean) before the sync.
        assert pread(m.m("f.bin"), PAGE, MARK_PAGE * PAGE) == page(cur, MARK_PAGE)
        patch = stage()
        mark = rnd.randbytes(PAGE)
        delay = rnd.uniform(0, full * 1.2)
        proc = subprocess.Popen([mountlib.DEFERFS, "sync", str(m.mnt)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        outside_write(m.s("f.bin"), mark, MARK_PAGE * PAGE)
        out, err = proc.communicate(timeout=120)
        rc = proc.returncode
        src = read_file(m.s("f.bin"))
        # The outside write is never undone by the sync.
        assert page(src, MARK_PAGE) == mark, f"trial {trial}: the sync overwrote the outside change"
        if rc == 0:
            # Committed: our pages are on the source, and the mount must now
            # show the source as it is (the outside change included).
            for p, b in patch.items():
                cur[p * PAGE:(p + 1) * PAGE] = b
            cur[MARK_PAGE * PAGE:(MARK_PAGE + 1) * PAGE] = mark
            assert src == bytes(cur), f"trial {trial}: source after a successful sync: " + diff_pages(cur, src)
            got = pread(m.m("f.bin"), PAGE, MARK_PAGE * PAGE)
            assert got == mark, (f"trial {trial} (outside write {delay * 1000:.1f} ms into a "
                                 f"{full * 1000:.0f} ms sync): sync exit 0, the mount serves the old bytes of "
                                 f"page {MARK_PAGE}: the outside change was adopted silently\n{m.log()}")
            got, _ = read_fresh(m.m("f.bin"))
            assert got == bytes(cur), f"trial {trial}: mount after the sync: " + diff_pages(cur, got)
            outcomes["committed, outside change shown"] = outcomes.get("committed, outside change shown", 0) + 1
        else:
            assert rc == 1, (rc, out, err)
            assert "f.bin" in out + err, (out, err)
            # Refused: the source is all old (plus the outside change).
            want = bytearray(cur)
            want[MARK_PAGE * PAGE:(MARK_PAGE + 1) * PAGE] = mark
            if src != bytes(want):
                ours = sum(page(src, p) == b for p, b in patch.items())
                pytest.fail(f"trial {trial} (outside write {delay * 1000:.1f} ms into a {full * 1000:.0f} ms "
                            f"sync): sync exit {rc} ({err.strip()!r}) but the source is not the old content: "
                            f"{ours} of the {len(patch)} staged pages are on the source; "
                            + diff_pages(want, src) + f"\n{m.log()}")
            assert state_of(m, "f.bin") == "conflict", m.status()
            assert m.staged("f.bin")["dirty_pages"] == len(patch), m.status()
            # Force it: staged pages over the new source.
            m.sync(force=True)
            for p, b in patch.items():
                want[p * PAGE:(p + 1) * PAGE] = b
            cur = want
            assert read_file(m.s("f.bin")) == bytes(cur)
            outcomes["refused (conflict), then forced"] = outcomes.get("refused (conflict), then forced", 0) + 1
        assert m.staged("f.bin") is None, m.status()
        got, _ = read_fresh(m.m("f.bin"))
        assert got == bytes(cur), f"trial {trial}: mount at the end of the trial: " + diff_pages(cur, got)
    print("outcomes:", outcomes)
