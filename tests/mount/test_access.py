"""Access (spec 8.1): with allow_other on a mount made by root, what a user
creates belongs to that user and every permission, ownership and timestamp
rule holds exactly as on the source; only the mounting user and root may
control a mount; without allow_other nobody else can enter it.

Runs operations as two temporary unprivileged users (made with useradd,
removed at the end whatever happens). Their files live in a directory under
/tmp that they can reach (pytest's own tmp_path is private to root).
"""

import errno
import glob
import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

from conftest import DEFERFS, force_cleanup, mountinfo, read_file, run, wait_for, write_file, FSTYPE

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("setpriv"),
                                reason="needs root, useradd and setpriv")

PY = "/usr/bin/python3"

# ------------------------------------------------------------------ users


class User:
    def __init__(self, name):
        pw = pwd.getpwnam(name)
        self.name = name
        self.uid = pw.pw_uid
        self.gid = pw.pw_gid

    def __repr__(self):
        return f"User({self.name}, uid={self.uid}, gid={self.gid})"


@pytest.fixture(scope="module")
def users():
    """Two fresh users A and B, each with a private group, and a group G that
    only A is a (supplementary) member of. Removed at teardown."""
    tag = f"{os.getpid() % 100000}"
    a, b, g = f"dfsa{tag}", f"dfsb{tag}", f"dfsg{tag}"
    made_users, made_groups = [], []
    try:
        run("groupadd", g, check=True)
        made_groups.append(g)
        for name, extra in ((a, ["-G", g]), (b, [])):
            run("useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", *extra, name,
                check=True)
            made_users.append(name)
        yield {"A": User(a), "B": User(b), "G": grp.getgrnam(g).gr_gid}
    finally:
        for name in made_users:
            run("userdel", "--force", name)
            run("groupdel", name)  # the user's own group, if userdel left it
        for name in made_groups:
            run("groupdel", name)
        for name in made_users + made_groups:
            try:
                pwd.getpwnam(name)
                leftover = True
            except KeyError:
                leftover = False
            assert not leftover, f"user {name} still exists after teardown"


# An agent run as a user: applies a list of operations, answers for each
# "OK", an errno name ("EACCES") or, for reads, the bytes read as text.
AGENT = textwrap.dedent(r"""
    import errno, json, os, sys

    def run(op, *a):
        if op == "umask":
            os.umask(a[0])
        elif op == "create":          # path, mode[, data]: O_CREAT|O_EXCL|O_WRONLY
            fd = os.open(a[0], os.O_CREAT | os.O_EXCL | os.O_WRONLY, a[1])
            try:
                if len(a) > 2:
                    os.write(fd, a[2].encode())
            finally:
                os.close(fd)
        elif op == "read":
            with open(a[0], "rb") as f:
                return f.read().decode(errors="replace")
        elif op == "write":           # path, data: O_WRONLY at offset 0, no truncation
            fd = os.open(a[0], os.O_WRONLY)
            try:
                os.write(fd, a[1].encode())
            finally:
                os.close(fd)
        elif op == "truncate":
            os.truncate(a[0], a[1])
        elif op == "mkdir":
            os.mkdir(a[0], a[1])
        elif op == "mkfifo":
            os.mkfifo(a[0], a[1])
        elif op == "symlink":
            os.symlink(a[0], a[1])
        elif op == "link":
            os.link(a[0], a[1])
        elif op == "unlink":
            os.unlink(a[0])
        elif op == "rmdir":
            os.rmdir(a[0])
        elif op == "rename":
            os.rename(a[0], a[1])
        elif op == "chmod":
            os.chmod(a[0], a[1])
        elif op == "chown":           # path, uid, gid (-1: unchanged)
            os.chown(a[0], a[1], a[2])
        elif op == "utime":           # path, [atime_ns, mtime_ns]
            os.utime(a[0], ns=tuple(a[1]))
        elif op == "utime_now":
            os.utime(a[0])
        elif op == "setxattr":
            os.setxattr(a[0], a[1], a[2].encode())
        elif op == "listdir":
            return sorted(os.listdir(a[0]))
        elif op == "stat":
            os.stat(a[0])
        else:
            raise SystemExit("unknown op " + op)
        return "OK"

    out = []
    for step in json.loads(sys.argv[1]):
        try:
            out.append(run(*step))
        except OSError as e:
            out.append(errno.errorcode.get(e.errno, str(e.errno)))
    print(json.dumps(out))
""")


