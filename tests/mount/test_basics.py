"""What is not file data behaves as on the source (spec 4.5), the hidden
.deferfs directory (spec 3), namespace operations reach the source at once
(spec 6.6), and `deferfs DIR DIR` (spec 3)."""

import errno
import os
import stat
import threading

import pytest

from conftest import is_mounted, read_file, run, src_names, write_file


def make_tree(src):
    """A source tree with every kind of entry. Returns the list of relative paths."""
    (src / "dir" / "sub").mkdir(parents=True)
    write_file(src / "small.txt", b"hello, deferfs\n")
    write_file(src / "dir" / "nested.bin", os.urandom(10000))
    write_file(src / "dir" / "sub" / "empty", b"")
    write_file(src / "dir" / "sub" / ".hidden", b"dot file\n")
    os.chmod(src / "small.txt", 0o640)
    os.chown(src / "dir" / "nested.bin", 1001, 1002)
    os.symlink("small.txt", src / "link_rel")
    os.symlink("/etc/hostname", src / "link_abs")
    os.symlink("does/not/exist", src / "link_dangling")
    os.symlink("dir/sub", src / "link_dir")
    os.mkfifo(src / "fifo", 0o600)
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(src / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    os.link(src / "small.txt", src / "dir" / "hardlink")
    os.utime(src / "dir" / "nested.bin", ns=(1_000_000_123, 1_500_000_000_987_654_321))
    # deferfs' own state directory on the source: never shown by the mount.
    (src / ".deferfs").mkdir()
    write_file(src / ".deferfs" / "secret", b"not for clients\n")
    # A .deferfs below the root is an ordinary name.
    (src / "dir" / ".deferfs").mkdir()
    paths = []
    for root, dirs, files in os.walk(src):
        rel_root = os.path.relpath(root, src)
        if rel_root == ".":
            dirs[:] = [d for d in dirs if d != ".deferfs"]
        for name in dirs + files:
            paths.append(os.path.normpath(os.path.join(rel_root, name)))
    return sorted(paths)


def stat_key(st):
    return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_nlink, st.st_uid, st.st_gid,
            st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_rdev, st.st_blocks)


