"""The suite's own checks can fail (issue 16.6): an inner pytest run, with
the fixtures of conftest.py, of tests whose daemon dies, is daemonized and
killed, prints a sanitizer report, or skips. Each must fail unless the test
declared what happened."""

import os
import subprocess
import sys


from conftest import DEFERFS

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "..", "model")

INNER_CONFTEST = f"""
import sys
sys.path.insert(0, {MODEL!r})
from mountlib import mount_factory, daemon_watch, pytest_runtest_makereport  # noqa: F401
"""

INNER_TESTS = r'''
import json, os, signal, subprocess, pytest
from mountlib import DEFERFS, expect_daemon_exit, run, wait_for, mounts_at, FSTYPE

def test_foreground_killed(mount_factory):
    m = mount_factory()
    m.proc.kill()
    m.proc.wait()

def test_foreground_killed_declared(mount_factory):
    m = mount_factory()
    m.expect_exit = (-signal.SIGKILL,)
    m.proc.kill()
    m.proc.wait()

def _daemonized(tmp_path):
    src, mnt = tmp_path / "dsrc", tmp_path / "dmnt"
    src.mkdir(); mnt.mkdir()
    assert run(DEFERFS, src, mnt).returncode == 0
    pid = json.loads(run(DEFERFS, "stats", "--json", mnt).stdout)["pid"]
    return pid, mnt

def test_daemonized_killed(tmp_path):
    pid, mnt = _daemonized(tmp_path)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: False, 0.3)
    run("fusermount3", "-uz", mnt)

def test_daemonized_killed_declared(tmp_path):
    pid, mnt = _daemonized(tmp_path)
    expect_daemon_exit(pid, -signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: False, 0.3)
    run("fusermount3", "-uz", mnt)

def test_daemonized_clean(tmp_path):
    pid, mnt = _daemonized(tmp_path)
    assert run(DEFERFS, "umount", mnt).returncode == 0

def test_sanitizer_report(tmp_path, mount_factory):
    mount_factory()
    # What a daemon built with -fsanitize=address writes with log_path set.
    (tmp_path / "sanitizer" / "sanitizer.4242").write_text("==4242==ERROR: AddressSanitizer: heap-use-after-free\n")

def test_skips():
    pytest.skip("a skip")
'''


def inner(tmp_path, no_skip):
    d = tmp_path / "inner"
    d.mkdir(exist_ok=True)
    (d / "conftest.py").write_text(INNER_CONFTEST)
    (d / "test_inner.py").write_text(INNER_TESTS)
    env = dict(os.environ, DEFERFS=DEFERFS, DEFERFS_NO_SKIP="1" if no_skip else "0")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(d)],
                       capture_output=True, text=True, timeout=240, cwd=str(d), env=env)
    outcome = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            name = next((p.split("::")[-1] for p in parts if "::" in p), None)
            if parts[0] == "SKIPPED" and line.endswith(": a skip"):  # "SKIPPED [1] file:line: reason"
                name = "test_skips"
            if name:
                # A teardown error after a pass: the test failed.
                outcome[name] = "FAILED" if parts[0] == "ERROR" or outcome.get(name) == "FAILED" else parts[0]
    return outcome, r.stdout + r.stderr


def test_a_daemon_failure_fails_its_test(tmp_path):
    outcome, text = inner(tmp_path, no_skip=False)
    want = {
        "test_foreground_killed": "FAILED",
        "test_foreground_killed_declared": "PASSED",
        "test_daemonized_killed": "FAILED",
        "test_daemonized_killed_declared": "PASSED",
        "test_daemonized_clean": "PASSED",
        "test_sanitizer_report": "FAILED",
        "test_skips": "SKIPPED",
    }
    assert {k: outcome.get(k) for k in want} == want, text
    assert "exited with status -9" in text and "daemonized daemon" in text and "AddressSanitizer" in text, text


def test_no_skip_turns_a_skip_into_a_failure(tmp_path):
    outcome, text = inner(tmp_path, no_skip=True)
    assert outcome.get("test_skips") == "FAILED", text
    assert "DEFERFS_NO_SKIP" in text, text