def as_user(user, *cmd, timeout=60, cwd="/"):
    """Runs cmd with the user's uid, gid and supplementary groups."""
    return run("setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups", "--", *cmd,
               timeout=timeout, cwd=cwd)


def ops_as(user, steps):
    """Runs the agent as `user`; returns one answer per step."""
    r = as_user(user, PY, "-c", AGENT, json.dumps(steps))
    assert r.returncode == 0, f"agent as {user}: {r.stderr}"
    return json.loads(r.stdout)


# ------------------------------------------------------------ directories


@pytest.fixture
def shared():
    """A directory under /tmp that every user can reach: src (1777, like /tmp)
    and mnt. Removed at teardown unless something is still mounted below it."""
    top = tempfile.mkdtemp(prefix="deferfs-access-", dir="/tmp")
    os.chmod(top, 0o755)
    src, mnt = os.path.join(top, "src"), os.path.join(top, "mnt")
    os.mkdir(src)
    os.chmod(src, 0o1777)
    os.mkdir(mnt)
    try:
        yield {"top": top, "src": src, "mnt": mnt}
    finally:
        if not any(e["mountpoint"].startswith(top + "/") for e in mountinfo() if e["fstype"] == FSTYPE):
            shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def amnt(shared, mount_factory):
    """A root mount of shared/src on shared/mnt with allow_other."""
    return mount_factory(opts=["allow_other"], src=shared["src"], mnt=shared["mnt"])


def lstat_key(path):
    st = os.lstat(path)
    return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)


def sync_all(m):
    r = m.cli("sync", "--json", m.mnt)
    assert r.rc == 0, f"{r!r}\n{m.log()}"


# ------------------------------------------------------------------ tests


