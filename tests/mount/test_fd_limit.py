"""Descriptors: every inode the kernel knows holds one of the daemon's open
files (an O_PATH fd of its source), so a tree of many files must not run it
out of descriptors, and when it does run out anyway the control socket must
still answer (a `deferfs umount` left waiting in the listen queue hung for
good: found by transport_bench's create+unlink of 10,000 files)."""

import errno
import os
import resource
import subprocess

from conftest import DEFERFS, wait_for


def open_files_limit(pid):
    """(soft, hard) 'Max open files' of a process, from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


def make_files(top, n):
    top.mkdir()
    for i in range(n):
        (top / f"f{i}").write_bytes(b"x")


def test_daemon_raises_its_open_file_limit(mount_factory):
    # Start the daemon with a soft limit far below the files the test looks
    # up; as root it raises it (to fs.nr_open), else to its hard limit.
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, old[1]))
    try:
        m = mount_factory()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)
    soft, hard = open_files_limit(m.proc.pid)
    assert soft == hard and soft >= old[1], (soft, hard, old)
    n = 2000
    make_files(m.s("many"), n)
    # Each stat keeps a dentry, so an inode and its fd in the daemon.
    for i in range(n):
        assert os.stat(m.m(f"many/f{i}")).st_size == 1
    assert len(os.listdir(f"/proc/{m.proc.pid}/fd")) > n // 2
    # Read once and closed, a file's snapshot is parked in the bounded cache:
    # one descriptor per inode the kernel knows, not four (the snapshot's
    # segment, its meta, the source), which ran out at 5,000 files.
    for i in range(n):
        with open(m.m(f"many/f{i}"), "rb") as f:
            assert f.read() == b"x"
    held = len(os.listdir(f"/proc/{m.proc.pid}/fd"))
    assert held < n + 4 * 1024 + 100, held


def test_control_socket_answers_when_descriptors_run_out(mount_factory):
    m = mount_factory()
    pid = m.proc.pid
    base = len(os.listdir(f"/proc/{pid}/fd"))
    limit = base + 64
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:{limit}"], check=True)
    make_files(m.s("many"), 400)
    # Open files held open: the kernel cannot forget their inodes (another
    # test's drop_caches cannot give the daemon its descriptors back).
    held, refused = [], None
    for i in range(400):
        try:
            held.append(open(m.m(f"many/f{i}"), "rb"))
        except OSError as e:
            # EMFILE from the lookup, or EIO when the snapshot's own files cannot be opened
            assert e.errno in (errno.EMFILE, errno.EIO), e
            refused = i
            break
    assert refused is not None, "the lowered limit was never reached: the test proves nothing"
    # An open that failed for want of the snapshot's own descriptors gave
    # them back: a few may be free still. Lookups (one descriptor each, kept
    # while the kernel holds the dentry) take the rest, until one is refused.
    looked_up = []
    for i in range(refused + 1, 400):
        try:
            looked_up.append(os.stat(m.m(f"many/f{i}")))
        except OSError as e:
            assert e.errno == errno.EMFILE, e
            break
    else:
        raise AssertionError("lookups were never refused: the daemon's descriptors did not run out")
    try:
        # Out of descriptors: the control socket is still served (on the
        # reserved one), and says what it can.
        st = subprocess.run([DEFERFS, "stats", "--json", str(m.mnt)], capture_output=True, text=True, timeout=30)
        assert st.returncode == 0, st.stderr
        assert "out of file descriptors" in m.log()
    finally:
        for f in held:
            f.close()

    # Closed, the files give their descriptors back and the rest is served.
    def served_again():
        try:
            with open(m.m("many/f399"), "rb") as f:
                return f.read() == b"x"
        except OSError:
            return False
    assert wait_for(served_again, 10), "still EMFILE after the files were closed"
    um = subprocess.run([DEFERFS, "umount", str(m.mnt)], capture_output=True, text=True, timeout=60)
    assert um.returncode == 0, um.stderr
    m.wait_exit()
