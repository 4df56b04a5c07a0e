"""The command line (spec 2, 2.1, 3): PATH forms, errors and exit statuses,
--json fields, bad mount invocations, mount(8) and fstab."""

import json
import os
import sys
import textwrap

import pytest

from conftest import (DEFERFS, cli, daemon_pid_of, force_cleanup, is_mounted, pid_alive, pread, pwrite,
                      read_file, run, wait_for, write_file)

PAGE = 4096

STATS_FIELDS = ["page_size", "files_open", "snapshots", "materialized_bytes", "loaded_bytes", "dirty_pages",
                "dirty_bytes", "skipped_pages", "synced_bytes", "evicted_bytes", "cache_limit_bytes",
                "daemon_rss_bytes"]
STATUS_FIELDS = ["files", "dirty_pages", "dirty_bytes"]
STATUS_FILE_FIELDS = ["path", "size", "dirty_pages", "dirty_bytes", "state"]
SYNC_FIELDS = ["files", "pages_written", "pages_skipped", "bytes_written", "conflicts", "failed"]

FILES = ["a", "sub/b", "sub/deep/c", "other/d"]


@pytest.fixture
def tree(mount_factory, tmp_path):
    src = tmp_path / "src"
    for rel in FILES:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        write_file(src / rel, b"o" * (4 * PAGE))
    m = mount_factory()
    for rel in FILES:
        pwrite(m.m(rel), b"N" * PAGE, PAGE)
    return m


def staged_paths(r):
    assert r.rc == 0, r
    return sorted(f["path"] for f in r.json["files"])


def synced(m, rel):
    return pread(m.s(rel), PAGE, PAGE) == b"N" * PAGE


# ------------------------------------------------------------ PATH forms

def test_status_with_paths_inside_mount(tree):
    m = tree
    assert staged_paths(cli("status", "--json", m.mnt)) == sorted(FILES)
    assert staged_paths(cli("status", "--json", m.m("sub"))) == ["sub/b", "sub/deep/c"]
    assert staged_paths(cli("status", "--json", m.m("sub/deep/c"))) == ["sub/deep/c"]
    assert staged_paths(cli("status", "--json", m.m("sub/b"), m.m("other"))) == ["other/d", "sub/b"]
    r = cli("status", "--json", m.m("sub"))
    assert r.json["dirty_pages"] == 2 and r.json["dirty_bytes"] == 2 * PAGE, r.json
    # Without PATH: the current directory.
    assert staged_paths(cli("status", "--json", cwd=m.m("sub"))) == ["sub/b", "sub/deep/c"]
    assert staged_paths(cli("status", "--json", cwd=m.mnt)) == sorted(FILES)
    # Relative PATHs against the current directory.
    assert staged_paths(cli("status", "--json", "deep", cwd=m.m("sub"))) == ["sub/deep/c"]
    # Human output names the files too.
    r = cli("status", m.m("sub"))
    assert r.rc == 0 and "sub/b" in r.out and "sub/deep/c" in r.out and "other/d" not in r.out, r


def test_stats_with_paths_inside_mount(tree):
    m = tree
    for kw in [dict(args=[m.mnt]), dict(args=[m.m("sub/deep")]), dict(args=[m.m("sub/b")]),
               dict(args=[], cwd=m.m("other"))]:
        r = cli("stats", "--json", *kw["args"], cwd=kw.get("cwd"))
        assert r.rc == 0, r
        assert r.json["dirty_pages"] == 4, r.json  # counters of the whole mount


def test_sync_with_paths_inside_mount(tree):
    m = tree
    r = cli("sync", "--json", m.m("sub/deep/c"))
    assert r.rc == 0 and r.json["files"] == 1 and r.json["pages_written"] == 1, r
    assert synced(m, "sub/deep/c") and not synced(m, "sub/b") and not synced(m, "a")
    r = cli("sync", "--json", cwd=m.m("other"))
    assert r.rc == 0 and r.json["files"] == 1, r
    assert synced(m, "other/d") and not synced(m, "a")
    r = cli("sync", "--json", m.m("sub"))
    assert r.rc == 0 and r.json["files"] == 1, r
    assert synced(m, "sub/b") and not synced(m, "a")
    assert staged_paths(cli("status", "--json", m.mnt)) == ["a"]
    r = cli("sync", cwd=m.mnt)  # human output
    assert r.rc == 0, r
    assert synced(m, "a")
    assert staged_paths(cli("status", "--json", m.mnt)) == []