def test_what_a_user_creates_is_theirs(users, amnt):
    m = amnt
    A, B = users["A"], users["B"]
    for u in (A, B):
        d = m.m(u.name)
        steps = [
            ["umask", 0o022],
            ["mkdir", str(d), 0o755],
            ["create", f"{d}/file", 0o644, "data of " + u.name],
            ["create", f"{d}/readonly", 0o444, "written through a 0444 handle"],
            ["mkfifo", f"{d}/fifo", 0o600],
            ["symlink", "file", f"{d}/link"],
            ["mkdir", f"{d}/sub", 0o700],
            ["create", f"{d}/sub/deep", 0o600, "deep"],
        ]
        assert ops_as(u, steps) == ["OK"] * len(steps)
        # A hard link once the data is committed: a link changes the file's
        # ctime, which must not count as an outside change either way.
        sync_all(m)
        assert ops_as(u, [["link", f"{d}/file", f"{d}/hard"]]) == ["OK"]
        s = m.s(u.name)
        want = {
            "": (stat.S_IFDIR, 0o755),
            "file": (stat.S_IFREG, 0o644),
            "readonly": (stat.S_IFREG, 0o444),
            "fifo": (stat.S_IFIFO, 0o600),
            "link": (stat.S_IFLNK, 0o777),
            "hard": (stat.S_IFREG, 0o644),
            "sub": (stat.S_IFDIR, 0o700),
            "sub/deep": (stat.S_IFREG, 0o600),
        }
        for rel, (kind, mode) in want.items():
            path = os.path.join(s, rel) if rel else str(s)
            assert lstat_key(path) == (kind, mode, u.uid, u.gid), (u, rel)
            # The mount shows the same owner.
            mp = os.path.join(m.m(u.name), rel) if rel else str(m.m(u.name))
            assert lstat_key(mp) == (kind, mode, u.uid, u.gid), (u, rel)
        # What they wrote is staged, readable by its owner, and a root sync
        # commits it (the daemon's own handle on the file is root's, even for
        # a 0444 file or a 0600 file in a 0700 directory).
        assert ops_as(u, [["read", f"{d}/file"], ["read", f"{d}/readonly"], ["read", f"{d}/sub/deep"]]) == \
            ["data of " + u.name, "written through a 0444 handle", "deep"]
    sync_all(m)
    for u in (A, B):
        assert read_file(m.s(f"{u.name}/file")) == f"data of {u.name}".encode()
        assert read_file(m.s(f"{u.name}/readonly")) == b"written through a 0444 handle"
        assert read_file(m.s(f"{u.name}/sub/deep")) == b"deep"
    # Root still creates as root.
    write_file(m.m("rootfile"), b"r")
    os.mkdir(m.m("rootdir"))
    assert lstat_key(m.s("rootfile"))[2:] == (0, 0)
    assert lstat_key(m.s("rootdir"))[2:] == (0, 0)
    # Root with another gid (sg, newgrp): what it creates has that group
    # (the daemon switches only its fsgid for a root caller).
    code = (f"import os; os.setgid({A.gid}); os.mkdir({str(m.m('rootgid-dir'))!r});"
            f"open({str(m.m('rootgid-file'))!r}, 'w').close()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert lstat_key(m.s("rootgid-file"))[2:] == (0, A.gid)
    assert lstat_key(m.s("rootgid-dir"))[2:] == (0, A.gid)
    # And the next root request is served with the daemon's gid again.
    write_file(m.m("rootfile2"), b"r")
    assert lstat_key(m.s("rootfile2"))[2:] == (0, 0)


def test_callers_umask_applies_once(users, amnt):
    """The kernel applies the caller's umask; the daemon must not apply its own on top."""
    m = amnt
    A = users["A"]
    assert ops_as(A, [["umask", 0o002], ["create", str(m.m("um-file")), 0o666], ["mkdir", str(m.m("um-dir")), 0o777],
                      ["mkfifo", str(m.m("um-fifo")), 0o666]]) == ["OK"] * 4
    assert lstat_key(m.s("um-file"))[1] == 0o664
    assert lstat_key(m.s("um-dir"))[1] == 0o775
    assert lstat_key(m.s("um-fifo"))[1] == 0o664
    assert ops_as(A, [["umask", 0o077], ["create", str(m.m("um-private")), 0o666]]) == ["OK"] * 2
    assert lstat_key(m.s("um-private"))[1] == 0o600


def test_supplementary_groups_count(users, amnt):
    """A creates in a setgid directory of group G through A's supplementary
    membership in G; B, not a member, cannot."""
    m = amnt
    A, B, G = users["A"], users["B"], users["G"]
    os.mkdir(m.s("gdir"))
    os.chown(m.s("gdir"), 0, G)
    os.chmod(m.s("gdir"), 0o2770)
    d = m.m("gdir")
    assert ops_as(A, [["umask", 0o022], ["create", f"{d}/f", 0o644, "g"], ["mkdir", f"{d}/sub", 0o755]]) == ["OK"] * 3
    assert lstat_key(m.s("gdir/f")) == (stat.S_IFREG, 0o644, A.uid, G)
    st = os.lstat(m.s("gdir/sub"))
    assert (st.st_uid, st.st_gid) == (A.uid, G) and st.st_mode & stat.S_ISGID  # inherited setgid
    assert ops_as(B, [["create", f"{d}/b", 0o644], ["listdir", str(d)], ["read", f"{d}/f"]]) == \
        ["EACCES", "EACCES", "EACCES"]
    assert not os.path.exists(m.s("gdir/b"))
    # A can hand a file to G (a member), not to B's group.
    assert ops_as(A, [["create", str(m.m("a-own")), 0o644], ["chown", str(m.m("a-own")), -1, G],
                      ["chown", str(m.m("a-own")), -1, B.gid]]) == ["OK", "OK", "EPERM"]
    assert lstat_key(m.s("a-own"))[2:] == (A.uid, G)


def scenario(base, A, B, G):
    """(user, steps) in order: A makes files, B tries what it may and may not,
    A changes its own files. Paths under `base`, a 1777 root directory."""
    b = base
    t1 = [1_000_000_000_123_456_789, 1_100_000_000_987_654_321]
    return [
        (A, [
            ["umask", 0o022],
            ["create", f"{b}/a600", 0o600, "secret"],
            ["create", f"{b}/a644", 0o644, "public"],
            ["create", f"{b}/a666", 0o666],
            ["chmod", f"{b}/a666", 0o666],  # past the umask
            ["write", f"{b}/a666", "shared"],
            ["mkdir", f"{b}/adir", 0o755],
            ["create", f"{b}/adir/inner", 0o644, "inner"],
            ["symlink", "a644", f"{b}/alink"],
        ]),
        ("sync", None),
        (B, [
            ["read", f"{b}/a600"],
            ["write", f"{b}/a600", "B"],
            ["read", f"{b}/a644"],
            ["write", f"{b}/a644", "B"],
            ["truncate", f"{b}/a644", 0],
            ["chmod", f"{b}/a644", 0o777],
            ["chown", f"{b}/a644", B.uid, -1],
            ["chown", f"{b}/a644", -1, B.gid],
            ["utime", f"{b}/a644", t1],
            ["utime_now", f"{b}/a644"],
            ["utime_now", f"{b}/a666"],
            ["utime", f"{b}/a666", t1],
            ["setxattr", f"{b}/a644", "user.b", "x"],
            ["setxattr", f"{b}/a666", "trusted.b", "x"],
            ["setxattr", f"{b}/a666", "security.b", "x"],
            ["unlink", f"{b}/a644"],
            ["rename", f"{b}/a644", f"{b}/stolen"],
            ["create", f"{b}/adir/bfile", 0o644],
            ["mkdir", f"{b}/adir/bdir", 0o755],
            ["unlink", f"{b}/adir/inner"],
            ["listdir", f"{b}/adir"],
            ["read", f"{b}/alink"],
            ["link", f"{b}/a644", f"{b}/blink"],
            ["link", f"{b}/a666", f"{b}/blink666"],
            ["create", f"{b}/bfile", 0o640],
            ["chmod", f"{b}/bfile", 0o600],
            ["chown", f"{b}/bfile", -1, A.gid],
            ["chown", f"{b}/bfile", A.uid, -1],
            ["utime", f"{b}/bfile", t1],
            ["write", f"{b}/a666", "B"],
            ["write", f"{b}/bfile", "mine"],
        ]),
        ("sync", None),
        (A, [
            ["read", f"{b}/a600"],
            ["read", f"{b}/a666"],
            ["chmod", f"{b}/a644", 0o640],
            ["chown", f"{b}/a644", B.uid, -1],
            ["chown", f"{b}/a644", -1, G],
            ["utime", f"{b}/a644", t1],
            ["read", f"{b}/bfile"],
            ["unlink", f"{b}/bfile"],
            ["unlink", f"{b}/blink666"],
            ["truncate", f"{b}/a666", 2],
        ]),
        ("sync", None),
        (B, [
            ["read", f"{b}/a644"],
            ["read", f"{b}/alink"],
            ["unlink", f"{b}/bfile"],
        ]),
    ]


def run_scenario(base, A, B, G, sync):
    answers = []
    for who, steps in scenario(base, A, B, G):
        if who == "sync":
            sync()
        else:
            answers.append(ops_as(who, steps))
    return answers


def tree_state(top):
    """{rel: (type, mode, uid, gid, mtime_ns or None for dirs/links)} below top."""
    out = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            mt = st.st_mtime_ns if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, top)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                                            st.st_gid, mt)
    return out


