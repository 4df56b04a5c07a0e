#!/usr/bin/python3
"""FUSE over io_uring vs /dev/fuse vs the peer, in one run (issue 12).

Run as root:  tests/bench/transport_bench.py [--rounds 3] [--size 1G] [--workdir /var/tmp]
or `meson test -C build --benchmark transport_bench`.

One random-data file on the real disk (under --workdir) and a directory of
--meta-files small files, copied into one source directory per mount (two
deferfs mounts of one source would share their shared-memory segment names);
three mounts at once: deferfs with transport=uring, deferfs with transport=dev, and the peer
(passthrough_hp, /work/shared/peer/peer-deferfs or $PEER). enable_uring is
held at Y for the run and put back (tests/mount/uring_param.py). In each
round every case is measured on each side in turn (direct, uring, dev, peer):

  e  random 4 KiB reads served from the segments: every page in deferfs's
     segments (the file read whole through that mount first, checked against
     the source's sha1), the source hot, the mount's kernel cache dropped
     with posix_fadvise(DONTNEED); the peer reads the hot source through its
     mount with its kernel cache dropped the same way. --rand-ios IOs.
  c  sequential 1 MiB reads served from the segments (same preparation)
  a  sequential 1 MiB reads, all caches dropped (cold)
  d  random 4 KiB reads, all caches dropped (cold), --cold-rand-ios IOs
  w  sequential 1 MiB writes of --write-size into a new file (then removed)
  s  stat of --meta-files files, dentries and inodes dropped first (LOOKUPs)
  u  create + unlink of --meta-files files (pairs per second)

fio runs with ioengine=psync, one job, --invalidate=0 (every cache drop is
done here). Prints per case the median of each side with the spread
(min..max), uring/direct and uring/dev, the issue's target, the daemons' CPU
time per run, and the loadavg of each round. Never asserts a timing: exits 1
only when bytes differ or a mount does not use the transport it was given,
77 when not root.
"""
import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "mount"))
import benchlib  # noqa: E402
import uring_param  # noqa: E402
from benchlib import (GiB, MiB, Mount, drop_caches, fadvise_dontneed, loadavg, make_random_file,  # noqa: E402
                      mounted, read_all, resident_bytes, term_as_interrupt)

PEER = os.environ.get("PEER", "/work/shared/peer/peer-deferfs")
SIDES = ("direct", "uring", "dev", "peer")
# case -> (title, unit, target as text, check(results) -> bool or None)
CASES = {
    "e": ("rand 4 KiB from segments, src hot", "IOPS", "uring >= 0.30 direct, >= 3x dev"),
    "c": ("seq 1 MiB from segments, src hot", "MiB/s", "uring >= 0.60 direct"),
    "a": ("seq 1 MiB, all caches dropped", "MiB/s", "uring >= dev"),
    "d": ("rand 4 KiB, all caches dropped", "IOPS", "uring >= dev"),
    "w": ("seq 1 MiB writes (new file)", "MiB/s", "uring >= dev"),
    "s": ("stat of N files, dentries dropped", "ops/s", "uring >= 1.5x dev"),
    "u": ("create + unlink of N files", "pairs/s", "uring >= 1.5x dev"),
}
failures = []


def fail(msg):
    print("FAILED:", msg, flush=True)
    failures.append(msg)


def fio(path, rw, bs, size, extra=()):
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", "--ioengine=psync",
           "--invalidate=0", f"--size={size}", "--output-format=json", *extra]
    if rw in ("read", "randread"):
        cmd.append("--readonly")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        errs = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if "err" in ln and ": 0" not in ln]
        raise RuntimeError(f"fio on {path} failed ({out.returncode}): {' '.join(errs)[:2000]}")
    j = json.loads(out.stdout[out.stdout.index("{"):])
    r = j["jobs"][0]["write" if rw == "write" else "read"]
    return {"bw": r["bw_bytes"] / MiB, "iops": r["iops"], "io_bytes": r["io_bytes"], "ios": r["total_ios"],
            "p50": r["clat_ns"]["percentile"].get("50.000000", 0) / 1000}


class PeerMount:
    """The peer (passthrough_hp behind deferfs's command line)."""

    def __init__(self, src, mnt):
        self.src, self.mnt, self.pid = src, mnt, None

    def __enter__(self):
        subprocess.run([PEER, self.src, self.mnt], check=True)
        return self

    def cpu_seconds(self):
        return float("nan")

    def __exit__(self, *exc):
        if mounted(self.mnt):
            subprocess.run([PEER, "umount", self.mnt], capture_output=True, timeout=120)
        if mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", self.mnt])
        return False


