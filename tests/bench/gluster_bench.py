#!/usr/bin/env python3
"""deferfs over GlusterFS (issue 13.4): traffic at the bricks and latency.

Starts a private replica-2 volume (tests/distributed/glusterlib.py), mounts
it through one gluster client and runs a deferfs mount of a directory on it.
Prints, never asserts:
- random reads: bytes read at the bricks (the glusterfsd processes' rchar) for
  N random 4 KiB reads of a SIZE file through deferfs, per touch, against the
  whole file a copy-based cache would read first;
- a sync of 3 changed pages: bytes written at the bricks (wchar, both replicas,
  metadata and journal included), against the whole file (twice) a copy-based
  cache would write back;
- open + first 4 KiB, cold (caches dropped), through deferfs vs directly on
  the gluster mount, median over FILES files;
- a sync of PAGES scattered pages vs pwrite + fsync of the same pages straight
  into the gluster mount.
rchar/wchar count every read/write syscall of the brick processes, the
network included: they bound the disk traffic from above.
Needs root and glusterfs-server.
"""
import argparse
import os
import random
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "../distributed"))
sys.path.insert(0, HERE)
import benchlib  # noqa: E402
from glusterlib import Gluster, mounted  # noqa: E402

PAGE = 4096
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def write_file(path, size, chunk=4 * MiB):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


class Mount:
    def __init__(self, src, mnt, log):
        os.makedirs(mnt, exist_ok=True)
        self.mnt = mnt
        self.proc = subprocess.Popen([benchlib.DEFERFS, src, mnt, "-f"], stderr=open(log, "a"))
        end = time.time() + 20
        while not mounted(mnt):
            if time.time() > end or self.proc.poll() is not None:
                raise RuntimeError("the deferfs mount did not appear: " + open(log).read())
            time.sleep(0.05)

    def cli(self, *args):
        return subprocess.run([benchlib.DEFERFS, *args, self.mnt], capture_output=True, text=True, timeout=600)

    def close(self):
        if self.proc.poll() is None:
            subprocess.run([benchlib.DEFERFS, "umount", "--discard", self.mnt], capture_output=True, timeout=600)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024, help="MiB of the random-read file (1024)")
    ap.add_argument("--reads", type=int, default=1000)
    ap.add_argument("--files", type=int, default=50, help="files for open + first 4 KiB")
    ap.add_argument("--pages", type=int, default=20000, help="scattered pages to sync")
    ap.add_argument("--workdir", default="/var/tmp")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("gluster_bench: needs root")
        return 77
    rnd = random.Random(13)
    g = Gluster(clients=1, workdir=args.workdir)
    m = None
    try:
        benchlib.pin_binary(g.dir)
        print("binary:", benchlib.describe_binary(benchlib.DEFERFS))
        print("load average at start:", open("/proc/loadavg").read().strip())
        src = os.path.join(g.mounts[0], "bench")
        os.mkdir(src)
        size = args.size * MiB
        big = os.path.join(src, "big")
        write_file(big, size)
        m = Mount(src, os.path.join(g.dir, "deferfs"), os.path.join(g.dir, "daemon.log"))

        # 1. Random 4 KiB reads: bytes read at the bricks per touch.
        drop_caches()
        r0, w0 = g.brick_io()
        fd = os.open(os.path.join(m.mnt, "big"), os.O_RDONLY)
        pages = size // PAGE
        for _ in range(args.reads):
            os.pread(fd, PAGE, rnd.randrange(pages) * PAGE)
        os.close(fd)
        r1, w1 = g.brick_io()
        per_touch = (r1 - r0) / args.reads
        print(f"random reads: {args.reads} x 4 KiB of a {args.size} MiB file: {(r1 - r0) / KiB:.0f} KiB read at "
              f"the bricks, {per_touch / KiB:.1f} KiB per touch (replica 2: reads are served by one replica; "
              f"target <= 128 KiB per touch per replica); a copy-based cache reads {size / MiB:.0f} MiB first")

        # 2. A sync of 3 changed pages: bytes written at the bricks.
        fd = os.open(os.path.join(m.mnt, "big"), os.O_WRONLY)
        for p in rnd.sample(range(pages), 3):
            os.pwrite(fd, os.urandom(PAGE), p * PAGE)
        os.close(fd)
        r0, w0 = g.brick_io()
        rc = m.cli("sync")
        r1, w1 = g.brick_io()
        if rc.returncode != 0:
            raise RuntimeError("sync failed: " + rc.stderr)
        print(f"sync of 3 changed pages: {(w1 - w0) / KiB:.0f} KiB written at the bricks (both replicas, "
              f"journal and metadata included; target <= 1024 KiB); a copy-based cache writes back "
              f"{2 * size / MiB:.0f} MiB")

        # 3. open + first 4 KiB, cold: deferfs vs the gluster mount directly.
        for side in ("d", "g"):
            os.mkdir(os.path.join(src, side))
            for i in range(args.files):
                write_file(os.path.join(src, side, f"f{i}"), 1 * MiB)
        times = {}
        for side, root in (("deferfs", os.path.join(m.mnt, "d")), ("direct", os.path.join(src, "g"))):
            drop_caches()
            t = []
            for i in range(args.files):
                t0 = time.perf_counter()
                fd = os.open(os.path.join(root, f"f{i}"), os.O_RDONLY)
                os.pread(fd, PAGE, 0)
                os.close(fd)
                t.append(time.perf_counter() - t0)
            times[side] = statistics.median(t)
        print(f"open + first 4 KiB, cold, median of {args.files}: deferfs {times['deferfs'] * 1e3:.2f} ms, "
              f"directly on gluster {times['direct'] * 1e3:.2f} ms, ratio {times['deferfs'] / times['direct']:.2f} "
              f"(target <= 1.5)")

        # 4. A sync of N scattered pages vs pwrite + fsync of them on gluster.
        span = max(args.pages * 3, 65536)
        for n in ("s_def", "s_dir"):
            write_file(os.path.join(src, n), span * PAGE)
        chosen = sorted(rnd.sample(range(span), args.pages))
        data = {p: os.urandom(PAGE) for p in chosen}
        fd = os.open(os.path.join(m.mnt, "s_def"), os.O_WRONLY)
        for p in chosen:
            os.pwrite(fd, data[p], p * PAGE)
        os.close(fd)
        os.sync()
        t0 = time.perf_counter()
        rc = m.cli("sync")
        t_def = time.perf_counter() - t0
        if rc.returncode != 0:
            raise RuntimeError("sync failed: " + rc.stderr)
        fd = os.open(os.path.join(src, "s_dir"), os.O_WRONLY)
        t0 = time.perf_counter()
        for p in chosen:
            os.pwrite(fd, data[p], p * PAGE)
        os.fsync(fd)
        t_dir = time.perf_counter() - t0
        os.close(fd)
        print(f"sync of {args.pages} scattered pages: deferfs sync {t_def * 1e3:.0f} ms, pwrite + fsync on "
              f"gluster {t_dir * 1e3:.0f} ms, ratio {t_def / t_dir:.2f} (target <= 2.0)")
        print("load average at end:", open("/proc/loadavg").read().strip())
    finally:
        if m:
            m.close()
        g.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
