"""Staged writes (spec 6.1-6.3, 6.6): writes are visible through the mount at
once, the source changes only on `deferfs sync`, only changed pages are dirty
and written, truncate is staged, discard drops, staged data follows renames
and dies with the last handle of an unlinked file."""

import os
import random
import subprocess

import pytest

from conftest import cached_size, drop_cache, pread, pwrite, read_file, src_names, write_file

MiB = 1 << 20
PAGE = 4096
SIZE = 64 * MiB


@pytest.fixture
def f64(mount_factory, tmp_path):
    """A mount whose source has f.bin: 64 MiB of random bytes."""
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(99).randbytes(SIZE)
    write_file(src / "f.bin", data)
    return mount_factory(), data


def only_entry(m, rel="f.bin"):
    st = m.status()
    assert [f["path"] for f in st["files"]] == [rel], st
    return st["files"][0], st


def assert_nothing_staged(m):
    st = m.status()
    assert st["files"] == [], st
    assert st["dirty_pages"] == 0 and st["dirty_bytes"] == 0, st
    s = m.stats()
    assert s["dirty_pages"] == 0 and s["dirty_bytes"] == 0, s


def test_write_staged_until_sync(f64):
    m, orig = f64
    pages = [0, 5000, SIZE // PAGE - 1]
    new = {p: os.urandom(PAGE) for p in pages}
    fd = os.open(m.m("f.bin"), os.O_WRONLY)
    try:
        for p in pages:
            assert os.pwrite(fd, new[p], p * PAGE) == PAGE
    finally:
        os.close(fd)
    expected = bytearray(orig)
    for p in pages:
        expected[p * PAGE:(p + 1) * PAGE] = new[p]
    # Visible through the mount at once, to this process and to others.
    for p in pages:
        assert pread(m.m("f.bin"), PAGE, p * PAGE) == new[p]
        out = subprocess.run(["dd", f"if={m.m('f.bin')}", "bs=4k", f"skip={p}", "count=1", "status=none"],
                             capture_output=True, check=True, timeout=30).stdout
        assert out == new[p]
    # The source is untouched.
    assert read_file(m.s("f.bin")) == orig
    e, st = only_entry(m)
    assert e == {"path": "f.bin", "size": SIZE, "dirty_pages": 3, "dirty_bytes": 3 * PAGE,
                 "state": "staged"}, e
    assert st["dirty_pages"] == 3 and st["dirty_bytes"] == 3 * PAGE
    s = m.stats()
    assert s["dirty_pages"] == 3 and s["dirty_bytes"] == 3 * PAGE, s
    assert s["synced_bytes"] == 0
    r = m.sync()
    assert r.json["files"] == 1, r.json
    assert r.json["pages_written"] == 3, r.json
    assert r.json["bytes_written"] == 3 * PAGE, r.json
    assert r.json["conflicts"] == [] and r.json["failed"] == [], r.json
    assert read_file(m.s("f.bin")) == bytes(expected)
    assert read_file(m.m("f.bin")) == bytes(expected)
    assert_nothing_staged(m)
    assert m.stats()["synced_bytes"] == 3 * PAGE
    # A second sync has nothing to do.
    r = m.sync()
    assert r.json["files"] == 0 and r.json["pages_written"] == 0 and r.json["bytes_written"] == 0, r.json


def test_rewrite_with_same_bytes_is_not_dirty(f64):
    m, orig = f64
    before = m.stats()["skipped_pages"]
    # A page read through the mount first (resident), then rewritten as is.
    p = 100
    cur = pread(m.m("f.bin"), PAGE, p * PAGE)
    assert cur == orig[p * PAGE:(p + 1) * PAGE]
    pwrite(m.m("f.bin"), cur, p * PAGE)
    assert_nothing_staged(m)
    mid = m.stats()["skipped_pages"]
    assert mid == before + 1, (before, mid)
    # A page never read through the mount, written with the source's bytes.
    q = 9000
    pwrite(m.m("f.bin"), orig[q * PAGE:(q + 1) * PAGE], q * PAGE)
    assert_nothing_staged(m)
    assert m.stats()["skipped_pages"] == mid + 1
    # A partial write of the same bytes inside a page.
    pwrite(m.m("f.bin"), orig[q * PAGE + 100:q * PAGE + 300], q * PAGE + 100)
    assert_nothing_staged(m)
    assert m.stats()["skipped_pages"] == mid + 2
    r = m.sync()
    assert r.json["pages_written"] == 0 and r.json["bytes_written"] == 0, r.json
    assert read_file(m.s("f.bin")) == orig


def test_page_changed_then_changed_back(f64):
    m, orig = f64
    for p in [3, 7777]:
        old = orig[p * PAGE:(p + 1) * PAGE]
        pwrite(m.m("f.bin"), os.urandom(PAGE), p * PAGE)
        assert only_entry(m)[0]["dirty_pages"] == 1
        pwrite(m.m("f.bin"), old, p * PAGE)
        assert_nothing_staged(m)
    # A partial change and its undo.
    p = 12000
    off = p * PAGE + 1000
    pwrite(m.m("f.bin"), b"\xff" * 10 + b"\x00" * 10, off)
    assert only_entry(m)[0]["dirty_pages"] == 1
    pwrite(m.m("f.bin"), orig[off:off + 20], off)
    assert_nothing_staged(m)
    r = m.sync()
    assert r.json["pages_written"] == 0 and r.json["bytes_written"] == 0, r.json
    assert read_file(m.s("f.bin")) == orig


def test_cp_of_identical_copy_dirties_nothing(f64, tmp_path):
    m, orig = f64
    copy = tmp_path / "copy.bin"
    write_file(copy, orig)
    subprocess.run(["cp", str(copy), str(m.m("f.bin"))], check=True, timeout=60)
    assert read_file(m.m("f.bin")) == orig
    assert_nothing_staged(m)
    r = m.sync()
    assert r.json["pages_written"] == 0 and r.json["bytes_written"] == 0, r.json
    assert read_file(m.s("f.bin")) == orig


def test_cp_of_identical_sparse_copy_dirties_nothing(mount_factory, tmp_path):
    """The same with holes in the file: cp skips them (SEEK_DATA), and the
    pages it did not write are still the source's bytes (zeros)."""
    src = tmp_path / "src"
    src.mkdir()
    chunks = {0: os.urandom(64 * 1024), 8 * MiB: os.urandom(128 * 1024), 20 * MiB - PAGE: os.urandom(PAGE)}
    for path in [src / "s.img", tmp_path / "copy.img"]:
        with open(path, "wb") as f:
            f.truncate(20 * MiB)
            for off, b in chunks.items():
                os.pwrite(f.fileno(), b, off)
    m = mount_factory()
    subprocess.run(["cp", str(tmp_path / "copy.img"), str(m.m("s.img"))], check=True, timeout=60)
    assert read_file(m.m("s.img")) == read_file(tmp_path / "copy.img")
    assert_nothing_staged(m)
    r = m.sync()
    assert r.json["pages_written"] == 0 and r.json["bytes_written"] == 0, r.json


def test_truncate_shrink_and_extend_staged(f64):
    m, orig = f64
    small = 10 * MiB + 1000
    os.truncate(m.m("f.bin"), small)
    assert os.stat(m.m("f.bin")).st_size == small
    assert os.stat(m.s("f.bin")).st_size == SIZE
    assert read_file(m.m("f.bin")) == orig[:small]
    e, _ = only_entry(m)
    assert e["size"] == small and e["state"] == "staged", e
    # Extend again: the cut part reads as zeros, not as the old bytes.
    bigger = 20 * MiB
    with open(m.m("f.bin"), "r+b") as f:
        f.truncate(bigger)
    expected = orig[:small] + bytes(bigger - small)
    assert os.stat(m.m("f.bin")).st_size == bigger
    assert read_file(m.m("f.bin")) == expected
    assert read_file(m.s("f.bin")) == orig, "truncate must be staged"
    e, _ = only_entry(m)
    assert e["size"] == bigger
    r = m.sync()
    assert r.json["files"] == 1 and r.json["failed"] == [], r.json
    assert os.stat(m.s("f.bin")).st_size == bigger
    assert read_file(m.s("f.bin")) == expected
    assert_nothing_staged(m)


def test_extend_staged(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_file(src / "small", b"abc" * 1000)
    m = mount_factory()
    os.truncate(m.m("small"), 3 * MiB)
    with open(m.m("small"), "ab") as f:
        f.write(b"tail")
    expected = b"abc" * 1000 + bytes(3 * MiB - 3000) + b"tail"
    assert read_file(m.m("small")) == expected
    assert read_file(m.s("small")) == b"abc" * 1000
    e, _ = only_entry(m, "small")
    assert e["size"] == 3 * MiB + 4
    m.sync()
    assert read_file(m.s("small")) == expected
    assert_nothing_staged(m)


def test_shrink_to_zero_staged(f64):
    m, orig = f64
    with open(m.m("f.bin"), "r+b") as f:
        f.truncate(0)
    assert os.stat(m.m("f.bin")).st_size == 0
    assert read_file(m.m("f.bin")) == b""
    assert os.stat(m.s("f.bin")).st_size == SIZE
    m.sync()
    assert os.stat(m.s("f.bin")).st_size == 0


def test_discard_restores_source_content(f64):
    m, orig = f64
    for rnd in range(5):
        pages = [1, 2, 4000 + rnd]
        fd = os.open(m.m("f.bin"), os.O_RDWR)
        try:
            for p in pages:
                os.pwrite(fd, os.urandom(PAGE), p * PAGE)
            # Read back through the mount, so that the kernel caches the new pages.
            for p in pages:
                os.pread(fd, PAGE, p * PAGE)
            os.ftruncate(fd, SIZE + 3 * PAGE)  # and a staged extend
            assert os.fstat(fd).st_size == SIZE + 3 * PAGE
            r = m.discard()
            assert r.json["files"] == 1, r.json
            # Right after discard: the same open fd and a new one see the source.
            assert os.fstat(fd).st_size == SIZE, f"round {rnd}: stale size after discard"
            for p in pages:
                assert os.pread(fd, PAGE, p * PAGE) == orig[p * PAGE:(p + 1) * PAGE], \
                    f"round {rnd}: page {p} still shows the discarded bytes (same fd)"
        finally:
            os.close(fd)
        for p in pages:
            assert pread(m.m("f.bin"), PAGE, p * PAGE) == orig[p * PAGE:(p + 1) * PAGE], \
                f"round {rnd}: page {p} still shows the discarded bytes (new fd)"
        assert_nothing_staged(m)
    assert read_file(m.m("f.bin")) == orig
    assert read_file(m.s("f.bin")) == orig


def test_discard_tells_the_kernel_the_size_at_once(f64):
    """The kernel keeps a cached size and a read inside it never asks the
    daemon: after a discard shrank the file, that size must be the new one
    before `discard` returns, or a later read shows bytes past the end."""
    m, orig = f64
    path = m.m("f.bin")
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * PAGE, SIZE + 5 * PAGE)  # staged extend
        assert cached_size(path) == SIZE + 6 * PAGE
        m.discard()
        assert cached_size(path) == SIZE, "the kernel still holds the discarded size"
        # Extend by a little, inside the discarded size, and read across the end
        # with a read that leaves the last page to a request of its own.
        os.pwrite(fd, b"y" * 100, SIZE + 50)
        assert os.pread(fd, PAGE, SIZE + PAGE) == b""
        assert os.pread(fd, 3 * PAGE, SIZE - PAGE) == orig[-PAGE:] + bytes(50) + b"y" * 100
    finally:
        os.close(fd)


def test_new_file_data_is_staged(mnt):
    data = os.urandom(10000)
    with open(mnt.m("new.bin"), "wb") as f:
        f.write(data)
    assert os.path.exists(mnt.s("new.bin")), "create goes through at once"
    assert os.stat(mnt.s("new.bin")).st_size == 0, "the data is staged"
    assert read_file(mnt.m("new.bin")) == data
    e, _ = only_entry(mnt, "new.bin")
    assert e["size"] == 10000 and e["dirty_pages"] == 3 and e["dirty_bytes"] == 3 * PAGE, e
    r = mnt.sync()
    assert r.json["files"] == 1 and r.json["bytes_written"] == 10000, r.json
    assert read_file(mnt.s("new.bin")) == data
    assert_nothing_staged(mnt)


def test_rename_keeps_staged_data(f64):
    m, orig = f64
    os.mkdir(m.m("sub"))
    new = os.urandom(PAGE)
    pwrite(m.m("f.bin"), new, 10 * PAGE)
    os.rename(m.m("f.bin"), m.m("g.bin"))
    assert read_file(m.s("g.bin")) == orig, "rename goes through, data stays staged"
    e, _ = only_entry(m, "g.bin")
    assert e["dirty_pages"] == 1
    os.rename(m.m("g.bin"), m.m("sub/h.bin"))
    e, _ = only_entry(m, "sub/h.bin")
    assert e["dirty_pages"] == 1
    assert pread(m.m("sub/h.bin"), PAGE, 10 * PAGE) == new
    r = m.sync()
    assert r.json["files"] == 1 and r.json["pages_written"] == 1, r.json
    expected = orig[:10 * PAGE] + new + orig[11 * PAGE:]
    assert read_file(m.s("sub/h.bin")) == expected
    assert not os.path.exists(m.s("f.bin")) and not os.path.exists(m.s("g.bin"))
    assert_nothing_staged(m)


def test_rename_over_existing_file_with_staged_data(mount_factory, tmp_path):
    """The write-a-temporary-and-rename pattern: the staged temp file replaces the target."""
    src = tmp_path / "src"
    src.mkdir()
    write_file(src / "doc.txt", b"old version\n")
    m = mount_factory()
    assert read_file(m.m("doc.txt")) == b"old version\n"
    write_file(m.m("doc.txt.tmp"), b"new version\n")
    os.rename(m.m("doc.txt.tmp"), m.m("doc.txt"))
    assert read_file(m.m("doc.txt")) == b"new version\n"
    assert read_file(m.s("doc.txt")) == b""  # the temp file's name arrived, its data is staged
    e, _ = only_entry(m, "doc.txt")
    assert e["size"] == len(b"new version\n")
    m.sync()
    assert read_file(m.s("doc.txt")) == b"new version\n"
    assert src_names(m.s()) == ["doc.txt"]


def test_unlink_drops_staged_data_after_last_close(f64):
    m, orig = f64
    new = os.urandom(PAGE)
    fd = os.open(m.m("f.bin"), os.O_RDWR)
    try:
        os.pwrite(fd, new, 0)
        os.unlink(m.m("f.bin"))
        assert not os.path.exists(m.s("f.bin"))
        # Still readable and writable through the open handle.
        assert os.pread(fd, PAGE, 0) == new
        assert os.pread(fd, PAGE, PAGE) == orig[PAGE:2 * PAGE]
    finally:
        os.close(fd)
    assert_nothing_staged(m)
    r = m.sync()
    assert r.json["files"] == 0 and r.json["bytes_written"] == 0, r.json
    assert src_names(m.s()) == []


def test_unlink_of_closed_staged_file(f64):
    m, orig = f64
    pwrite(m.m("f.bin"), os.urandom(PAGE), 0)
    assert only_entry(m)[0]["dirty_pages"] == 1
    os.unlink(m.m("f.bin"))
    assert_nothing_staged(m)
    r = m.sync()
    assert r.json["files"] == 0 and r.json["bytes_written"] == 0, r.json
    assert src_names(m.s()) == []


def test_unlink_of_one_hard_link_keeps_staged_data(mount_factory, tmp_path):
    """The file still has a name: its staged data must survive and sync to it."""
    src = tmp_path / "src"
    src.mkdir()
    write_file(src / "a", b"x" * PAGE)
    os.link(src / "a", src / "b")
    m = mount_factory()
    pwrite(m.m("a"), b"y" * PAGE, 0)
    os.unlink(m.m("a"))
    assert read_file(m.m("b")) == b"y" * PAGE
    assert m.status()["dirty_pages"] == 1
    m.sync()
    assert read_file(m.s("b")) == b"y" * PAGE


def test_status_names_surviving_link_after_unlink(mount_factory, tmp_path):
    """Staged data of a file whose first name was unlinked is reported under the
    name it still has (git writes objects as tmp_obj_*, links, unlinks)."""
    src = tmp_path / "src"
    src.mkdir()
    write_file(src / "a", b"x" * PAGE)
    os.link(src / "a", src / "b")
    m = mount_factory()
    pwrite(m.m("a"), b"y" * PAGE, 0)
    os.unlink(m.m("a"))
    assert [f["path"] for f in m.status()["files"]] == ["b"]


def test_partial_page_write_keeps_other_bytes(f64):
    m, orig = f64
    off = 300 * PAGE + 1234
    pwrite(m.m("f.bin"), b"PATCH", off)
    drop_cache(m.m("f.bin"))
    page = pread(m.m("f.bin"), PAGE, 300 * PAGE)
    exp = bytearray(orig[300 * PAGE:301 * PAGE])
    exp[1234:1239] = b"PATCH"
    assert page == bytes(exp)
    e, _ = only_entry(m)
    assert e["dirty_pages"] == 1
    r = m.sync()
    assert r.json["pages_written"] == 1 and r.json["bytes_written"] == PAGE, r.json
    assert pread(m.s("f.bin"), PAGE, 300 * PAGE) == bytes(exp)
    assert read_file(m.s("f.bin"))[:300 * PAGE] == orig[:300 * PAGE]


def test_mtime_of_staged_file_moves(f64):
    m, _ = f64
    before = os.stat(m.m("f.bin")).st_mtime_ns
    src_before = os.stat(m.s("f.bin")).st_mtime_ns
    import time
    time.sleep(0.02)
    pwrite(m.m("f.bin"), os.urandom(PAGE), 0)
    assert os.stat(m.m("f.bin")).st_mtime_ns > before
    assert os.stat(m.s("f.bin")).st_mtime_ns == src_before


NAMESPACE_OPS = {
    "chmod": lambda m: os.chmod(m.m("f.bin"), 0o600),
    "chown": lambda m: os.chown(m.m("f.bin"), 4321, 4321),
    "setxattr": lambda m: os.setxattr(m.m("f.bin"), "user.tag", b"v"),
    "link": lambda m: os.link(m.m("f.bin"), m.m("f.link")),
}


@pytest.mark.parametrize("op", ["chmod", "chown", "setxattr", "link", "rename"])
def test_namespace_op_on_staged_file_keeps_it_staged(f64, op):
    """Spec 6.6: namespace operations go through to the source and staged data
    follows its file. Our own operation through the mount is not an outside
    change: the file must stay `staged`, not turn into a conflict."""
    m, orig = f64
    new = os.urandom(PAGE)
    pwrite(m.m("f.bin"), new, 7 * PAGE)
    name = "f.bin"
    if op == "rename":
        os.rename(m.m("f.bin"), m.m("moved.bin"))
        name = "moved.bin"
    else:
        NAMESPACE_OPS[op](m)
    e, _ = only_entry(m, name)
    assert e["state"] == "staged", f"after {op} through the mount: {e}"
    # Pages not loaded yet are still readable (no EIO).
    assert pread(m.m(name), PAGE, 9 * PAGE) == orig[9 * PAGE:10 * PAGE]
    r = m.sync()
    assert r.json["pages_written"] == 1 and r.json["conflicts"] == [], r.json
    assert pread(m.s(name), PAGE, 7 * PAGE) == new


def test_utime_on_staged_file_is_kept(f64):
    """`cp -p`, rsync and tar set mtime after writing. Through the mount the set
    time must show at once, and survive the commit of the staged data."""
    m, _ = f64
    pwrite(m.m("f.bin"), os.urandom(PAGE), 0)
    when = 1_500_000_000_123_456_789
    os.utime(m.m("f.bin"), ns=(when, when))
    assert os.stat(m.m("f.bin")).st_mtime_ns == when, "stat through the mount ignores utime on a staged file"
    r = m.sync()
    assert r.json["pages_written"] == 1, r.json
    assert os.stat(m.s("f.bin")).st_mtime_ns == when, "sync clobbered the mtime set through the mount"
    assert os.stat(m.m("f.bin")).st_mtime_ns == when
