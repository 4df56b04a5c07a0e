"""Readahead within budget (issue 5, point 3): one file streamed through a
small cache does not push out the pages another file touched recently, and
a single reader cannot take the whole cache."""
import json
import os
import subprocess
import time

DEFERFS = os.environ.get("DEFERFS") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                     "../../build/src/deferfs")
MiB = 1 << 20


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.realpath(path) for line in f)


def stats(mnt):
    return json.loads(subprocess.run([DEFERFS, "stats", "--json", str(mnt)], capture_output=True, text=True,
                                     check=True).stdout)


def read_all(path):
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the kernel's cache of the mount: gone
    data = b""
    while chunk := os.read(fd, MiB):
        data += chunk
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    return data


def test_streaming_file_does_not_evict_a_hot_one(tmp_path):
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    hot = os.urandom(4 * MiB)
    (src / "hot").write_bytes(hot)
    with open(src / "stream", "wb") as f:
        for _ in range(96):
            f.write(os.urandom(MiB))
    proc = subprocess.Popen([DEFERFS, str(src), str(mnt), "-f", "-o", "cache_size=16M"])
    try:
        end = time.time() + 10
        while not mounted(mnt):
            assert time.time() < end and proc.poll() is None
            time.sleep(0.02)
        # The hot file is touched, and touched again while the other streams.
        assert read_all(mnt / "hot") == hot
        fd = os.open(mnt / "stream", os.O_RDONLY)
        for i in range(96):
            os.pread(fd, MiB, i * MiB)
            if i % 8 == 0:
                assert read_all(mnt / "hot") == hot
        os.close(fd)
        before = stats(mnt)
        assert read_all(mnt / "hot") == hot
        after = stats(mnt)
        reloaded = after["loaded_bytes"] - before["loaded_bytes"]
        # The hot file stayed in the cache: (almost) nothing loaded again.
        assert reloaded <= 512 * 1024, f"{reloaded} bytes of the hot file were evicted and reloaded"
        assert after["evicted_bytes"] >= 64 * MiB, after  # the streaming file paid
        assert after["materialized_bytes"] <= 16 * MiB + 8 * MiB, after
    finally:
        subprocess.run([DEFERFS, "umount", "--discard", str(mnt)], capture_output=True, timeout=60)
        if mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)])
        rc = proc.wait(timeout=30)
    assert rc == 0, f"the daemon exited with status {rc}"  # issue 16.6
