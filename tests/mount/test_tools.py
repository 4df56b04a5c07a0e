"""Ordinary tools work unchanged through the mount (spec 4.5)."""

import contextlib
import filecmp
import hashlib
import mmap
import os
import select
import subprocess
import time


from conftest import pread, read_file, run, src_names, write_file

PAGE = 4096
MiB = 1 << 20


def sh(*cmd, cwd=None, env=None, timeout=60, input=None):
    r = run(*cmd, cwd=cwd, env=env, timeout=timeout, input=input)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def populate(d):
    """A small tree with text, binary, an empty file, a subdir and a symlink."""
    (d / "docs" / "deep").mkdir(parents=True)
    write_file(d / "README", b"read me\n" * 100)
    write_file(d / "docs" / "a.txt", b"".join(b"line %d alpha\n" % i for i in range(2000)))
    write_file(d / "docs" / "deep" / "bin.dat", os.urandom(300_000))
    write_file(d / "docs" / "empty", b"")
    os.symlink("docs/a.txt", d / "link")
    os.chmod(d / "README", 0o640)


def trees_equal(a, b):
    """Recursive comparison of names, types, modes, symlink targets and contents
    (deferfs' own .deferfs at the root of a source is not part of the tree)."""
    for root, dirs, files in os.walk(a):
        rel = os.path.relpath(root, a)
        other = os.path.join(b, rel)
        if rel == ".":
            dirs[:] = [d for d in dirs if d != ".deferfs"]
        names = src_names(other) if rel == "." else sorted(os.listdir(other))
        assert sorted(dirs + files) == names, rel
        for name in files + dirs:
            pa, pb = os.path.join(root, name), os.path.join(other, name)
            sa, sb = os.lstat(pa), os.lstat(pb)
            assert sa.st_mode == sb.st_mode, pa
            if os.path.islink(pa):
                assert os.readlink(pa) == os.readlink(pb), pa
            elif os.path.isfile(pa):
                assert filecmp.cmp(pa, pb, shallow=False), pa
    return True


# ---------------------------------------------------------- simple tools

def test_cat_cp_dd_grep_tail(mnt, tmp_path):
    data = os.urandom(3 * MiB + 123)
    write_file(mnt.s("blob"), data)
    text = b"".join(b"row %05d %s\n" % (i, b"needle" if i % 100 == 7 else b"hay") for i in range(5000))
    write_file(mnt.s("text"), text)
    # cat
    assert subprocess.run(["cat", str(mnt.m("blob"))], capture_output=True, check=True).stdout == data
    # cp out of the mount and into it
    sh("cp", mnt.m("blob"), tmp_path / "out")
    assert read_file(tmp_path / "out") == data
    sh("cp", tmp_path / "out", mnt.m("blob2"))
    assert read_file(mnt.m("blob2")) == data
    # dd: a piece out, a patch in (in place, conv=notrunc)
    out = subprocess.run(["dd", f"if={mnt.m('blob')}", "bs=4096", "skip=100", "count=3", "status=none"],
                         capture_output=True, check=True).stdout
    assert out == data[100 * PAGE:103 * PAGE]
    patch = os.urandom(2 * PAGE)
    write_file(tmp_path / "patch", patch)
    sh("dd", f"if={tmp_path / 'patch'}", f"of={mnt.m('blob')}", "bs=4096", "seek=10", "conv=notrunc",
       "status=none")
    assert read_file(mnt.m("blob")) == data[:10 * PAGE] + patch + data[12 * PAGE:]
    assert read_file(mnt.s("blob")) == data
    # grep
    out = sh("grep", "-c", "needle", mnt.m("text"))
    assert out.strip() == "50"
    out = sh("grep", "-rl", "needle", mnt.m())
    assert out.split() == [str(mnt.m("text"))]
    # tail
    out = sh("tail", "-n", "2", mnt.m("text"))
    assert out == "row 04998 hay\nrow 04999 hay\n"
    assert mnt.status()["files"] != []
    mnt.sync()
    assert read_file(mnt.s("blob")) == data[:10 * PAGE] + patch + data[12 * PAGE:]
    assert read_file(mnt.s("blob2")) == data


def test_tail_f_sees_append_through_mount(mnt):
    write_file(mnt.s("log"), b"first line\n")
    p = subprocess.Popen(["tail", "-n", "+1", "-f", "-s", "0.1", str(mnt.m("log"))], stdout=subprocess.PIPE)
    try:
        def readline(timeout):
            r, _, _ = select.select([p.stdout], [], [], timeout)
            return p.stdout.readline() if r else None

        assert readline(10) == b"first line\n"
        with open(mnt.m("log"), "ab") as f:
            f.write(b"appended through the mount\n")
        assert readline(10) == b"appended through the mount\n"
        with open(mnt.m("log"), "ab") as f:
            f.write(b"and another\n")
        assert readline(10) == b"and another\n"
    finally:
        p.kill()
        p.wait()
    assert read_file(mnt.s("log")) == b"first line\n"


