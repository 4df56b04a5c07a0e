"""The mount answers as the source filesystem does (issue 16.2, 16.5).

Each case makes the same call on a source file directly and on another
through the mount, and compares the outcomes:
- truncate/ftruncate/pwrite/fallocate beyond the source filesystem's largest
  file: EFBIG on both, and nothing staged through the mount;
- open(O_TRUNC) of a non-empty file moves mtime and ctime on both;
- a file mapped and then shrunk: the mapper gets SIGBUS past the new end on
  both (in a child process), and through the mount nothing else breaks.
"""

import errno
import os
import signal
import subprocess
import sys
import time

from conftest import PAGE, read_file, write_file

TIB = 1 << 40


def largest_size(path):
    """The largest size ftruncate accepts on path's filesystem (binary search)."""
    fd = os.open(path, os.O_RDWR)
    try:
        ok, bad = 0, 1 << 63
        while bad - ok > 1:
            mid = (ok + bad) // 2
            try:
                os.ftruncate(fd, mid)
                ok = mid
            except OSError as e:
                assert e.errno in (errno.EFBIG, errno.EINVAL), e
                bad = mid
        os.ftruncate(fd, 0)
        return ok
    finally:
        os.close(fd)


def outcome(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]


def test_truncate_beyond_the_largest_file_fails_as_on_the_source(mnt):
    write_file(mnt.s("probe"), b"")
    limit = largest_size(mnt.s("probe"))
    write_file(mnt.s("a"), b"source file")
    write_file(mnt.s("b"), b"mounted file")
    for size in (limit + 1, limit + PAGE, 17 * TIB, (1 << 63) - 1):
        by_path = [outcome(lambda: os.truncate(p, size)) for p in (mnt.s("a"), mnt.m("b"))]
        assert by_path[0] == "EFBIG", (size, by_path)
        assert by_path[1] == by_path[0], f"truncate({size}): source {by_path[0]}, mount {by_path[1]}"
        fds = [os.open(p, os.O_WRONLY) for p in (mnt.s("a"), mnt.m("b"))]
        try:
            by_fd = [outcome(lambda: os.ftruncate(fd, size)) for fd in fds]
            by_fa = [outcome(lambda: os.posix_fallocate(fd, size - 1, 1)) for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        assert by_fd == ["EFBIG", "EFBIG"], (size, by_fd)
        assert by_fa[1] == by_fa[0] == "EFBIG", (size, by_fa)
    # Nothing was staged by the refused calls.
    assert mnt.staged("b") is None or mnt.staged("b")["dirty_pages"] == 0, mnt.status()
    assert os.stat(mnt.m("b")).st_size == len(b"mounted file")
    assert read_file(mnt.m("b")) == b"mounted file"
    # The largest size itself is accepted by both, and the sync applies it.
    assert [outcome(lambda: os.truncate(p, limit)) for p in (mnt.s("a"), mnt.m("b"))] == ["ok", "ok"]
    assert os.stat(mnt.m("b")).st_size == limit
    os.truncate(mnt.m("b"), 5)
    mnt.sync()
    assert read_file(mnt.s("b")) == b"mount"


def test_write_beyond_the_largest_file_fails_as_on_the_source(mnt):
    write_file(mnt.s("probe"), b"")
    limit = largest_size(mnt.s("probe"))
    results = []
    for p in (mnt.s("a"), mnt.m("b")):
        write_file(p, b"x")
        fd = os.open(p, os.O_WRONLY)
        try:
            results.append((outcome(lambda: os.pwrite(fd, b"yy", limit)),
                            os.pwrite(fd, b"zz", limit - 1)))  # short: one byte fits
            os.ftruncate(fd, 1)
        finally:
            os.close(fd)
    assert results[0] == ("EFBIG", 1), results
    assert results[1] == results[0], f"source {results[0]}, mount {results[1]}"


def test_open_o_trunc_moves_mtime_and_ctime_as_on_the_source(mnt):
    write_file(mnt.s("a"), b"a" * 3 * PAGE)
    write_file(mnt.s("b"), b"b" * 3 * PAGE)
    past = time.time() - 100
    for p in (mnt.s("a"), mnt.s("b")):
        os.utime(p, (past, past))
    before = {p: os.stat(p) for p in (mnt.s("a"), mnt.m("b"))}
    time.sleep(0.02)  # ctime cannot be set back: let the clock move past it
    for p in before:
        os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))
    moved = {}
    for p, st in before.items():
        now = os.stat(p)
        moved[p] = (now.st_size, now.st_mtime_ns > st.st_mtime_ns, now.st_ctime_ns > st.st_ctime_ns)
    assert moved[mnt.s("a")] == (0, True, True), moved
    assert moved[mnt.m("b")] == moved[mnt.s("a")], f"source {moved[mnt.s('a')]}, mount {moved[mnt.m('b')]}"
    # Seen again from the daemon (the kernel's cached attributes dropped).
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    now = os.stat(mnt.m("b"))
    assert now.st_mtime_ns > before[mnt.m("b")].st_mtime_ns and now.st_size == 0
    mnt.sync()
    assert os.stat(mnt.s("b")).st_size == 0