@pytest.fixture
def tree(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    paths = make_tree(src)
    return mount_factory(), paths


def test_lstat_of_every_entry_matches_source(tree):
    m, paths = tree
    for rel in paths:
        s = os.lstat(m.s(rel))
        t = os.lstat(m.m(rel))
        assert stat_key(t) == stat_key(s), rel


def test_readdir_matches_source_and_hides_state_dir(tree):
    m, paths = tree
    for rel in [""] + [p for p in paths if os.path.isdir(m.s(p)) and not os.path.islink(m.s(p))]:
        want = sorted(os.listdir(m.s(rel)))
        if rel == "":
            want.remove(".deferfs")
        assert sorted(os.listdir(m.m(rel))) == want, rel
        # d_type of every entry as on the source
        for e in os.scandir(m.m(rel)):
            se = m.s(rel) / e.name
            assert e.is_dir(follow_symlinks=False) == (stat.S_ISDIR(os.lstat(se).st_mode)), e.path
            assert e.is_symlink() == os.path.islink(se), e.path
            assert e.is_file(follow_symlinks=False) == stat.S_ISREG(os.lstat(se).st_mode), e.path
    assert ".deferfs" in os.listdir(m.m("dir")), "only the root's .deferfs is hidden"


def test_ls_output_matches_source(tree):
    m, _ = tree
    for rel in ["", "dir", "dir/sub"]:
        a = run("ls", "-ln", "--time-style=full-iso", m.s(rel), check=True).stdout.splitlines()
        b = run("ls", "-ln", "--time-style=full-iso", m.m(rel), check=True).stdout.splitlines()
        if rel == "":
            a = [line for line in a if not line.endswith(" .deferfs")]
            # "total" counts the hidden dir's blocks on the source only.
            a = [line for line in a if not line.startswith("total")]
            b = [line for line in b if not line.startswith("total")]
        assert b == a, rel


def test_file_contents_and_symlinks(tree):
    m, paths = tree
    for rel in paths:
        s = m.s(rel)
        if os.path.islink(s):
            assert os.readlink(m.m(rel)) == os.readlink(s), rel
        elif stat.S_ISREG(os.lstat(s).st_mode):
            assert read_file(m.m(rel)) == read_file(s), rel
    # Following symlinks through the mount
    assert read_file(m.m("link_rel")) == b"hello, deferfs\n"
    assert sorted(os.listdir(m.m("link_dir"))) == [".hidden", "empty"]
    assert not os.path.exists(m.m("link_dangling"))
    assert os.path.lexists(m.m("link_dangling"))


def test_fifo_through_mount_works(tree):
    m, _ = tree
    fifo = m.m("fifo")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    got = []

    def reader():
        with open(fifo, "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    with open(fifo, "wb") as f:
        f.write(b"through the fifo\n")
    t.join(10)
    assert not t.is_alive()
    assert got == [b"through the fifo\n"]


def test_device_nodes(tree):
    m, _ = tree
    st = os.lstat(m.m("null"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    st = os.lstat(m.m("blk"))
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 200)


def test_device_node_opens_with_dev_option(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    m = mount_factory(opts=["dev"])
    with open(m.m("null"), "wb") as f:
        f.write(b"x" * 100)  # /dev/null swallows it
    assert read_file(m.m("null")) == b""
    assert read_file(m.s("null")) == b""


def test_mknod_through_mount(mnt):
    os.mknod(mnt.m("newfifo"), stat.S_IFIFO | 0o640)
    os.mknod(mnt.m("newchr"), stat.S_IFCHR | 0o600, os.makedev(1, 5))
    st = os.lstat(mnt.s("newfifo"))
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 & ~current_umask()
    st = os.lstat(mnt.s("newchr"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 5)


def current_umask():
    u = os.umask(0)
    os.umask(u)
    return u


# ---------------------------------------------------------------- .deferfs

@pytest.mark.parametrize("exists_on_source", [True, False])
def test_state_dir_hidden_and_not_creatable(mount_factory, tmp_path, exists_on_source):
    src = tmp_path / "src"
    src.mkdir()
    write_file(src / "f", b"f\n")
    if exists_on_source:
        (src / ".deferfs").mkdir()
        write_file(src / ".deferfs" / "secret", b"x")
    m = mount_factory()
    hidden = m.m(".deferfs")
    assert ".deferfs" not in os.listdir(m.mnt)
    assert not os.path.lexists(hidden)
    with pytest.raises(FileNotFoundError):
        os.stat(hidden)
    with pytest.raises(FileNotFoundError):
        os.stat(hidden / "secret")
    with pytest.raises(OSError):
        os.mkdir(hidden)
    with pytest.raises(OSError):
        os.open(hidden, os.O_CREAT | os.O_WRONLY, 0o644)
    with pytest.raises(OSError):
        os.symlink("f", hidden)
    with pytest.raises(OSError):
        os.link(m.m("f"), hidden)
    with pytest.raises(OSError):
        os.mknod(hidden, stat.S_IFIFO | 0o600)
    with pytest.raises(OSError):
        os.rename(m.m("f"), hidden)
    assert read_file(m.s("f")) == b"f\n", "a refused rename must not move the file"
    if exists_on_source:
        # instance.ID: the live mount's lock (issue 13).
        assert [n for n in os.listdir(m.s(".deferfs")) if not n.startswith("instance.")] == ["secret"]
        with pytest.raises(OSError):
            os.rmdir(hidden)
        with pytest.raises(OSError):
            os.unlink(hidden / "secret")
        assert read_file(m.s(".deferfs/secret")) == b"x"
    elif os.path.lexists(m.s(".deferfs")):
        # deferfs may make its own state directory; nothing of ours got in.
        assert stat.S_ISDIR(os.lstat(m.s(".deferfs")).st_mode)
    assert src_names(m.s()) == ["f"]
    assert ".deferfs" not in os.listdir(m.mnt)


# ---------------------------------------------------------------- namespace ops

def test_create_reaches_source_while_open(mnt):
    fd = os.open(mnt.m("new"), os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    try:
        st = os.lstat(mnt.s("new"))
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
    finally:
        os.close(fd)
    assert os.path.exists(mnt.s("new"))


def test_mkdir_rmdir(mnt):
    os.mkdir(mnt.m("d"), 0o750)
    st = os.lstat(mnt.s("d"))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750 & ~current_umask()
    os.makedirs(mnt.m("d/e/f"))
    assert os.path.isdir(mnt.s("d/e/f"))
    with pytest.raises(OSError) as ei:
        os.rmdir(mnt.m("d/e"))
    assert ei.value.errno == errno.ENOTEMPTY
    os.rmdir(mnt.m("d/e/f"))
    assert not os.path.exists(mnt.s("d/e/f"))
    os.rmdir(mnt.m("d/e"))
    os.rmdir(mnt.m("d"))
    assert not os.path.exists(mnt.s("d"))
    assert not os.path.exists(mnt.m("d"))


def test_unlink(mnt):
    write_file(mnt.s("gone"), b"bye\n")
    assert read_file(mnt.m("gone")) == b"bye\n"
    os.unlink(mnt.m("gone"))
    assert not os.path.lexists(mnt.s("gone"))
    assert not os.path.lexists(mnt.m("gone"))
    with pytest.raises(FileNotFoundError):
        os.unlink(mnt.m("gone"))


def test_rename_file_and_dir(mnt):
    write_file(mnt.s("a"), b"A")
    write_file(mnt.s("b"), b"B")
    os.mkdir(mnt.s("d1"))
    write_file(mnt.s("d1/x"), b"X")
    os.rename(mnt.m("a"), mnt.m("a2"))
    assert read_file(mnt.s("a2")) == b"A" and not os.path.exists(mnt.s("a"))
    os.rename(mnt.m("a2"), mnt.m("b"))  # replaces b
    assert read_file(mnt.s("b")) == b"A" and not os.path.exists(mnt.s("a2"))
    assert read_file(mnt.m("b")) == b"A"
    os.rename(mnt.m("d1"), mnt.m("d2"))
    assert read_file(mnt.s("d2/x")) == b"X" and not os.path.exists(mnt.s("d1"))
    os.rename(mnt.m("b"), mnt.m("d2/b"))
    assert read_file(mnt.s("d2/b")) == b"A"
    assert sorted(os.listdir(mnt.m("d2"))) == ["b", "x"]


def test_hard_link(mnt):
    write_file(mnt.s("orig"), b"linked\n")
    os.link(mnt.m("orig"), mnt.m("alias"))
    s1, s2 = os.lstat(mnt.s("orig")), os.lstat(mnt.s("alias"))
    assert s1.st_ino == s2.st_ino and s1.st_nlink == 2
    assert os.lstat(mnt.m("orig")).st_nlink == 2
    assert read_file(mnt.m("alias")) == b"linked\n"


def test_symlink(mnt):
    os.symlink("some/target", mnt.m("sl"))
    assert os.readlink(mnt.s("sl")) == "some/target"
    assert os.readlink(mnt.m("sl")) == "some/target"
    assert stat.S_ISLNK(os.lstat(mnt.m("sl")).st_mode)


def test_chmod_chown(mnt):
    write_file(mnt.s("f"), b"x")
    os.mkdir(mnt.s("d"))
    os.chmod(mnt.m("f"), 0o4751)
    assert stat.S_IMODE(os.lstat(mnt.s("f")).st_mode) == 0o4751
    os.chmod(mnt.m("d"), 0o711)
    assert stat.S_IMODE(os.lstat(mnt.s("d")).st_mode) == 0o711
    os.chown(mnt.m("f"), 1234, 5678)
    st = os.lstat(mnt.s("f"))
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    st = os.lstat(mnt.m("f"))
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.symlink("f", mnt.m("sl"))
    os.chown(mnt.m("sl"), 42, 43, follow_symlinks=False)
    st = os.lstat(mnt.s("sl"))
    assert (st.st_uid, st.st_gid) == (42, 43)
    assert (os.lstat(mnt.s("f")).st_uid) == 1234


def test_utimes(mnt):
    write_file(mnt.s("f"), b"x")
    os.mkdir(mnt.s("d"))
    os.symlink("f", mnt.s("sl"))
    times = (1_111_111_111_123_456_789, 1_222_222_222_987_654_321)
    for rel in ["f", "d"]:
        os.utime(mnt.m(rel), ns=times)
        st = os.lstat(mnt.s(rel))
        assert (st.st_atime_ns, st.st_mtime_ns) == times, rel
        st = os.lstat(mnt.m(rel))
        assert st.st_mtime_ns == times[1], rel
    os.utime(mnt.m("sl"), ns=times, follow_symlinks=False)
    st = os.lstat(mnt.s("sl"))
    assert st.st_mtime_ns == times[1]
    assert os.lstat(mnt.s("f")).st_mtime_ns == times[1]  # set above, not changed by the link's
    os.utime(mnt.m("f"))  # now
    assert abs(os.lstat(mnt.s("f")).st_mtime - __import__("time").time()) < 60


def test_xattrs(mnt):
    write_file(mnt.s("f"), b"x")
    os.mkdir(mnt.s("d"))
    for rel in ["f", "d"]:
        os.setxattr(mnt.m(rel), "user.deferfs_test", b"value\x00bin")
        assert os.getxattr(mnt.s(rel), "user.deferfs_test") == b"value\x00bin", rel
        assert os.getxattr(mnt.m(rel), "user.deferfs_test") == b"value\x00bin", rel
        os.setxattr(mnt.s(rel), "user.from_source", b"src")
        assert os.getxattr(mnt.m(rel), "user.from_source") == b"src", rel
        names = os.listxattr(mnt.m(rel))
        assert "user.deferfs_test" in names and "user.from_source" in names, names
        os.removexattr(mnt.m(rel), "user.deferfs_test")
        assert "user.deferfs_test" not in os.listxattr(mnt.s(rel))
        with pytest.raises(OSError) as ei:
            os.getxattr(mnt.m(rel), "user.deferfs_test")
        assert ei.value.errno == errno.ENODATA
    with pytest.raises(OSError):
        os.setxattr(mnt.m("f"), "user.x", b"y", os.XATTR_REPLACE)
    assert "user.x" not in os.listxattr(mnt.s("f"))


def test_namespace_ops_seen_through_mount_at_once(mnt):
    """Namespace changes made through the mount are visible through it at once
    (no stale entry or attribute cache)."""
    write_file(mnt.m("f"), b"content")
    assert os.listdir(mnt.m()) == ["f"]
    os.rename(mnt.m("f"), mnt.m("g"))
    assert os.listdir(mnt.m()) == ["g"]
    assert not os.path.exists(mnt.m("f"))
    os.chmod(mnt.m("g"), 0o600)
    assert stat.S_IMODE(os.stat(mnt.m("g")).st_mode) == 0o600
    os.unlink(mnt.m("g"))
    assert os.listdir(mnt.m()) == []


# ---------------------------------------------------------------- DIR DIR

def test_mount_over_itself(mount_factory, tmp_path):
    d = tmp_path / "both"
    d.mkdir()
    write_file(d / "old.txt", b"old content\n")
    (d / "sub").mkdir()
    write_file(d / "sub" / "deep", b"deep\n")
    (d / ".deferfs").mkdir()
    m = mount_factory(src=d, mnt=d)
    assert is_mounted(d)
    assert sorted(os.listdir(d)) == ["old.txt", "sub"]
    assert read_file(d / "old.txt") == b"old content\n"
    assert read_file(d / "sub" / "deep") == b"deep\n"
    # A staged write, committed to the hidden directory underneath.
    with open(d / "old.txt", "r+b") as f:
        f.write(b"NEW")
    write_file(d / "created", b"created through the mount\n")
    r = m.sync()
    assert r.json["failed"] == [] and r.json["conflicts"] == []
    r = m.cli("umount", d)
    assert r.rc == 0, r
    assert m.wait_exit() is not None
    assert not is_mounted(d)
    assert read_file(d / "old.txt") == b"NEW content\n"
    assert read_file(d / "created") == b"created through the mount\n"
    assert sorted(os.listdir(d)) == [".deferfs", "created", "old.txt", "sub"]
