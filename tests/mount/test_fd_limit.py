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
    for i in range(0, n, 97):
        assert open(m.m(f"many/f{i}"), "rb").read() == b"x"


def test_control_socket_answers_when_descriptors_run_out(mount_factory):
    m = mount_factory()
    pid = m.proc.pid
    base = len(os.listdir(f"/proc/{pid}/fd"))
    limit = base + 64
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={limit}:{limit}"], check=True)
    make_files(m.s("many"), 400)
    refused = []
    for i in range(400):
        try:
            os.stat(m.m(f"many/f{i}"))
        except OSError as e:
            assert e.errno == errno.EMFILE, e
            refused.append(i)
    # The last lookup was refused: the daemon has no descriptor left now.
    assert refused and refused[-1] == 399, f"the lowered limit was not reached ({refused[:3]}...)"
    # Out of descriptors: the control socket is still served (on the
    # reserved one), and says what it can.
    st = subprocess.run([DEFERFS, "stats", "--json", str(m.mnt)], capture_output=True, text=True, timeout=30)
    assert st.returncode == 0, st.stderr
    assert "out of file descriptors" in m.log()
    # The kernel forgets the inodes, the daemon gets its descriptors back
    # and serves the rest of the tree again.
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")

    def served_again():
        try:
            return os.stat(m.m("many/f399")).st_size == 1
        except OSError:
            return False
    assert wait_for(served_again, 10), "still EMFILE after the kernel dropped its inodes"
    um = subprocess.run([DEFERFS, "umount", str(m.mnt)], capture_output=True, text=True, timeout=60)
    assert um.returncode == 0, um.stderr
    m.wait_exit()
