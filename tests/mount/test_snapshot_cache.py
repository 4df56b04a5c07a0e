"""The snapshot cache outlives the kernel's inode (spec 5.1): after
`echo 3 > drop_caches` evicts the mount's inodes (FORGET), a file with no
handle and nothing staged keeps its loaded pages, and its next open reuses
them once the source's identity is checked; a source changed meanwhile is
re-snapshotted, never served stale."""

import os
import time

import pytest

from conftest import read_file, wait_for

PAGE = 4096


def drop_kernel_caches():
    # The first drop evicts the mount's inodes (the kernel sends FORGET);
    # the second drops what the FORGETs released.
    for _ in range(2):
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        time.sleep(0.05)


def kept_after_forget(m, want):
    """Waits until stats shows `want` kept snapshots (FORGET is asynchronous)."""
    assert wait_for(lambda: m.stats()["snapshots_kept"] == want, 5.0), m.stats()
    return m.stats()


@pytest.fixture
def cached(mount_factory):
    m = mount_factory()
    data = os.urandom(64 * PAGE)
    with open(m.s("f"), "wb") as f:
        f.write(data)
    return m, data


def test_forgotten_file_keeps_its_pages_and_reuses_them(cached):
    m, data = cached
    assert read_file(m.m("f")) == data
    loaded = m.stats()["loaded_bytes"]
    assert loaded >= len(data)
    drop_kernel_caches()
    s = kept_after_forget(m, 1)
    assert s["snapshots"] >= 1
    assert s["materialized_bytes"] >= len(data)
    # The next open takes the kept snapshot: no page is read again.
    with open(m.m("f"), "rb") as f:
        assert f.read() == data
        s = m.stats()
        assert s["loaded_bytes"] == loaded
        assert s["snapshots_kept"] == 0  # in use
    # Closed, with nothing staged: parked in the cache again.
    assert m.stats()["snapshots_kept"] == 1


def test_closed_file_is_parked_and_taken_back(cached):
    m, data = cached
    assert read_file(m.m("f")) == data
    s = m.stats()
    loaded = s["loaded_bytes"]
    # The kernel still holds the inode; the daemon holds the snapshot in its
    # bounded cache, not on the inode.
    assert s["snapshots_kept"] == 1
    with open(m.m("f"), "r+b") as f:
        assert m.stats()["snapshots_kept"] == 0
        f.write(b"y" * PAGE)
    # Staged: not parked, and still there at the next open.
    assert m.stats()["snapshots_kept"] == 0
    assert read_file(m.m("f")) == b"y" * PAGE + data[PAGE:]
    assert m.stats()["loaded_bytes"] == loaded
    m.discard()
    assert read_file(m.m("f")) == data
    assert m.stats()["snapshots_kept"] == 1


def test_source_changed_while_forgotten_is_resnapshotted(cached):
    m, data = cached
    assert read_file(m.m("f")) == data
    drop_kernel_caches()
    kept_after_forget(m, 1)
    new = os.urandom(48 * PAGE)
    with open(m.s("f"), "wb") as f:  # an outside change: size, mtime and ctime move
        f.write(new)
    assert read_file(m.m("f")) == new


def test_same_size_outside_rewrite_is_detected(cached):
    m, data = cached
    assert read_file(m.m("f")) == data
    drop_kernel_caches()
    kept_after_forget(m, 1)
    new = bytearray(data)
    new[5 * PAGE:5 * PAGE + 8] = b"outside!"
    with open(m.s("f"), "r+b") as f:
        f.seek(5 * PAGE)
        f.write(b"outside!")
    assert read_file(m.m("f")) == bytes(new)


def test_unlinked_file_is_not_kept(cached):
    m, data = cached
    assert read_file(m.m("f")) == data
    drop_kernel_caches()
    kept_after_forget(m, 1)
    os.unlink(m.m("f"))
    assert m.stats()["snapshots_kept"] == 0


def test_staged_file_is_not_a_cache(cached):
    m, data = cached
    with open(m.m("f"), "r+b") as f:
        f.write(b"x" * PAGE)
    drop_kernel_caches()
    time.sleep(0.2)
    s = m.stats()
    assert s["snapshots_kept"] == 0
    assert s["dirty_pages"] == 1
    assert read_file(m.m("f"))[:PAGE] == b"x" * PAGE
    m.discard()