def test_permission_rules_as_on_the_source(users, amnt):
    """The same operations by the same users give the same answers and leave the
    same owners, modes and explicit times through the mount as on the source."""
    m = amnt
    A, B, G = users["A"], users["B"], users["G"]
    for d in ("ref", "via"):
        os.mkdir(m.s(d))
        os.chmod(m.s(d), 0o1777)
    on_source = run_scenario(m.s("ref"), A, B, G, sync=lambda: None)
    via_mount = run_scenario(m.m("via"), A, B, G, sync=lambda: sync_all(m))
    steps = [s for who, s in scenario("X", A, B, G) if who != "sync"]
    for phase, (src_answers, mnt_answers) in enumerate(zip(on_source, via_mount)):
        for i, (a, b) in enumerate(zip(src_answers, mnt_answers)):
            assert a == b, f"phase {phase} step {steps[phase][i]}: source {a!r}, mount {b!r}\n{m.log()}"
    # The answers are the ones POSIX (and Linux's protected_hardlinks) give.
    b_answers = {(s[0], os.path.basename(str(s[1]))): a for s, a in zip(steps[1], via_mount[1])}
    expect = {
        ("read", "a600"): "EACCES", ("write", "a600"): "EACCES", ("read", "a644"): "public",
        ("write", "a644"): "EACCES", ("truncate", "a644"): "EACCES", ("chmod", "a644"): "EPERM",
        ("utime_now", "a644"): "EACCES", ("utime_now", "a666"): "OK", ("setxattr", "a644"): "EACCES",
        ("setxattr", "a666"): "EPERM",
        ("unlink", "a644"): "EPERM", ("rename", "a644"): "EPERM", ("create", "bfile"): "OK",
        ("mkdir", "bdir"): "EACCES", ("unlink", "inner"): "EACCES", ("read", "alink"): "public",
        ("chmod", "bfile"): "OK",
    }
    for key, want in expect.items():
        assert b_answers[key] == want, (key, b_answers[key])
    assert [a for s, a in zip(steps[1], via_mount[1]) if s[0] == "chown"] == ["EPERM"] * 4
    assert [a for s, a in zip(steps[1], via_mount[1]) if s[0] == "utime"] == ["EPERM", "EPERM", "OK"]
    assert via_mount[2][:2] == ["secret", "Bhared"]
    assert via_mount[2][2:] == ["OK", "EPERM", "OK", "OK", "EACCES", "EPERM", "OK", "OK"]
    assert via_mount[3] == ["EACCES", "EACCES", "OK"]
    # The trees end up alike: owners, modes, explicitly set times.
    ref, via = tree_state(m.s("ref")), tree_state(m.s("via"))
    assert sorted(ref) == sorted(via)
    for rel in ref:
        r, v = ref[rel], via[rel]
        assert r[:4] == v[:4], (rel, r, v)
    assert ref["a644"][4] == via["a644"][4] == 1_100_000_000_987_654_321
    assert via["a600"][2:4] == (A.uid, A.gid) and via["a644"][1:4] == (0o640, A.uid, G)
    assert "bfile" not in via and "stolen" not in via and "blink" not in via
    # And the mount shows the same owners and modes as the source.
    assert {rel: v[:4] for rel, v in tree_state(m.m("via")).items()} == {rel: v[:4] for rel, v in via.items()}