class Bench:
    def __init__(self, args, src_dirs, name, sha1, mounts):
        self.args, self.src_dirs, self.name, self.sha1, self.mounts = args, src_dirs, name, sha1, mounts
        self.src_dir = src_dirs["direct"]
        self.src = os.path.join(self.src_dir, name)
        self.size = os.path.getsize(self.src)
        self.results = {c: {s: [] for s in SIDES} for c in CASES}
        self.cpu = {c: {s: [] for s in SIDES} for c in CASES}
        self.checked = set()

    def root(self, side):
        return self.src_dir if side == "direct" else self.mounts[side].mnt

    def path(self, side, rel=None):
        return os.path.join(self.root(side), rel or self.name)

    def hot_source(self, side="direct"):
        src = os.path.join(self.src_dirs[side], self.name)
        if resident_bytes(src) < self.size:
            read_all(src)

    def prepare_from_segments(self, side):
        p = self.path(side)
        if side in ("uring", "dev"):
            st = self.mounts[side].stats()
            if side not in self.checked or st["materialized_bytes"] < self.size:
                n, digest = read_all(p)
                if n != self.size or digest != self.sha1:
                    fail(f"{side}: reading the file through the mount gave other bytes than the source")
                self.checked.add(side)
        self.hot_source(side)
        if side != "direct":
            fadvise_dontneed(p)
        if resident_bytes(os.path.join(self.src_dirs[side], self.name)) < self.size * 0.99:
            print(f"  note: source not fully hot for {side}", flush=True)

    def measure(self, case, side):
        m = self.mounts.get(side)
        a = self.args
        if case in ("e", "c"):
            self.prepare_from_segments(side)
        elif case in ("a", "d", "s", "u"):
            drop_caches()
            if case in ("a", "d") and side in ("uring", "dev"):
                # echo 3 evicts the inode, but deferfs keeps the snapshot's
                # segment as a cache (issue 15): a new mtime on the source
                # makes the next lookup drop it, so the read is cold here too.
                src = os.path.join(self.src_dirs[side], self.name)
                st = os.stat(src)
                os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
        loaded0 = m.stats()["loaded_bytes"] if side in ("uring", "dev") and case == "a" else 0
        cpu0 = m.cpu_seconds() if m else 0.0
        p = self.path(side)
        if case in ("c", "a"):
            r = fio(p, "read", "1M", self.size)
            value = r["bw"]
        elif case in ("e", "d"):
            n = a.rand_ios if case == "e" else a.cold_rand_ios
            r = fio(p, "randread", "4k", self.size,
                    [f"--number_ios={n}", "--randrepeat=1", "--randseed=3", "--random_generator=tausworthe64",
                     f"--runtime={a.rand_runtime}"])
            value = r["iops"]
        elif case == "w":
            target = self.path(side, f"w.{side}")
            r = fio(target, "write", "1M", a.write_size)
            value = r["bw"]
            os.unlink(target)
        elif case == "s":
            d = self.path(side, "meta")
            t0 = time.perf_counter()
            for i in range(a.meta_files):
                os.stat(f"{d}/f{i}")
            value = a.meta_files / (time.perf_counter() - t0)
            r = {"p50": 0}
        else:  # u
            d = self.path(side, f"cu.{side}")
            os.makedirs(d, exist_ok=True)
            t0 = time.perf_counter()
            for i in range(a.meta_files):
                os.close(os.open(f"{d}/n{i}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
            for i in range(a.meta_files):
                os.unlink(f"{d}/n{i}")
            value = a.meta_files / (time.perf_counter() - t0)
            os.rmdir(d)
            r = {"p50": 0}
        cpu = (m.cpu_seconds() - cpu0) if m else float("nan")
        if side in ("uring", "dev") and case == "a" and m.stats()["loaded_bytes"] - loaded0 < self.size * 0.9:
            print(f"  note: {side} served case a without loading the file from the source (not cold)", flush=True)
        self.results[case][side].append(value)
        self.cpu[case][side].append(cpu)
        print(f"  {case} {side:6s} {value:10.1f} {CASES[case][1]:7s} p50 {r['p50']:.0f} us"
              + (f"  daemon cpu {cpu:.2f} s" if m and cpu == cpu else ""), flush=True)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def print_table(b):
    print()
    print(f"medians of {b.args.rounds} rounds, (min..max) the spread; file {b.size / MiB:.0f} MiB, "
          f"{b.args.meta_files} files for s/u")
    hdr = (f"{'case':<44} {'unit':<7}" + "".join(f"{s:>24}" for s in SIDES)
           + f" {'uring/direct':>13} {'uring/dev':>10} {'uring/peer':>11}  target; daemon cpu uring/dev")
    print(hdr)
    print("-" * len(hdr))
    for c, (title, unit, target) in CASES.items():
        r = b.results[c]
        if not r["uring"]:
            continue
        cells = ""
        for s in SIDES:
            xs = r[s]
            cells += f"{med(xs):>10.0f} ({min(xs):.0f}..{max(xs):.0f})".rjust(24) if xs else f"{'-':>24}"
        u = med(r["uring"])
        ratio = lambda s: f"{u / med(r[s]):.2f}" if r[s] and med(r[s]) else "-"  # noqa: E731
        print(f"{c + ' ' + title:<44} {unit:<7}{cells} {ratio('direct'):>13} {ratio('dev'):>10} "
              f"{ratio('peer'):>11}  {target}; {med(b.cpu[c]['uring']):.2f}/{med(b.cpu[c]['dev']):.2f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--cases", default="ecadwsu")
    ap.add_argument("--rand-ios", type=int, default=100000)
    ap.add_argument("--cold-rand-ios", type=int, default=10000)
    ap.add_argument("--rand-runtime", type=int, default=60)
    ap.add_argument("--write-size", default="256M")
    ap.add_argument("--meta-files", type=int, default=10000)
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0 or not uring_param.available():
        print("transport_bench: needs root and " + uring_param.PARAM, file=sys.stderr)
        return 77
    if not shutil.which("fio"):
        print("transport_bench: fio is not installed", file=sys.stderr)
        return 77
    size = int(args.size[:-1]) << {"k": 10, "K": 10, "m": 20, "M": 20, "g": 30, "G": 30}[args.size[-1]] \
        if args.size[-1].isalpha() else int(args.size)
    term_as_interrupt()
    work = tempfile.mkdtemp(prefix="deferfs-transport-", dir=args.workdir)
    src_dirs = {s: os.path.join(work, "src-" + s) for s in SIDES[1:]}
    src_dirs["direct"] = src_dirs["uring"]
    mnts = {s: os.path.join(work, "mnt-" + s) for s in SIDES[1:]}
    for p in mnts.values():
        os.makedirs(p)
    try:
        benchlib.pin_binary(work)
        print(f"deferfs {benchlib.describe_binary(benchlib.DEFERFS)}; {os.cpu_count()} CPUs; "
              f"loadavg {loadavg()}", flush=True)
        first = src_dirs["uring"]
        os.makedirs(os.path.join(first, "meta"))
        sha1 = make_random_file(os.path.join(first, "data"), size)
        for i in range(args.meta_files):
            with open(os.path.join(first, "meta", f"f{i}"), "wb") as f:
                f.write(b"x")
        for s in ("dev", "peer"):
            subprocess.run(["cp", "-a", first, src_dirs[s]], check=True)
        os.sync()
        with uring_param.uring_enabled():
            state = os.path.join(work, "state")
            with Mount(src_dirs["uring"], mnts["uring"], "transport=uring,fsync=stage", state_dir=state) as mu, \
                 Mount(src_dirs["dev"], mnts["dev"], "transport=dev,fsync=stage", state_dir=state) as md:
                mounts = {"uring": mu, "dev": md}
                for side, m in mounts.items():
                    st = m.stats()
                    print(f"{side}: daemon pid {m.pid}, transport {st.get('transport')} "
                          f"({st.get('transport_reason')})", flush=True)
                    if st.get("transport") != side:
                        fail(f"the {side} mount serves through {st.get('transport')}")
                peer = None if args.no_peer or not os.access(PEER, os.X_OK) else PeerMount(src_dirs["peer"], mnts["peer"])
                if peer:
                    peer.__enter__()
                    mounts["peer"] = peer
                try:
                    sides = [s for s in SIDES if s == "direct" or s in mounts]
                    b = Bench(args, src_dirs, "data", sha1, mounts)
                    for rnd in range(1, args.rounds + 1):
                        print(f"round {rnd} (loadavg {loadavg()})", flush=True)
                        for c in args.cases:
                            for side in sides:
                                b.measure(c, side)
                    st = mu.stats()
                    print(f"requests served by each uring queue: {st['transport_queue_requests']}")
                    print_table(b)
                    print(f"loadavg at the end {loadavg()}")
                finally:
                    if peer:
                        peer.__exit__(None, None, None)
    finally:
        for p in mnts.values():
            if mounted(p):
                subprocess.run(["fusermount3", "-uz", p])
        shutil.rmtree(work, ignore_errors=True)
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
