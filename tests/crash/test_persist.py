"""Staged pages outlive the daemon (spec 6.5, issue 4).

- SIGKILL with 600 staged pages, then a remount of the same SOURCE: status
  reports 600 of 600, the mount shows them, the next sync commits them exactly.
- SIGTERM while a staged file conflicts (its sync at exit fails): the staged
  pages are kept and the next mount shows them again, in conflict.
"""
import json
import os
import signal
import subprocess
import time

import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import daemonwatch  # noqa: E402  (tests/daemonwatch.py)

DEFERFS = os.environ.get("DEFERFS") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "../../build/src/deferfs")
PAGE = 4096


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.realpath(path) for line in f)


class Daemon:
    def __init__(self, src, mnt, log):
        self.src, self.mnt = str(src), str(mnt)
        self.log = open(log, "a")
        self.proc = subprocess.Popen([DEFERFS, self.src, self.mnt, "-f"], stderr=self.log)
        self.expect = (0,)  # the exit statuses the test allows (a SIGKILL of its own: -9)
        end = time.time() + 10
        while not mounted(self.mnt):
            assert time.time() < end, "the mount did not appear"
            assert self.proc.poll() is None, "the daemon exited"
            time.sleep(0.02)

    def cli(self, *args):
        r = subprocess.run([DEFERFS, *args, self.mnt], capture_output=True, text=True, timeout=60)
        return r.returncode, (json.loads(r.stdout) if "--json" in args and r.stdout else None), r.stderr

    def stop(self, sig=signal.SIGTERM):
        if sig == signal.SIGKILL:
            self.expect = (-signal.SIGKILL,)
        self.reap(sig)

    def reap(self, sig):
        """Stops the daemon with `sig` if it runs (SIGKILL after 30 s), lazily unmounts."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)


@pytest.fixture
def dirs(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    daemons = []
    saved = daemonwatch.sanitizer_logs(tmp_path / "sanitizer")
    yield src, mnt, tmp_path / "daemon.log", daemons
    # A clean end: the staged state a test left is dropped and the daemon
    # removes its shared memory (a SIGKILL here would leave it in /dev/shm).
    live = [d for d in daemons if d.proc.poll() is None]
    for d in live:
        subprocess.run([DEFERFS, "umount", "--discard", d.mnt], capture_output=True, timeout=60)
    for d in daemons:
        d.reap(signal.SIGKILL)
    if mounted(mnt):
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    log = (tmp_path / "daemon.log").read_text(errors="replace") if (tmp_path / "daemon.log").exists() else ""
    print(log)
    daemonwatch.restore_env(saved)
    # Issue 16.6: each daemon ended as the test meant it to, and reported nothing.
    bad = [f"daemon {d.proc.pid} exited with status {d.proc.returncode}, expected {d.expect}"
           for d in daemons if d.proc.returncode not in d.expect]
    bad += daemonwatch.log_problems(log)
    bad += [f"{p}: {t[:4000]}" for p, t in daemonwatch.sanitizer_reports(tmp_path / "sanitizer")]
    assert not bad, "\n".join(bad)


def test_sigkill_keeps_600_staged_pages(dirs):
    src, mnt, log, daemons = dirs
    original = os.urandom(2048 * PAGE)
    (src / "f").write_bytes(original)
    d = Daemon(src, mnt, log)
    daemons.append(d)
    expected = bytearray(original)
    fd = os.open(mnt / "f", os.O_WRONLY)
    for i in range(600):
        p = i * 3
        block = os.urandom(PAGE)
        os.pwrite(fd, block, p * PAGE)
        expected[p * PAGE:(p + 1) * PAGE] = block
    os.close(fd)
    rc, st, _ = d.cli("status", "--json")
    assert st["dirty_pages"] == 600
    d.stop(signal.SIGKILL)
    assert (src / "f").read_bytes() == original, "the source changed without a sync"

    d2 = Daemon(src, mnt, log)
    daemons.append(d2)
    rc, st, err = d2.cli("status", "--json")
    assert rc == 0, err
    assert st["dirty_pages"] == 600, st
    assert (mnt / "f").read_bytes() == bytes(expected)
    rc, r, err = d2.cli("sync", "--json")
    assert rc == 0, err
    assert r["pages_written"] == 600, r
    assert (src / "f").read_bytes() == bytes(expected)
    assert "restored 600 staged pages" in open(log).read()


def test_failed_sync_at_exit_keeps_staged_pages(dirs):
    src, mnt, log, daemons = dirs
    (src / "f").write_bytes(b"a" * 8 * PAGE)
    d = Daemon(src, mnt, log)
    daemons.append(d)
    fd = os.open(mnt / "f", os.O_WRONLY)
    os.pwrite(fd, b"staged!" * 100, 2 * PAGE)
    os.close(fd)
    # Changed outside the mount: the sync at exit must refuse it (conflict).
    with open(src / "f", "r+b") as f:
        f.seek(6 * PAGE)
        f.write(b"outside")
    d.stop(signal.SIGTERM)
    assert (src / "f").read_bytes()[2 * PAGE:2 * PAGE + 7] == b"a" * 7
    assert "NOT committed at exit" in open(log).read()

    d2 = Daemon(src, mnt, log)
    daemons.append(d2)
    rc, st, err = d2.cli("status", "--json")
    assert rc == 0, err
    assert st["dirty_pages"] == 1, st
    assert st["files"][0]["state"] == "conflict", st
    rc, r, err = d2.cli("sync", "--force", "--json")
    assert rc == 0, err
    data = (src / "f").read_bytes()
    assert data[2 * PAGE:2 * PAGE + 700] == b"staged!" * 100
    assert data[6 * PAGE:6 * PAGE + 7] == b"outside"