def test_other_users_cannot_control_the_mount(users, amnt):
    """status, sync, discard, stats by another user: 0 of 4 succeed (EACCES),
    and nothing staged or committed changes."""
    m = amnt
    A, B = users["A"], users["B"]
    write_file(m.s("root-file"), b"o" * 8192)
    with open(m.m("root-file"), "r+b") as f:
        f.write(b"R" * 4096)
    assert ops_as(A, [["create", str(m.m("a-file")), 0o644, "A" * 5000]]) == ["OK"]
    before_status = m.status()
    assert before_status["dirty_pages"] == 3, before_status
    before_source = {rel: read_file(m.s(rel)) for rel in ("root-file", "a-file")}
    succeeded = []
    for u in (A, B):
        for cmd in (["status"], ["sync"], ["discard"], ["stats"], ["status", "--json"], ["sync", "--json"],
                    ["discard", "--json"], ["stats", "--json"], ["sync", "--force"]):
            r = as_user(u, DEFERFS, *cmd, str(m.mnt), timeout=30)
            if r.returncode == 0:
                succeeded.append((u.name, cmd))
            assert r.returncode == 1, (u, cmd, r.returncode, r.stdout, r.stderr)
            assert "permission denied" in r.stderr.lower() or "EACCES" in r.stderr, (u, cmd, r.stderr)
            # From inside the mount too (PATH defaults to the current directory).
        r = as_user(u, DEFERFS, "status", cwd=str(m.mnt), timeout=30)
        assert r.returncode == 1 and "permission denied" in r.stderr.lower(), (u, r.stderr)
        r = as_user(u, DEFERFS, "umount", str(m.mnt), timeout=30)
        assert r.returncode != 0, (u, r.stdout, r.stderr)
        assert m.mounted()
    assert succeeded == []
    assert m.status() == before_status
    assert {rel: read_file(m.s(rel)) for rel in ("root-file", "a-file")} == before_source
    s = m.stats()
    assert s["synced_bytes"] == 0 and s["dirty_pages"] == 3, s
    # The socket itself, spoken to directly, refuses every op, umount included.
    sock = os.getxattr(str(m.mnt), "user.deferfs.control").decode()
    probe = textwrap.dedent("""
        import json, socket, sys
        out = []
        for op in ["status", "sync", "discard", "stats", "umount"]:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(10)
            s.connect(sys.argv[1])
            req = {"version": 1, "op": op}
            if op in ("status", "sync", "discard"):
                req["paths"] = [""]
            try:
                s.send(json.dumps(req).encode())
            except OSError:
                pass
            out.append(json.loads(s.recv(65536)))
            s.close()
        print(json.dumps(out))
    """)
    r = as_user(B, PY, "-c", probe, sock)
    assert r.returncode == 0, r.stderr
    for reply in json.loads(r.stdout):
        assert reply["ok"] is False and reply["errno"] == "EACCES", reply
    assert m.mounted()
    assert m.status() == before_status
    # The owner (root) still can.
    sync_all(m)
    assert read_file(m.s("root-file")) == b"R" * 4096 + b"o" * 4096


