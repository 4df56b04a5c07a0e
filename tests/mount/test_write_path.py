"""The write path does not read the source (issue 15, spec 6.1): a write
covering whole pages goes into the segment at once; whether a page equals its
snapshot is decided later, in batches, when status, stats, sync or spilling
needs to know. Every observer still sees spec 6.1: no report counts a page
whose bytes equal the snapshot, `cp` of identical bytes stages nothing by the
time anyone looks, and sync writes only the pages that differ.

Whether the daemon read the source is seen from the source's page cache:
after dropping it, a buffered read by the daemon would make the source's
pages resident again (mincore)."""

import ctypes
import mmap
import os

import pytest

from conftest import read_file

PAGE = 4096
PAGES = 256

libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(path, first, count):
    """How many of the file's pages [first, first+count) are in its page cache."""
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: never written
        try:
            base = ctypes.addressof(ctypes.c_char.from_buffer(m)) + first * PAGE
            vec = (ctypes.c_ubyte * count)()
            if libc.mincore(ctypes.c_void_p(base), ctypes.c_size_t(count * PAGE), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(v & 1 for v in vec)
        finally:
            m.close()


def drop_source_cache(path):
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def src_file(mount_factory):
    m = mount_factory()
    data = os.urandom(4 * PAGES * PAGE)
    with open(m.s("f"), "wb") as f:
        f.write(data)
    return m, data


def test_whole_page_writes_do_not_read_the_source(src_file):
    m, data = src_file
    first = PAGES  # pages [PAGES, 2*PAGES): in the middle of the file
    drop_source_cache(m.s("f"))
    assert resident_pages(m.s("f"), first, PAGES) == 0
    new = os.urandom(PAGES * PAGE)
    fd = os.open(m.m("f"), os.O_WRONLY)
    try:
        for i in range(PAGES):  # page by page, as 4 KiB random writes do
            os.pwrite(fd, new[i * PAGE:(i + 1) * PAGE], (first + i) * PAGE)
    finally:
        os.close(fd)
    assert resident_pages(m.s("f"), first, PAGES) == 0, "a write read the source"
    # The mount shows the new bytes, the source the old ones.
    want = data[:first * PAGE] + new + data[(first + PAGES) * PAGE:]
    assert read_file(m.m("f")) == want
    # An observer's look compares them: every page differs.
    assert m.status()["dirty_pages"] == PAGES
    r = m.sync().json
    assert r["pages_written"] == PAGES
    assert read_file(m.s("f")) == want


def test_rewriting_the_same_bytes_stages_nothing_by_the_time_anyone_looks(src_file):
    m, data = src_file
    drop_source_cache(m.s("f"))
    skipped0 = m.stats()["skipped_pages"]
    with open(m.m("f"), "r+b") as f:  # cp of identical bytes over the file
        f.write(data)
    assert m.stats()["dirty_pages"] == 0
    st = m.status(m.m("f"))
    assert st["dirty_pages"] == 0
    assert st["files"] == []
    assert m.stats()["skipped_pages"] - skipped0 == 4 * PAGES
    r = m.sync(m.m("f")).json
    assert r["pages_written"] == 0
    assert r["files"] == 0


def test_sync_writes_only_the_pages_that_differ(src_file):
    m, data = src_file
    drop_source_cache(m.s("f"))
    new = bytearray(data)
    changed = [3, 100, 101, 700, 1023]
    for p in changed:
        new[p * PAGE:(p + 1) * PAGE] = os.urandom(PAGE)
    with open(m.m("f"), "r+b") as f:  # the whole file rewritten, five pages new
        f.write(new)
    r = m.sync().json
    assert r["pages_written"] == len(changed)
    assert r["pages_skipped"] >= 4 * PAGES - len(changed)
    assert read_file(m.s("f")) == bytes(new)