# A child maps `path` (8 pages), reads every page, has the file shrunk to
# 2.5 pages by `truncate_path` (another name of it: the mount, or the source),
# reads page 0 and the tail of page 2 (zeros past the end), then touches page
# 5: it must die of SIGBUS there.
CHILD = r"""
import mmap, os, sys
path, truncate_path, page = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, 8 * page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
assert all(m[i * page] == ord("p") for i in range(8))
os.truncate(truncate_path, 2 * page + page // 2)
assert m[0:4] == b"pppp", m[0:4]
assert m[2 * page + page // 2 - 1] == ord("p")
assert m[2 * page + page // 2:3 * page] == bytes(page - page // 2), "the tail of the last page is not zeros"
print("survived the pages before the end", flush=True)
m[5 * page] = 1   # past the new end: SIGBUS
print("no SIGBUS past the end", flush=True)
sys.exit(3)
"""


def run_child(path, truncate_path):
    return subprocess.run([sys.executable, "-c", CHILD, str(path), str(truncate_path), str(PAGE)],
                          capture_output=True, text=True, timeout=60)


def test_mapped_then_truncated_gives_sigbus_past_the_end_as_on_the_source(mnt):
    data = b"p" * 8 * PAGE
    write_file(mnt.s("a"), data)
    write_file(mnt.s("b"), data)
    on_source = run_child(mnt.s("a"), mnt.s("a"))
    assert on_source.returncode == -signal.SIGBUS, on_source
    # Another reader has the mount's file open and mapped too.
    reader = os.open(mnt.m("b"), os.O_RDONLY)
    try:
        through = run_child(mnt.m("b"), mnt.m("b"))
        assert through.returncode == on_source.returncode, \
            f"source: {on_source.returncode}, mount: {through.returncode} {through.stdout} {through.stderr}"
        assert "survived" in through.stdout
        # Nothing else broke: the daemon serves, the other reader reads the
        # new size, the staged state is the truncated file.
        assert mnt.proc.poll() is None, mnt.log()
        assert os.pread(reader, 8 * PAGE, 0) == data[:2 * PAGE + PAGE // 2]
    finally:
        os.close(reader)
    assert read_file(mnt.m("b")) == data[:2 * PAGE + PAGE // 2]
    assert os.stat(mnt.m("b")).st_size == 2 * PAGE + PAGE // 2
    assert read_file(mnt.s("b")) == data, "the source changed before a sync"
    mnt.sync()
    assert read_file(mnt.s("b")) == data[:2 * PAGE + PAGE // 2]
    # A new mapping of the shrunk file works up to its end.
    fd = os.open(mnt.m("b"), os.O_RDONLY)
    try:
        import mmap
        m = mmap.mmap(fd, 2 * PAGE + PAGE // 2, mmap.MAP_SHARED, mmap.PROT_READ)
        assert m[:] == data[:2 * PAGE + PAGE // 2]
        m.close()
    finally:
        os.close(fd)