def test_tar_out_of_and_into_mount(mnt, tmp_path):
    populate(mnt.src)
    archive = tmp_path / "tree.tar"
    sh("tar", "-C", mnt.m(), "-cf", archive, ".")
    ref = tmp_path / "ref"
    ref.mkdir()
    sh("tar", "-C", ref, "-xf", archive)
    assert trees_equal(mnt.s(), ref)
    # Extract into the mount.
    os.mkdir(mnt.m("x"))
    sh("tar", "-C", mnt.m("x"), "-xf", archive)
    assert trees_equal(ref, mnt.m("x"))
    mnt.sync()
    assert trees_equal(ref, mnt.s("x"))


def test_rsync_in_and_out(mnt, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    populate(tree)
    sh("rsync", "-a", f"{tree}/", f"{mnt.m('r')}/")
    assert trees_equal(tree, mnt.m("r"))
    # An update: rsync writes a temporary file and renames it over the old one.
    write_file(tree / "docs" / "a.txt", b"changed\n" * 10)
    os.utime(tree / "docs" / "a.txt", (time.time() + 5, time.time() + 5))
    sh("rsync", "-a", f"{tree}/", f"{mnt.m('r')}/")
    assert trees_equal(tree, mnt.m("r"))
    # And in place (--inplace writes into the existing file).
    write_file(tree / "docs" / "deep" / "bin.dat", os.urandom(300_000))
    os.utime(tree / "docs" / "deep" / "bin.dat", (time.time() + 9, time.time() + 9))
    sh("rsync", "-a", "--inplace", f"{tree}/", f"{mnt.m('r')}/")
    assert trees_equal(tree, mnt.m("r"))
    out = tmp_path / "out"
    sh("rsync", "-a", f"{mnt.m('r')}/", f"{out}/")
    assert trees_equal(tree, out)
    # Checksum pass: nothing to transfer.
    listing = sh("rsync", "-a", "-c", "--itemize-changes", f"{tree}/", f"{mnt.m('r')}/")
    assert listing.strip() == "", listing
    mnt.sync()
    assert trees_equal(tree, mnt.s("r"))


def test_sed_in_place(mnt):
    write_file(mnt.s("conf"), b"name = old\nsize = 1\n")
    os.chmod(mnt.s("conf"), 0o640)
    sh("sed", "-i", "s/old/new/", mnt.m("conf"))
    assert read_file(mnt.m("conf")) == b"name = new\nsize = 1\n"
    assert os.stat(mnt.m("conf")).st_mode & 0o777 == 0o640
    assert sorted(os.listdir(mnt.m())) == ["conf"]
    mnt.sync()
    assert read_file(mnt.s("conf")) == b"name = new\nsize = 1\n"
    assert src_names(mnt.s()) == ["conf"]


GIT_ENV = dict(os.environ, GIT_AUTHOR_NAME="T", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="T",
               GIT_COMMITTER_EMAIL="t@example.com", GIT_CONFIG_NOSYSTEM="1", HOME="/nonexistent")


def test_git(mnt):
    repo = mnt.m("repo")
    os.mkdir(repo)
    g = lambda *a: sh("git", "-c", "init.defaultBranch=main", "-c", "safe.directory=*", *a,  # noqa: E731
                      cwd=repo, env=GIT_ENV)
    g("init", "-q")
    populate(repo)
    g("add", "-A")
    g("commit", "-q", "-m", "first")
    write_file(repo / "README", b"changed\n")
    g("commit", "-q", "-am", "second")
    log = g("log", "--format=%s")
    assert log.split() == ["second", "first"]
    assert g("status", "--porcelain") == ""
    g("fsck", "--full", "--strict")
    assert g("show", "HEAD~1:README") == "read me\n" * 100
    mnt.sync()
    # The source is a valid repository with the same history.
    env = GIT_ENV
    out = sh("git", "-c", "safe.directory=*", "log", "--format=%s", cwd=mnt.s("repo"), env=env)
    assert out.split() == ["second", "first"]
    sh("git", "-c", "safe.directory=*", "fsck", "--full", "--strict", cwd=mnt.s("repo"), env=env)


def test_sqlite3(mnt):
    db = mnt.m("app.db")
    script = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, blob BLOB);"]
    for tx in range(20):
        script.append("BEGIN;")
        for i in range(50):
            n = tx * 50 + i
            script.append(f"INSERT INTO t(id, v, blob) VALUES({n}, 'value {n}', randomblob(300));")
        script.append("COMMIT;")
    sh("sqlite3", db, input="\n".join(script))
    out = sh("sqlite3", db, "SELECT count(*), sum(id), max(v) FROM t;")
    assert out.strip() == f"1000|{sum(range(1000))}|value 999"
    assert sh("sqlite3", db, "PRAGMA integrity_check;").strip() == "ok"
    sh("sqlite3", db, "UPDATE t SET v = 'updated' WHERE id % 10 = 0; DELETE FROM t WHERE id >= 900;")
    assert sh("sqlite3", db, "SELECT count(*) FROM t WHERE v = 'updated';").strip() == "90"
    r = mnt.sync()
    assert r.json["failed"] == [] and r.json["conflicts"] == [], r.json
    sdb = mnt.s("app.db")
    assert sh("sqlite3", sdb, "PRAGMA integrity_check;").strip() == "ok"
    assert sh("sqlite3", sdb, "SELECT count(*), sum(v = 'updated') FROM t;").strip() == "900|90"