def test_without_allow_other_others_cannot_enter(users, shared, mount_factory):
    m = mount_factory(src=shared["src"], mnt=shared["mnt"])
    write_file(m.s("f"), b"hello")
    assert read_file(m.m("f")) == b"hello"  # root, who mounted, can
    for u in (users["A"], users["B"]):
        assert ops_as(u, [["stat", str(m.mnt)], ["listdir", str(m.mnt)], ["read", str(m.m("f"))],
                          ["create", str(m.m("new")), 0o644]]) == ["EACCES"] * 4
        r = as_user(u, DEFERFS, "status", str(m.mnt), timeout=30)
        assert r.returncode != 0, r
        # The source itself is open to them: only the mount is closed.
        assert ops_as(u, [["read", str(m.s("f"))]]) == ["hello"]
    assert not os.path.exists(m.s("new"))


# ------------------------------------------------ the source's .deferfs


def xxh64(data):
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("xxhash") or "libxxhash.so.0"
    lib = ctypes.CDLL(name)
    lib.XXH64.restype = ctypes.c_uint64
    lib.XXH64.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64]
    return lib.XXH64(data, len(data), 0)


def journal_bytes(records):
    """A complete sync journal (journal.h format) for [(path, dev, ino, data)]."""
    import struct
    body = b""
    for path, dev, ino, data in records:
        body += b"F" + struct.pack("<I", len(path)) + path + struct.pack("<QQQ", dev, ino, len(data))
        body += b"W" + struct.pack("<QQ", 0, len(data)) + data + b"E"
    return b"DFJ1" + struct.pack("<I", 1) + body + b"T" + struct.pack("<QQ", len(body), xxh64(body))


def test_planted_journal_cannot_write_outside_the_source(users, shared, mount_factory):
    """A user who may write to the source's root can create its hidden
    .deferfs directory before root mounts it. A journal planted there must not
    make the root daemon write anywhere: not to files outside the source
    (named by absolute path or through '..', with their real dev/ino, which
    anyone can stat), not to files of other users inside it."""
    A, B = users["A"], users["B"]
    victims = {}
    for name in ("outside-abs", "outside-dotdot"):
        p = os.path.join(shared["top"], name)
        write_file(p, b"root's data\n")
        os.chmod(p, 0o644)
        victims[p] = b"root's data\n"
    inside = os.path.join(shared["src"], "b-file")
    assert ops_as(B, [["create", inside, 0o644, "B's data\n"]]) == ["OK"]
    victims[inside] = b"B's data\n"
    records = []
    for p, rel in ((os.path.join(shared["top"], "outside-abs"), None),
                   (os.path.join(shared["top"], "outside-dotdot"), b"../outside-dotdot"),
                   (inside, b"b-file")):
        st = os.stat(p)
        records.append((rel or p.encode(), st.st_dev, st.st_ino, b"written by a planted journal\n"))
    plant = textwrap.dedent("""
        import os, sys
        d = os.path.join(sys.argv[1], ".deferfs")
        os.mkdir(d, 0o777)
        os.chmod(d, 0o777)
        with open(os.path.join(d, "journal"), "wb") as f:
            f.write(bytes.fromhex(sys.argv[2]))
    """)
    r = as_user(A, PY, "-c", plant, shared["src"], journal_bytes(records).hex())
    assert r.returncode == 0, r.stderr
    m = mount_factory(opts=["allow_other"], src=shared["src"], mnt=shared["mnt"], wait=False)
    # Refusing to mount is acceptable; mounting and ignoring the journal too.
    wait_for(lambda: m.mounted() or m.proc.poll() is not None, 10)
    for p, data in victims.items():
        assert read_file(p) == data, f"{p} was overwritten by a journal that {A.name} planted\n{m.log()}"