def test_discard_with_paths_inside_mount(tree):
    m = tree
    r = cli("discard", "--json", m.m("sub/b"))
    assert r.rc == 0, r
    assert pread(m.m("sub/b"), PAGE, PAGE) == b"o" * PAGE
    assert staged_paths(cli("status", "--json", m.mnt)) == ["a", "other/d", "sub/deep/c"]
    r = cli("discard", "--json", cwd=m.m("sub"))
    assert r.rc == 0, r
    assert staged_paths(cli("status", "--json", m.mnt)) == ["a", "other/d"]
    r = cli("discard", cwd=m.mnt)
    assert r.rc == 0, r
    assert staged_paths(cli("status", "--json", m.mnt)) == []
    for rel in FILES:
        assert read_file(m.m(rel)) == b"o" * (4 * PAGE), rel
        assert read_file(m.s(rel)) == b"o" * (4 * PAGE), rel


# ------------------------------------------------------------ path errors

@pytest.mark.parametrize("cmd", ["status", "stats", "sync", "discard", "umount"])
def test_path_not_on_deferfs_mount(tmp_path, cmd, mnt):
    other = tmp_path / "elsewhere"
    other.mkdir()
    r = cli(cmd, other)
    assert r.rc == 2, r
    assert str(other) in r.err, r
    assert r.out == "", r
    r = cli(cmd, "/")
    assert r.rc == 2, r
    # From a current directory that is not on a mount
    if cmd != "umount":
        r = cli(cmd, cwd=other)
        assert r.rc == 2, r
        assert r.err.strip(), r
    # The mount itself is unaffected.
    assert is_mounted(mnt.mnt)


@pytest.mark.parametrize("cmd", ["status", "stats", "sync", "discard", "umount"])
def test_missing_path(tmp_path, cmd, mnt):
    for p in [tmp_path / "no-such-dir", mnt.m("no-such-file")]:
        r = cli(cmd, p)
        assert r.rc == 2, r
        assert str(p) in r.err, r


def test_umount_of_path_inside_mount_is_refused(mnt):
    os.mkdir(mnt.m("d"))
    r = cli("umount", mnt.m("d"))
    assert r.rc == 2, r
    assert mnt.mounted()


def test_cli_usage_errors(mnt):
    for args in [["sync", "--bogus", mnt.mnt], ["status", "--force", mnt.mnt], ["stats", mnt.mnt, mnt.mnt],
                 ["umount"], ["umount", "--json", mnt.mnt]]:
        r = cli(*args)
        assert r.rc == 2, (args, r)
        assert r.err.strip(), (args, r)
    assert mnt.mounted()


# ------------------------------------------------------------ --json

def one_json_object(r):
    assert r.rc == 0, r
    text = r.out.strip()
    assert text.startswith("{") and text.endswith("}"), r.out
    obj = json.loads(r.out)  # refuses anything after the object
    assert isinstance(obj, dict)
    return obj


def test_json_fields(tree):
    m = tree
    s = one_json_object(cli("stats", "--json", m.mnt))
    for k in STATS_FIELDS:
        assert k in s, f"stats --json lacks {k}: {s}"
        assert isinstance(s[k], int) and s[k] >= 0, (k, s[k])
    assert s["page_size"] == PAGE
    st = one_json_object(cli("status", "--json", m.mnt))
    for k in STATUS_FIELDS:
        assert k in st, f"status --json lacks {k}: {st}"
    assert len(st["files"]) == 4
    for f in st["files"]:
        for k in STATUS_FILE_FIELDS:
            assert k in f, f"status file entry lacks {k}: {f}"
        assert f["state"] in ("staged", "conflict")
        assert f["size"] == 4 * PAGE and f["dirty_pages"] == 1 and f["dirty_bytes"] == PAGE
    sy = one_json_object(cli("sync", "--json", m.mnt))
    for k in SYNC_FIELDS:
        assert k in sy, f"sync --json lacks {k}: {sy}"
    assert isinstance(sy["conflicts"], list) and isinstance(sy["failed"], list)
    assert sy["files"] == 4 and sy["pages_written"] == 4 and sy["bytes_written"] == 4 * PAGE
    d = one_json_object(cli("discard", "--json", m.mnt))
    assert isinstance(d, dict)
    # Nothing staged: still one object with every field.
    st = one_json_object(cli("status", "--json", m.mnt))
    assert st["files"] == [] and st["dirty_pages"] == 0 and st["dirty_bytes"] == 0
    sy = one_json_object(cli("sync", "--json", m.mnt))
    for k in SYNC_FIELDS:
        assert k in sy