def test_sqlite3_wal(mnt):
    db = mnt.m("wal.db")
    sh("sqlite3", db, "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES(1),(2),(3);")
    assert sh("sqlite3", db, "SELECT sum(x) FROM t; PRAGMA integrity_check;").split() == ["6", "ok"]


# ---------------------------------------------------------------- mmap

@contextlib.contextmanager
def shared_map(path, write=False):
    """A MAP_SHARED mapping of the whole file at `path`, unmapped at the end."""
    with open(path, "r+b" if write else "rb") as f:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
        with mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, prot) as mm:
            yield mm


def test_mmap_shared_read(mnt):
    data = os.urandom(5 * MiB + 77)
    write_file(mnt.s("m.bin"), data)
    with shared_map(mnt.m("m.bin")) as mm:
        assert len(mm) == len(data)
        for off in [0, 4095, 1 * MiB + 5, 5 * MiB]:
            assert mm[off:off + 77] == data[off:off + 77]
        assert mm[:] == data


def test_mmap_shared_write_and_msync_commits(mnt):
    data = os.urandom(2 * MiB)
    write_file(mnt.s("m.bin"), data)
    with shared_map(mnt.m("m.bin"), write=True) as mm:
        mm[PAGE * 3:PAGE * 3 + 11] = b"hello, mmap"
        mm[MiB + 100:MiB + 104] = b"\x00\x01\x02\x03"
        # Visible through read(2) on the mount as well (after the kernel writes it back).
        mm.flush()  # msync(MS_SYNC): with fsync=commit, commits the file
        expected = bytearray(data)
        expected[PAGE * 3:PAGE * 3 + 11] = b"hello, mmap"
        expected[MiB + 100:MiB + 104] = b"\x00\x01\x02\x03"
        assert read_file(mnt.s("m.bin")) == bytes(expected)
        assert read_file(mnt.m("m.bin")) == bytes(expected)
    assert mnt.status()["files"] == []


def test_mmap_write_without_msync_is_seen_by_status_and_sync(mnt):
    """Pages written through a shared mapping stay in the kernel until it
    writes them back; `deferfs status` and `deferfs sync` ask it to first,
    as sync(1) would, so what was written is what is committed."""
    data = os.urandom(64 * PAGE)
    write_file(mnt.s("n.bin"), data)
    with shared_map(mnt.m("n.bin"), write=True) as mm:
        mm[PAGE * 5:PAGE * 5 + 9] = b"no msync!"
        assert [e["path"] for e in mnt.status()["files"]] == ["n.bin"]
        mnt.sync()
        expected = bytearray(data)
        expected[PAGE * 5:PAGE * 5 + 9] = b"no msync!"
        assert read_file(mnt.s("n.bin")) == bytes(expected)
    assert mnt.status()["files"] == []


def test_mmap_shared_write_is_staged_with_fsync_stage(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(MiB)
    write_file(src / "m.bin", data)
    m = mount_factory(opts=["fsync=stage"])
    with open(m.m("m.bin"), "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        mm[0:5] = b"XXXXX"
        mm.flush()
        mm.close()
    assert read_file(m.s("m.bin")) == data
    assert pread(m.m("m.bin"), 5, 0) == b"XXXXX"
    assert m.status()["dirty_pages"] == 1
    m.sync()
    assert read_file(m.s("m.bin"))[:5] == b"XXXXX"


def test_mmap_private_write_never_reaches_source(mnt):
    data = os.urandom(MiB)
    write_file(mnt.s("p.bin"), data)
    with open(mnt.m("p.bin"), "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            mm[0:7] = b"private"
            mm[PAGE * 100:PAGE * 100 + 4] = b"priv"
            assert mm[0:7] == b"private"
            mm.flush()
            os.fsync(f.fileno())
        finally:
            mm.close()
    assert read_file(mnt.m("p.bin")) == data
    assert mnt.status()["files"] == []
    mnt.sync()
    assert read_file(mnt.s("p.bin")) == data


def test_sha256sum_after_edits(mnt):
    data = bytearray(os.urandom(8 * MiB))
    write_file(mnt.s("h.bin"), bytes(data))
    with open(mnt.m("h.bin"), "r+b") as f:
        for off in [0, 3 * MiB + 17, 8 * MiB - 5]:
            f.seek(off)
            f.write(b"EDIT!")
            data[off:off + 5] = b"EDIT!"
    out = sh("sha256sum", mnt.m("h.bin"))
    assert out.split()[0] == hashlib.sha256(bytes(data)).hexdigest()
