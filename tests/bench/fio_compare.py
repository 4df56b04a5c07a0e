#!/usr/bin/python3
"""Reading a file through a deferfs mount vs reading its source directly (issue 3).

Run as root (drop_caches):  tests/bench/fio_compare.py [--rounds 3] [--workdir /var/tmp]
or `meson test -C build --benchmark fio_compare`.

Makes a 4 GiB file of random data on the real disk (under --workdir), mounts
deferfs over its directory and measures, with fio (ioengine=psync, one job,
--invalidate=0: every cache drop is done here, explicitly), in ONE run and in
alternating order (direct, mount, direct, mount, ... for each case and round):

  a  sequential 1 MiB reads, all caches dropped (echo 3 > drop_caches before
     each measurement; the kernel then also FORGETs the mount's inodes and
     deferfs drops the file's snapshot and segments: a cold read everywhere)
  b  sequential, second read: read once (the mount's read is also checked
     against the source's sha1), then measured again without dropping anything
  c  sequential, the mount's kernel cache dropped but every page in deferfs's
     segments, source hot. The mount's cache is dropped with
     posix_fadvise(POSIX_FADV_DONTNEED) on the file through the mount (FUSE
     does not forward fadvise: segments and the source's page cache stay);
     fincore(1) checks it (resident bytes of the mount's file ~0, of the
     source ~all) and the daemon's loaded_bytes must not grow while measuring.
     The direct baseline is the source read hot from the page cache.
  d  random 4 KiB reads, all caches dropped; --rand-ios IOs (same seed, hence
     the same offsets, on both sides); fio's default fadvise_hint=1 sets
     POSIX_FADV_RANDOM, so the kernel does no readahead on either side
  e  random 4 KiB, the mount's kernel cache dropped as in c, every page in the
     segments (the file is read whole through the mount first), source hot;
     --hot-rand-ios IOs on both sides

The daemon and the CLI run from a copy of the deferfs binary, and the
daemon's control socket lives in a private state_dir under the work
directory (others rebuild and mount on this shared machine: see benchlib.py).

Then open + first 4 KiB read with cold caches (drop_caches before each
sample), direct vs through the mount, median of --open-samples.

Prints a table: per case the median bandwidth (or IOPS) of each side with the
spread over the rounds (min..max), the ratio of the medians mount/direct with
the spread of the per-round ratios, passthrough_hp's figure from the issue and
the issue's target. Never asserts a timing: exits 1 only on a correctness
failure (bytes differ, a short read, a case whose preconditions did not hold),
77 when not root.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import (GiB, KiB, MiB, Mount, drop_caches, fadvise_dontneed,  # noqa: E402
                      loadavg, make_random_file, median_spread, mounted, read_all,
                      resident_bytes, term_as_interrupt)

# case -> (title, unit, passthrough_hp reference from the issue, target)
CASES = {
    "a": ("seq 1 MiB, all caches dropped", "MiB/s", "0.61", ">= 0.80", 0.80),
    "b": ("seq 1 MiB, second read (kernel keeps mount's pages)", "MiB/s", "0.89", ">= 0.90", 0.90),
    "c": ("seq 1 MiB, mount cache dropped, pages in segments, src hot", "MiB/s", "0.27 (--nocache)",
          ">= 0.50", 0.50),
    "d": ("rand 4 KiB, all caches dropped", "IOPS", "0.63", ">= 0.70", 0.70),
    "e": ("rand 4 KiB, mount cache dropped, pages in segments, src hot", "IOPS", "0.07 (--nocache)",
          ">= 0.15", 0.15),
}

failures = []
notes = []


def fail(msg):
    print("FAILED:", msg, flush=True)
    failures.append(msg)


def fio(path, rw, bs, size, extra=()):
    """One fio job reading `path`; returns the job's read figures."""
    cmd = ["fio", "--name=bench", f"--filename={path}", "--readonly", f"--rw={rw}", f"--bs={bs}",
           "--ioengine=psync", "--invalidate=0", f"--size={size}", "--output-format=json", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fio failed ({out.returncode}): {out.stderr.strip()} {out.stdout[-2000:]}")
    j = json.loads(out.stdout[out.stdout.index("{"):])
    r = j["jobs"][0]["read"]
    return {"bw": r["bw_bytes"] / MiB, "iops": r["iops"], "io_bytes": r["io_bytes"],
            "ios": r["total_ios"], "runtime_ms": r["runtime"],
            "clat_p50_us": r["clat_ns"]["percentile"].get("50.000000", 0) / 1000,
            "clat_p99_us": r["clat_ns"]["percentile"].get("99.000000", 0) / 1000}


class Bench:
    def __init__(self, args, src_file, src_sha1, mount):
        self.args, self.src, self.sha1, self.m = args, src_file, src_sha1, mount
        self.size = os.path.getsize(src_file)
        self.mfile = os.path.join(mount.mnt, os.path.basename(src_file))
        self.results = {c: {"direct": [], "mount": [], "cpu": [], "info": []} for c in CASES}

    # -- preparing the caches ------------------------------------------------
    def ensure_source_hot(self):
        if resident_bytes(self.src) < self.size:
            read_all(self.src)
        res = resident_bytes(self.src)
        if res < self.size * 0.99:
            fail(f"source not hot after reading it: {res} of {self.size} bytes resident")

    def read_mount_checked(self, why):
        n, digest = read_all(self.mfile)
        if n != self.size or digest != self.sha1:
            fail(f"{why}: reading the file through the mount gave {n} bytes, sha1 {digest}; "
                 f"source {self.size} bytes, sha1 {self.sha1}")

    def ensure_segments_full(self):
        """Every page of the file in deferfs's segments; the mount's kernel
        cache and the source's page cache in whatever state that leaves."""
        if self.m.stats()["materialized_bytes"] < self.size:
            self.read_mount_checked("filling the segments")
        mat = self.m.stats()["materialized_bytes"]
        if mat < self.size:
            fail(f"segments hold {mat} bytes after reading the whole {self.size}-byte file")

    def drop_mount_cache_only(self):
        fadvise_dontneed(self.mfile)
        res_m, res_s = resident_bytes(self.mfile), resident_bytes(self.src)
        if res_m > 64 * KiB:
            fail(f"posix_fadvise(DONTNEED) left {res_m} bytes of the mount's file in the kernel cache")
        if res_s < self.size * 0.99:
            fail(f"dropping the mount's cache also dropped the source's: {res_s} of {self.size} resident")
        return res_m, res_s

    def prepare(self, case, side):
        """Puts the caches in the state of `case` for a read on `side`; returns
        a note on the state actually reached."""
        path = self.src if side == "direct" else self.mfile
        if case in ("a", "d"):
            drop_caches()
            if side == "mount":
                mat = self.m.stats()["materialized_bytes"]
                if mat:
                    notes.append(f"{case}: after drop_caches deferfs still held {mat} bytes in segments")
                return f"segments {mat >> 20} MiB"
            return ""
        if case == "b":
            drop_caches()
            if side == "direct":
                read_all(self.src)
            else:
                self.read_mount_checked("case b, first read")
            res = resident_bytes(path)
            if res < self.size * 0.99:
                notes.append(f"b/{side}: only {res >> 20} MiB of the file stayed in the kernel cache "
                             f"after the first read")
            return f"kernel cache {res >> 20} MiB"
        # c, e
        if side == "direct":
            self.ensure_source_hot()
            return f"source cache {resident_bytes(self.src) >> 20} MiB"
        self.ensure_segments_full()
        self.ensure_source_hot()
        res_m, res_s = self.drop_mount_cache_only()
        return f"mount cache {res_m >> 10} KiB, source cache {res_s >> 20} MiB"

    # -- one measurement -----------------------------------------------------
    def measure(self, case, side):
        info = self.prepare(case, side)
        path = self.src if side == "direct" else self.mfile
        s0 = self.m.stats() if side == "mount" else None
        cpu0 = self.m.cpu_seconds()
        if case in ("a", "b", "c"):
            r = fio(path, "read", "1M", self.size)
            if r["io_bytes"] != self.size:
                fail(f"{case}/{side}: fio read {r['io_bytes']} bytes of {self.size}")
            value = r["bw"]
        else:
            n = self.args.rand_ios if case == "d" else self.args.hot_rand_ios
            r = fio(path, "randread", "4k", self.size,
                    [f"--number_ios={n}", "--randrepeat=1", "--randseed=3", "--random_generator=tausworthe64",
                     f"--runtime={self.args.rand_runtime}"])
            if r["ios"] < n:
                notes.append(f"{case}/{side}: fio stopped at {r['ios']} of {n} IOs (runtime cap)")
            value = r["iops"]
        cpu = self.m.cpu_seconds() - cpu0
        if side == "mount":
            s1 = self.m.stats()
            loaded = s1["loaded_bytes"] - s0["loaded_bytes"]
            info += f", loaded during run {loaded >> 20} MiB"
            if case in ("c", "e") and loaded > 0:
                fail(f"{case}: deferfs loaded {loaded} bytes from the source although every page was "
                     f"in its segments")
            self.results[case]["cpu"].append(cpu)
        self.results[case][side].append(value)
        self.results[case]["info"].append((side, info, r))
        unit = CASES[case][1]
        print(f"  {case} {side:6s} {value:10.1f} {unit:5s}  clat p50 {r['clat_p50_us']:.0f} us "
              f"p99 {r['clat_p99_us']:.0f} us  ({info}"
              + (f", daemon cpu {cpu:.2f} s" if side == "mount" else "") + ")", flush=True)

    def check_random_pages(self, n=1000):
        rnd = random.Random(11)
        fm, fs = os.open(self.mfile, os.O_RDONLY), os.open(self.src, os.O_RDONLY)
        try:
            bad = 0
            for _ in range(n):
                off = rnd.randrange(self.size // 4096) * 4096
                if os.pread(fm, 4096, off) != os.pread(fs, 4096, off):
                    bad += 1
            if bad:
                fail(f"{bad} of {n} random 4 KiB pages read through the mount differ from the source")
        finally:
            os.close(fm), os.close(fs)


def open_first_4k(path):
    t0 = time.perf_counter_ns()
    fd = os.open(path, os.O_RDONLY)
    data = os.pread(fd, 4096, 0)
    os.close(fd)
    return (time.perf_counter_ns() - t0) / 1000, data


def measure_open(b, samples):
    direct, mount = [], []
    for _ in range(samples):
        drop_caches()
        t, d0 = open_first_4k(b.src)
        direct.append(t)
        drop_caches()
        t, d1 = open_first_4k(b.mfile)
        mount.append(t)
        if d0 != d1:
            fail("open + first 4 KiB: the bytes through the mount differ from the source's")
    return direct, mount


def print_table(b, rounds, open_d, open_m):
    print()
    print(f"fio psync, {b.size / GiB:g} GiB random-data file, {rounds} alternating rounds "
          f"(direct, mount, ...); figures are medians, (min..max) the spread over the rounds; "
          f"ratio = median(mount) / median(direct), (min..max) of the per-round ratios")
    hdr = (f"{'case':<62} {'unit':<5} {'direct':>22} {'mount':>22} {'mount/direct':>18} "
           f"{'passthrough_hp':>16} {'target':>8} {'':>4} {'daemon cpu/run':>14}")
    print(hdr)
    print("-" * len(hdr))
    for c, (title, unit, ref, target, tval) in CASES.items():
        r = b.results[c]
        if not r["direct"] or not r["mount"]:
            continue
        dm, dlo, dhi = median_spread(r["direct"])
        mm, mlo, mhi = median_spread(r["mount"])
        ratios = [m / d for d, m in zip(r["direct"], r["mount"]) if d]
        ratio = mm / dm if dm else float("nan")
        met = "met" if ratio >= tval else "NOT"
        cpu = statistics.median(r["cpu"]) if r["cpu"] else float("nan")
        d_s = f"{dm:.0f} ({dlo:.0f}..{dhi:.0f})"
        m_s = f"{mm:.0f} ({mlo:.0f}..{mhi:.0f})"
        r_s = f"{ratio:.2f} ({min(ratios):.2f}..{max(ratios):.2f})"
        print(f"{c + ' ' + title:<62} {unit:<5} {d_s:>22} {m_s:>22} {r_s:>18} {ref:>16} {target:>8} "
              f"{met:>4} {cpu:12.2f} s")
    if open_d:
        dm, dlo, dhi = median_spread(open_d)
        mm, mlo, mhi = median_spread(open_m)
        ratio = mm / dm
        ratios = [m / d for d, m in zip(open_d, open_m)]
        print(f"open + first 4 KiB read, cold (drop_caches before each), median of {len(open_d)}: "
              f"direct {dm:.0f} us ({dlo:.0f}..{dhi:.0f}), mount {mm:.0f} us ({mlo:.0f}..{mhi:.0f}); "
              f"mount/direct = {ratio:.2f} (per-sample {min(ratios):.2f}..{max(ratios):.2f}); "
              f"target <= 2.0: {'met' if ratio <= 2.0 else 'NOT'}")


def fs_of(path):
    out = subprocess.run(["df", "--output=source,fstype", path], capture_output=True, text=True).stdout
    return " ".join(out.split()[-2:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp", help="where the file is made (a real disk, not tmpfs)")
    ap.add_argument("--size", default="4G", help="file size (k/M/G suffixes); the issue's figures use 4G")
    ap.add_argument("--cases", default="abcde", help="which cases to run, e.g. 'ad'")
    ap.add_argument("--rand-ios", type=int, default=20000, help="IOs of case d (cold random)")
    ap.add_argument("--hot-rand-ios", type=int, default=200000, help="IOs of case e (random from segments)")
    ap.add_argument("--rand-runtime", type=int, default=120, help="cap in seconds of a random case")
    ap.add_argument("--open-samples", type=int, default=21)
    ap.add_argument("--mount-opts", default="", help="-o options for the deferfs mount")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and its file")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("fio_compare: needs root (drop_caches)", file=sys.stderr)
        return 77
    if not shutil.which("fio"):
        print("fio_compare: fio is not installed", file=sys.stderr)
        return 77
    size = int(args.size[:-1]) << {"k": 10, "K": 10, "m": 20, "M": 20, "g": 30, "G": 30}[args.size[-1]] \
        if args.size[-1].isalpha() else int(args.size)
    term_as_interrupt()
    work = tempfile.mkdtemp(prefix="deferfs-fio-", dir=args.workdir)
    src_dir, mnt = os.path.join(work, "src"), os.path.join(work, "mnt")
    os.makedirs(src_dir), os.makedirs(mnt)
    src = os.path.join(src_dir, "random4g")
    try:
        what = benchlib.describe_binary(benchlib.DEFERFS)
        benchlib.pin_binary(work)
        print(f"deferfs {what}; work dir {work} ({fs_of(work)}); "
              f"{os.cpu_count()} CPUs; loadavg {loadavg()}", flush=True)
        t0 = time.time()
        sha1 = make_random_file(src, size)
        os.sync()
        print(f"made {size / GiB:g} GiB of random data in {time.time() - t0:.0f} s", flush=True)
        with Mount(src_dir, mnt, args.mount_opts, state_dir=os.path.join(work, "state")) as m:
            print(f"mounted: daemon pid {m.pid}, mount read_ahead_kb {m.read_ahead_kb()}, "
                  f"options '{m.opts}'", flush=True)
            b = Bench(args, src, sha1, m)
            for rnd in range(1, args.rounds + 1):
                print(f"round {rnd} (loadavg {loadavg()})", flush=True)
                for c in args.cases:
                    for side in ("direct", "mount"):
                        b.measure(c, side)
            b.check_random_pages()
            print(f"open + first 4 KiB, cold, {args.open_samples} samples (loadavg {loadavg()})", flush=True)
            open_d, open_m = measure_open(b, args.open_samples)
            st = m.stats()
            print_table(b, args.rounds, open_d, open_m)
            print(f"daemon at the end: rss {st['daemon_rss_bytes'] >> 20} MiB, materialized "
                  f"{st['materialized_bytes'] >> 20} MiB, loaded in all {st['loaded_bytes'] >> 20} MiB, "
                  f"evicted {st['evicted_bytes'] >> 20} MiB; loadavg {loadavg()}")
    finally:
        if mounted(mnt):
            subprocess.run(["fusermount3", "-uz", mnt])
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for n in notes:
        print("note:", n)
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