def test_json_sync_failed_entries(mount_factory, tmp_path):
    """A failed entry of sync --json has path and error."""
    src = tmp_path / "src"
    src.mkdir()
    write_file(src / "f", b"x" * PAGE)
    m = mount_factory()
    pwrite(m.m("f"), b"y" * PAGE, 0)
    r = run("chattr", "+i", m.s("f"))
    if r.returncode != 0:
        pytest.skip("no chattr +i here")
    try:
        r = cli("sync", "--json", "--force", m.mnt)
        assert r.rc == 1, r
        obj = json.loads(r.out)
        assert [sorted(f.keys()) for f in obj["failed"]] == [["error", "path"]], obj
        assert obj["failed"][0]["path"] == "f"
    finally:
        run("chattr", "-i", m.s("f"))
        # chattr changed the file outside the mount: its staged page is in
        # conflict and would outlive the daemon in /dev/shm.
        m.discard()


def test_size_options_in_stats(mount_factory):
    m = mount_factory(opts=["cache_size=64M,dirty_limit=32M"])
    s = m.stats()
    assert s["cache_limit_bytes"] == 64 << 20, s
    write_file(m.m("f"), b"z" * 10)
    assert m.status()["dirty_pages"] == 1


def test_page_size_option_in_stats(mount_factory):
    m = mount_factory(opts=["page_size=64k"])
    assert m.stats()["page_size"] == 65536
    write_file(m.m("f"), b"z" * 10)
    st = m.status()
    assert st["files"][0]["dirty_pages"] == 1 and st["files"][0]["dirty_bytes"] == 65536, st


# ------------------------------------------------------------ bad mounts

BAD_OPTIONS = [
    ("bogus_option", "bogus_option"),
    ("page_size=abc", "abc"),
    ("page_size=3k", "3k"),
    ("page_size=4M", "4M"),
    ("page_size=2k", "2k"),
    ("page_size=", "page_size"),
    ("fsync=sometimes", "sometimes"),
    ("cache_size=lots", "lots"),
    ("dirty_limit=1X", "1X"),
    ("snapshot=copy", "snapshot=copy"),
    ("readahead=1G", "readahead"),
]
NOT_YET = ()


def bad_mount(args, mnt, culprit, timeout=20):
    """Runs a mount that must fail: exit 2, a message naming `culprit`, nothing mounted."""
    mnt = str(mnt)
    try:
        r = run(DEFERFS, *args, timeout=timeout)
        assert r.returncode == 2, f"deferfs {args}: exit {r.returncode}, stderr {r.stderr!r}"
        assert culprit in r.stderr, f"deferfs {args}: message does not name {culprit!r}: {r.stderr!r}"
        assert not is_mounted(mnt), f"deferfs {args} mounted {mnt}"
        return r
    finally:
        notes = force_cleanup(mnt) if os.path.isdir(mnt) else []
        assert not any("STILL" in n for n in notes), notes


@pytest.mark.parametrize("opt,culprit", BAD_OPTIONS)
def test_bad_option_is_refused(tmp_path, opt, culprit):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    r = bad_mount([src, mnt, "-o", opt], mnt, culprit)
    if opt.split("=")[0] in NOT_YET:
        assert "support" in r.stderr.lower(), r.stderr
    # The same inside a list and spelled out with `mount`
    bad_mount(["mount", src, mnt, "-o", "page_size=8k," + opt], mnt, culprit)


