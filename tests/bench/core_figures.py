#!/usr/bin/python3
"""The figures of the core issue, measured through a real deferfs mount.

Run as root (loop devices, drop_caches):  tests/bench/core_figures.py [--rounds N]
or `meson test -C build --benchmark core_figures`. Prints one line per figure
with the measured values, the baseline and the ratio. Never asserts timings;
exits 1 only if a correctness check (bytes, counts) fails.

  1. open + first 4 KiB of a 64 GiB sparse file (scattered data) vs a 1 MiB
     file, cold caches, fresh mount each round; and vs `cp` of a 4 GiB file
     into /dev/shm.
  2. 1000 random 4 KiB preads over a 4 GiB file: materialized and loaded
     bytes per touch, the daemon's RssAnon, every byte compared.
  3. 3 changed pages in a 4 GiB file on a loop-mounted ext4: pages written by
     sync and 4 KiB blocks the loop device saw; then `cp` of the same 4 GiB
     over the file through the mount: dirty pages and pages written.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

DEFERFS = os.environ.get("DEFERFS") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "../../build/src/deferfs")
GiB = 1 << 30
failures = []


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


class Mount:
    """A deferfs mount for the duration of a with-block; always cleaned up."""

    def __init__(self, src, mnt, *opts):
        self.src, self.mnt, self.opts = src, mnt, list(opts)

    def __enter__(self):
        cmd = [DEFERFS, self.src, self.mnt] + (["-o", ",".join(self.opts)] if self.opts else [])
        sh(*cmd)
        self.pid = self.stats()["pid"]
        return self

    def cli(self, *args):
        out = subprocess.run([DEFERFS, *args, self.mnt], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"deferfs {' '.join(args)}: {out.stderr.strip()}")
        return json.loads(out.stdout) if "--json" in args else out.stdout

    def stats(self):
        return self.cli("stats", "--json")

    def rss_anon(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __exit__(self, *exc):
        if mounted(self.mnt):
            subprocess.run([DEFERFS, "umount", "--discard", self.mnt], capture_output=True)
        if mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", self.mnt])
        for _ in range(300):  # the daemon frees its segments, then exits
            if not os.path.exists(f"/proc/{self.pid}"):
                break
            time.sleep(0.1)
        return False


def open_first_4k(path):
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    data = os.pread(fd, 4096, 0)
    os.close(fd)
    return time.perf_counter() - t0, data


def make_random_file(path, size):
    with open("/dev/urandom", "rb") as r, open(path, "wb") as w:
        left = size
        while left:
            n = min(left, 64 << 20)
            w.write(r.read(n))
            left -= n


def figure_open(work, rounds, big4g):
    src, mnt = os.path.join(work, "src1"), os.path.join(work, "mnt1")
    os.makedirs(src), os.makedirs(mnt)
    sparse = os.path.join(src, "sparse64g")
    with open(sparse, "wb") as f:
        f.truncate(64 * GiB)
        rnd = random.Random(7)
        for i in range(64):  # 64 x 64 KiB of data spread over the file
            f.seek(i * GiB + rnd.randrange(0, GiB - (1 << 16)) // 4096 * 4096 if i else 0)
            f.write(os.urandom(1 << 16))
    with open(os.path.join(src, "one1m"), "wb") as f:
        f.write(os.urandom(1 << 20))
    t_big, t_small = [], []
    for _ in range(rounds):
        for name, acc in (("sparse64g", t_big), ("one1m", t_small)):
            drop_caches()
            with Mount(src, mnt):
                dt, data = open_first_4k(os.path.join(mnt, name))
                with open(os.path.join(src, name), "rb") as f:
                    if data != f.read(4096):
                        failures.append(f"{name}: first 4 KiB differ from the source")
                acc.append(dt)
    t_cp = []
    for _ in range(max(1, rounds // 2)):
        drop_caches()
        t0 = time.perf_counter()
        sh("cp", big4g, "/dev/shm/deferfs-bench-cp")
        t_cp.append(time.perf_counter() - t0)
        os.unlink("/dev/shm/deferfs-bench-cp")
    mb, ms, mc = statistics.median(t_big), statistics.median(t_small), statistics.median(t_cp)
    print(f"[1] open+first 4 KiB, cold, {rounds} rounds: 64 GiB sparse {mb*1e6:.0f} us "
          f"(spread {min(t_big)*1e6:.0f}..{max(t_big)*1e6:.0f}), 1 MiB {ms*1e6:.0f} us "
          f"(spread {min(t_small)*1e6:.0f}..{max(t_small)*1e6:.0f}); ratio 64G/1M = {mb/ms:.2f} (target <= 3)")
    print(f"    cp of 4 GiB into /dev/shm: {mc:.2f} s; ratio cp / open+4K(64G) = {mc/mb:.0f}x (target >= 100)")


def figure_random(work, big4g, src_dir):
    mnt = os.path.join(work, "mnt2")
    os.makedirs(mnt)
    drop_caches()
    with Mount(src_dir, mnt) as m:
        s0 = m.stats()
        rnd = random.Random(1)
        fm = os.open(os.path.join(mnt, os.path.basename(big4g)), os.O_RDONLY)
        fs = os.open(big4g, os.O_RDONLY)
        pages = (4 * GiB) // 4096
        bad = 0
        for _ in range(1000):
            off = rnd.randrange(pages) * 4096
            if os.pread(fm, 4096, off) != os.pread(fs, 4096, off):
                bad += 1
        os.close(fm), os.close(fs)
        s1 = m.stats()
        anon = m.rss_anon()
    mat = s1["materialized_bytes"] / 1000
    loaded = (s1["loaded_bytes"] - s0["loaded_bytes"]) / 1000
    if bad:
        failures.append(f"random reads: {bad} of 1000 blocks differ from the source")
    print(f"[2] 1000 random 4 KiB preads over 4 GiB: {bad} mismatches; per touch materialized "
          f"{mat/1024:.1f} KiB, loaded {loaded/1024:.1f} KiB (target <= 128 KiB); "
          f"daemon RssAnon {anon/2**20:.1f} MiB (target < 64 MiB)")


def figure_sync(work, big4g, loopdir, src_dir, copy):
    mnt = os.path.join(work, "mnt3")
    os.makedirs(mnt)
    dev = os.path.basename(subprocess.run(["findmnt", "-n", "-o", "SOURCE", loopdir],
                                          capture_output=True, text=True, check=True).stdout.strip())

    def written_blocks():
        os.sync()
        with open(f"/sys/block/{dev}/stat") as f:
            return int(f.read().split()[6]) * 512 // 4096

    name = os.path.basename(big4g)
    with Mount(src_dir, mnt) as m:
        path = os.path.join(mnt, name)
        with open(path, "r+b") as f:
            for page in (100, 500_000, 1_000_000):
                f.seek(page * 4096 + 10)
                f.write(b"deferfs!")
        st = m.cli("status", "--json")
        w0 = written_blocks()
        r = m.cli("sync", "--json")
        w1 = written_blocks()
        print(f"[3] 3 changed pages of 4 GiB: status {st['dirty_pages']} dirty pages; sync wrote "
              f"{r['pages_written']} pages ({r['bytes_written']} bytes); the loop device saw "
              f"{w1 - w0} 4 KiB blocks (target: 3 + filesystem metadata)")
        if st["dirty_pages"] != 3 or r["pages_written"] != 3:
            failures.append("3 changed pages: status/sync did not count exactly 3")
        # cp of identical content over the file, through the mount.
        shutil.copyfile(big4g, copy)
        s0 = m.stats()
        t0 = time.perf_counter()
        sh("cp", copy, path)
        dt = time.perf_counter() - t0
        st = m.cli("status", "--json")
        w0 = written_blocks()
        r = m.cli("sync", "--json")
        w1 = written_blocks()
        s1 = m.stats()
        print(f"    cp of the same 4 GiB over it ({dt:.1f} s): {st['dirty_pages']} dirty pages, sync wrote "
              f"{r['pages_written']} pages, loop device {w1 - w0} blocks, skipped_pages "
              f"+{s1['skipped_pages'] - s0['skipped_pages']}")
        if st["dirty_pages"] != 0 or r["pages_written"] != 0:
            failures.append("cp of identical content: dirty pages or writes were not 0")
        os.unlink(copy)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", default="/var/tmp")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("core_figures: needs root (loop devices, drop_caches)", file=sys.stderr)
        return 77
    work = tempfile.mkdtemp(prefix="deferfs-bench-", dir=args.workdir)
    loopdir = os.path.join(work, "lo")
    img = os.path.join(work, "ext4.img")
    try:
        os.makedirs(loopdir)
        with open(img, "wb") as f:
            f.truncate(6 * GiB)
        sh("mkfs.ext4", "-q", "-F", img)
        sh("mount", "-o", "loop", img, loopdir)
        src_dir = os.path.join(loopdir, "src")
        os.makedirs(src_dir)
        big4g = os.path.join(src_dir, "random4g")
        make_random_file(big4g, 4 * GiB)
        figure_open(work, args.rounds, big4g)
        figure_random(work, big4g, src_dir)
        figure_sync(work, big4g, loopdir, src_dir, os.path.join(work, "copy4g"))
    finally:
        for d in os.listdir(work):
            p = os.path.join(work, d)
            if os.path.isdir(p) and mounted(p) and p != loopdir:
                subprocess.run(["fusermount3", "-uz", p])
        if mounted(loopdir):
            subprocess.run(["umount", loopdir])
        shutil.rmtree(work, ignore_errors=True)
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