def test_bad_paths_are_refused(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    afile = tmp_path / "afile"
    write_file(afile, b"x")
    missing = tmp_path / "missing"
    bad_mount([missing, mnt], mnt, str(missing))                  # SOURCE does not exist
    bad_mount([afile, mnt], mnt, str(afile))                      # SOURCE is a file
    bad_mount([src, missing], mnt, str(missing))                  # MOUNTPOINT does not exist
    bad_mount([src, afile], mnt, str(afile))                      # MOUNTPOINT is a file
    assert not os.path.exists(missing)
    bad_mount([src], mnt, str(src))                               # no MOUNTPOINT
    bad_mount([], mnt, "")                                        # nothing
    bad_mount(["-o", "page_size=8k"], mnt, "")                    # options only
    bad_mount([src, mnt, "extra"], mnt, "extra")                  # one too many
    bad_mount([src, mnt, "--bogus-flag"], mnt, "--bogus-flag")    # unknown flag


def test_unknown_subcommand(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    bad_mount(["frobnicate"], mnt, "frobnicate")
    bad_mount(["frobnicate", "--json", mnt], mnt, "frobnicate")


def test_daemonized_mount(tmp_path):
    """The plain form daemonizes; the mount is up when the command returns."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    write_file(src / "x", b"daemon\n")
    pid = None
    try:
        r = run(DEFERFS, src, mnt, "-o", "page_size=16k", timeout=20)
        assert r.returncode == 0, r.stderr
        assert is_mounted(mnt), "the mount must be up when the command returns"
        pid = daemon_pid_of(mnt)
        assert pid and pid_alive(pid)
        assert read_file(mnt / "x") == b"daemon\n"
        assert cli("stats", "--json", mnt).json["page_size"] == 16384
        r = cli("umount", mnt)
        assert r.rc == 0, r
        assert not is_mounted(mnt)
        assert wait_for(lambda: not pid_alive(pid), 10), "daemon still running after umount"
    finally:
        force_cleanup(mnt, pid=pid)


# ------------------------------------------------------------ mount(8), fstab

def test_mount_fuse3_helper_finds_deferfs_on_path(tmp_path):
    """mount.fuse3 (the helper mount(8) runs for fuse.* types) starts `deferfs`
    through PATH with the plain form's arguments."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    write_file(src / "x", b"via helper\n")
    env = dict(os.environ, PATH=os.path.dirname(DEFERFS) + ":" + os.environ.get("PATH", "/usr/bin:/bin"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(DEFERFS, bindir / "deferfs")
    env["PATH"] = f"{bindir}:{env['PATH']}"
    pid = None
    try:
        r = run("/sbin/mount.fuse3", src, mnt, "-t", "fuse.deferfs", "-o", "rw,page_size=8k", env=env,
                timeout=30)
        assert r.returncode == 0, r.stderr
        assert is_mounted(mnt)
        pid = daemon_pid_of(mnt)
        assert cli("stats", "--json", mnt).json["page_size"] == 8192
        assert read_file(mnt / "x") == b"via helper\n"
        r = cli("umount", mnt)
        assert r.rc == 0, r
        assert wait_for(lambda: not pid_alive(pid), 10)
    finally:
        force_cleanup(mnt, pid=pid)


# mount(8) drops PATH from the helper's environment (util-linux sanitizes it),
# so /bin/sh in mount.fuse3 looks in its default PATH. The scenario runs in a
# private mount namespace where /usr/local/bin is a directory holding only a
# `deferfs` link, so nothing outside is touched.
NS_SCRIPT = textwrap.dedent(r"""
    import json, os, subprocess, sys, time
    deferfs, bindir, src, mnt, fstab, form, pidfile = sys.argv[1:]
    out = {}
    def run(*cmd):
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
        return r.returncode, r.stdout, r.stderr
    def mounted():
        with open("/proc/self/mountinfo") as f:
            return any(l.split()[4] == mnt and " fuse.deferfs " in l for l in f)
    try:
        subprocess.run(["mount", "--bind", bindir, "/usr/local/bin"], check=True)
        if form == "t":
            out["mount"] = run("mount", "-t", "fuse.deferfs", src, mnt, "-o", "page_size=8k")
        else:
            out["mount"] = run("mount", "-T", fstab, mnt)
        out["mounted"] = mounted()
        if out["mounted"]:
            rc, so, se = run(deferfs, "stats", "--json", mnt)
            out["stats"] = json.loads(so) if rc == 0 else se
            if rc == 0:
                with open(pidfile, "w") as f:
                    f.write(str(out["stats"]["pid"]))
            with open(os.path.join(mnt, "x"), "rb") as f:
                out["x"] = f.read().decode()
            with open(os.path.join(mnt, "x"), "r+b") as f:
                f.write(b"W")
            out["umount"] = run(deferfs, "umount", mnt)
            out["mounted_after"] = mounted()
    finally:
        if mounted():
            run("fusermount3", "-u", mnt)
            time.sleep(0.5)
            if mounted():
                run("umount", "-l", mnt)
        run("umount", "-l", "/usr/local/bin")
    print(json.dumps(out))
""")


@pytest.mark.parametrize("form", ["t", "fstab"])
def test_mount_t_and_fstab(tmp_path, form):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    write_file(src / "x", b"via mount(8)\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(DEFERFS, bindir / "deferfs")
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# test fstab\n{src} {mnt} fuse.deferfs defaults,page_size=8k 0 0\n")
    script = tmp_path / "ns.py"
    script.write_text(NS_SCRIPT)
    pidfile = tmp_path / "pid"
    try:
        r = run("unshare", "-m", "--propagation", "private", sys.executable, script, DEFERFS, bindir, src, mnt,
                fstab, form, pidfile, timeout=90)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["mount"][0] == 0, out
        assert out["mounted"], out
        assert out["stats"]["page_size"] == 8192, out
        assert out["x"] == "via mount(8)\n", out
        assert out["umount"][0] == 0, out
        assert not out["mounted_after"], out
        assert read_file(src / "x") == b"Wia mount(8)\n", "deferfs umount syncs"
    finally:
        if pidfile.exists():
            pid = int(pidfile.read_text())
            if not wait_for(lambda: not pid_alive(pid), 10):
                os.kill(pid, 9)
