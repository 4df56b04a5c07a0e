#!/usr/bin/python3
"""Reading and writing through a deferfs mount vs straight on its source, with
libfuse's passthrough_hp (the peer) beside it in the same run (issue 15).

Run as root (drop_caches):
    tests/bench/fio_compare.py [--rounds 3] [--workdir /var/tmp] [--peer PATH]
or `meson test -C build --benchmark fio_compare`.

Makes a 4 GiB file of random data (and three 1 GiB ones for the write cases)
on the real disk under --workdir, mounts deferfs and the peer
(../shared/peer/peer-deferfs: passthrough_hp with deferfs's command line;
skipped with a note when absent) over the same source directory, and
measures with fio (ioengine=psync, one job, --invalidate=0: every cache drop
is done here), in ONE run, the sides alternating (their order rotates every
round). "Caches dropped" is `echo 3 > /proc/sys/vm/drop_caches`, done twice
(benchlib.drop_caches): it evicts the mounts' inodes too, as memory pressure
does. Ratio = through the mount / straight on the source.

  a   sequential 1 MiB reads, all caches dropped. deferfs is mounted anew
      first, so its segments are empty: a cold read everywhere
  b   sequential, second read: read once, then measured again (the kernel
      keeps the mount's pages)
  c   sequential, caches dropped with echo 3, then the source read hot again:
      deferfs's segments (kept although the kernel forgot the inode, spec 5.1)
      serve it; the peer reads the hot source; direct reads the hot source
  cf  the same with the mount's kernel cache dropped by posix_fadvise(DONTNEED)
      instead (FUSE does not forward it: segments and the source's cache stay)
  d   random 4 KiB reads, all caches dropped (deferfs mounted anew);
      --rand-ios IOs, same seed on every side
  e   random 4 KiB, echo 3 then the source hot, as c
  ef  random 4 KiB, fadvise variant, as cf
  w1  1 MiB writes of new bytes over an existing 1 GiB file, caches dropped,
      no fsync on any side (each side writes its own copy)
  w4  4 KiB random writes of new bytes over it (--rand-write-ios IOs)
  wn  1 MiB writes into a new 1 GiB file

A round whose preconditions do not hold (a "cold" case that finds pages of the
file still cached, a segments case that finds the segments empty or makes
deferfs load from the source) is refused: it is not reported, and the run
exits 1. Prints per case each side's median (spread over the rounds), the
mount/direct ratios with the spread of the per-round ratios, the target, and
whether deferfs reached the target and the peer; the daemon's CPU seconds per
GiB for the cold sequential read. Never asserts a timing; exits 77 when not
root.
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

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PEER = os.path.normpath(os.path.join(HERE, "../../../shared/peer/peer-deferfs"))

# case -> (title, unit, target ratio or None)
CASES = {
    "a": ("seq 1 MiB reads, all caches dropped", "MiB/s", 0.90),
    "b": ("seq, second read (kernel keeps the mount's pages)", "MiB/s", 0.67),
    "c": ("seq, echo 3 again, source hot (segments)", "MiB/s", 0.60),
    "cf": ("seq, fadvise(DONTNEED) on the mount, source hot", "MiB/s", None),
    "d": ("rand 4 KiB, all caches dropped", "IOPS", 0.85),
    "e": ("rand 4 KiB, echo 3 again, source hot (segments)", "IOPS", 0.08),
    "ef": ("rand 4 KiB, fadvise(DONTNEED) on the mount, source hot", "IOPS", None),
    "w1": ("1 MiB writes over an existing 1 GiB file", "MiB/s", 0.80),
    "w4": ("4 KiB random writes over it", "IOPS", 0.60),
    "wn": ("1 MiB writes into a new file", "MiB/s", 1.00),
}
READ_CASES = ("a", "b", "c", "cf", "d", "e", "ef")
COLD_CASES = ("a", "d")
SEGMENT_CASES = ("c", "e")
FADVISE_CASES = ("cf", "ef")
SLACK = 64 * KiB  # what a "dropped" cache may still hold of a file

failures = []
notes = []


def fail(msg):
    print("FAILED:", msg, flush=True)
    failures.append(msg)


class Refused(Exception):
    """A round whose preconditions do not hold: it is not reported."""


def fio(path, rw, bs, size, extra=()):
    """One fio job on `path`; returns the figures of its reads or writes."""
    write = "write" in rw
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
           "--ioengine=psync", "--invalidate=0", f"--size={size}", "--output-format=json", *extra]
    if not write:
        cmd.append("--readonly")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fio failed ({out.returncode}): {out.stderr.strip()} {out.stdout[-2000:]}")
    j = json.loads(out.stdout[out.stdout.index("{"):])
    r = j["jobs"][0]["write" if write else "read"]
    return {"bw": r["bw_bytes"] / MiB, "iops": r["iops"], "io_bytes": r["io_bytes"],
            "ios": r["total_ios"], "runtime_ms": r["runtime"],
            "clat_p50_us": r["clat_ns"]["percentile"].get("50.000000", 0) / 1000,
            "clat_p99_us": r["clat_ns"]["percentile"].get("99.000000", 0) / 1000}


class Side:
    """One way of reaching the files: straight on the source, or a mount."""

    def __init__(self, name, src_dir, mount=None):
        self.name, self.src_dir, self.m = name, src_dir, mount
        self.top = mount.mnt if mount else src_dir

    def path(self, rel):
        return os.path.join(self.top, rel)

    def stats(self):
        return self.m.stats() if self.name == "deferfs" else None


class Bench:
    def __init__(self, args, work, src_dir, read_file, sha1, write_size):
        self.args, self.work, self.src_dir = args, work, src_dir
        self.read_rel, self.sha1 = read_file, sha1
        self.size = os.path.getsize(os.path.join(src_dir, read_file))
        self.write_size = write_size
        self.sides = {}
        self.results = {c: {"direct": [], "deferfs": [], "peer": [], "cpu": [], "ratio_d": [], "ratio_p": []}
                        for c in CASES}

    # -- the mounts ----------------------------------------------------------
    def mount_deferfs(self):
        mnt = os.path.join(self.work, "mnt")
        m = Mount(self.src_dir, mnt, self.args.mount_opts, state_dir=os.path.join(self.work, "state"))
        m.__enter__()
        self.sides["deferfs"] = Side("deferfs", self.src_dir, m)
        print(f"  deferfs mounted: daemon pid {m.pid}, read_ahead_kb {m.read_ahead_kb()}, "
              f"options '{m.opts}'", flush=True)

    def remount_deferfs(self):
        """A fresh daemon: its segments hold nothing (the cold cases)."""
        self.sides["deferfs"].m.__exit__(None, None, None)
        self.mount_deferfs()

    def mount_peer(self):
        mnt = os.path.join(self.work, "mnt-peer")
        m = Mount(self.src_dir, mnt, binary=self.args.peer)
        m.__enter__()
        self.sides["peer"] = Side("peer", self.src_dir, m)
        print(f"  peer mounted: {self.args.peer}, daemon pid {m.pid}", flush=True)

    def unmount_all(self):
        for s in self.sides.values():
            if s.m:
                s.m.__exit__(None, None, None)

    # -- states of the caches -------------------------------------------------
    def src(self, rel):
        return os.path.join(self.src_dir, rel)

    def ensure_source_hot(self):
        src = self.src(self.read_rel)
        if resident_bytes(src) < self.size:
            read_all(src)
        if resident_bytes(src) < self.size * 0.99:
            raise Refused(f"the source is not hot after reading it ({resident_bytes(src)} bytes resident)")

    def read_checked(self, side, why):
        n, digest = read_all(side.path(self.read_rel))
        if n != self.size or digest != self.sha1:
            fail(f"{why}: reading the file through {side.name} gave {n} bytes, sha1 {digest}; "
                 f"source {self.size} bytes, sha1 {self.sha1}")

    def prepare_read(self, case, side):
        """Puts the caches in `case`'s state for a read on `side`; returns a
        note on the state reached, or raises Refused."""
        path = side.path(self.read_rel)
        if case in COLD_CASES:
            if side.name == "deferfs" and side.m.stats()["materialized_bytes"]:
                self.remount_deferfs()
                side = self.sides["deferfs"]
            drop_caches()
            held = [(p, resident_bytes(p)) for p in {path, self.src(self.read_rel)}]
            for p, res in held:
                if res > SLACK:
                    raise Refused(f"{case}/{side.name}: {res} bytes of {p} still cached after drop_caches")
            if side.name == "deferfs" and side.m.stats()["materialized_bytes"]:
                raise Refused(f"{case}: deferfs's segments still hold pages after remounting")
            return "cold"
        if case == "b":
            drop_caches()
            if side.name == "direct":
                read_all(path)
            else:
                self.read_checked(side, "case b, first read")
            res = resident_bytes(path)
            if res < self.size * 0.99:
                notes.append(f"b/{side.name}: only {res >> 20} MiB of the file stayed in the kernel cache")
            return f"kernel cache {res >> 20} MiB"
        # c, e, cf, ef: the segments full (deferfs), the source hot.
        if side.name == "deferfs" and side.m.stats()["materialized_bytes"] < self.size:
            self.read_checked(side, "filling the segments")
        if case in SEGMENT_CASES:
            drop_caches()
        self.ensure_source_hot()
        if side.name != "direct":
            if case in FADVISE_CASES:
                fadvise_dontneed(path)
            res = resident_bytes(path)
            if res > SLACK:
                raise Refused(f"{case}/{side.name}: {res} bytes of the mount's file still in the kernel cache")
        if side.name == "deferfs":
            mat = side.m.stats()["materialized_bytes"]
            if mat < self.size:
                raise Refused(f"{case}: deferfs's segments hold {mat} of {self.size} bytes")
            return f"segments {mat >> 20} MiB, source hot"
        return "source hot"

    # -- one measurement -------------------------------------------------------
    def measure(self, case, side_name):
        side = self.sides[side_name]
        if case in READ_CASES:
            info = self.prepare_read(case, side)
            side = self.sides[side_name]  # remounted, maybe
            path = side.path(self.read_rel)
        else:
            path, info = self.prepare_write(case, side), "caches dropped"
        s0 = side.stats()
        cpu0 = side.m.cpu_seconds() if side.m else 0.0
        if case in ("a", "b", "c", "cf"):
            r = fio(path, "read", "1M", self.size)
            if r["io_bytes"] != self.size:
                fail(f"{case}/{side_name}: fio read {r['io_bytes']} bytes of {self.size}")
            value = r["bw"]
        elif case in ("d", "e", "ef"):
            n = self.args.rand_ios if case == "d" else self.args.hot_rand_ios
            r = fio(path, "randread", "4k", self.size,
                    [f"--number_ios={n}", "--randrepeat=1", "--randseed=3", "--random_generator=tausworthe64",
                     f"--runtime={self.args.rand_runtime}"])
            value = r["iops"]
        elif case in ("w1", "wn"):
            r = fio(path, "write", "1M", self.write_size, ["--end_fsync=0"])
            if r["io_bytes"] != self.write_size:
                fail(f"{case}/{side_name}: fio wrote {r['io_bytes']} bytes of {self.write_size}")
            value = r["bw"]
        else:  # w4
            r = fio(path, "randwrite", "4k", self.write_size,
                    [f"--number_ios={self.args.rand_write_ios}", "--randrepeat=1", "--randseed=5",
                     "--random_generator=tausworthe64", "--end_fsync=0", f"--runtime={self.args.rand_runtime}"])
            value = r["iops"]
        cpu = (side.m.cpu_seconds() if side.m else 0.0) - cpu0
        extra = ""
        if side_name == "deferfs":
            s1 = side.stats()
            loaded = s1["loaded_bytes"] - s0["loaded_bytes"]
            extra = f", loaded {loaded >> 20} MiB, daemon cpu {cpu:.2f} s"
            if case in SEGMENT_CASES + FADVISE_CASES and loaded > 0:
                raise Refused(f"{case}: deferfs loaded {loaded} bytes from the source although every page "
                              f"was in its segments")
        if case in ("wn",):
            self.cleanup_new_file(side, path)
        unit = CASES[case][1]
        print(f"  {case:2s} {side_name:7s} {value:10.1f} {unit:5s}  clat p50 {r['clat_p50_us']:.0f} us "
              f"p99 {r['clat_p99_us']:.0f} us  ({info}{extra})", flush=True)
        return value, cpu

    def prepare_write(self, case, side):
        if case == "wn":
            path = side.path(f"new.{side.name}")
            if os.path.exists(path):
                os.unlink(path)
        else:
            path = side.path(f"w.{side.name}")
            if side.name == "deferfs":
                side.m.cli("discard", "--json", path=path)  # the last round's staged pages
        drop_caches()
        return path

    def cleanup_new_file(self, side, path):
        os.unlink(path)
        if side.name == "deferfs":
            side.m.cli("discard", "--json")

    def round(self, rnd, cases):
        names = [n for n in ("direct", "deferfs", "peer") if n in self.sides]
        k = (rnd - 1) % len(names)
        order = names[k:] + names[:k]  # rotates every round
        for c in cases:
            try:
                got = {n: self.measure(c, n) for n in order}
            except Refused as e:
                fail(f"round {rnd}, case {c} refused: {e}")
                continue
            res = self.results[c]
            for n, (v, cpu) in got.items():
                res[n].append(v)
            res["cpu"].append(got["deferfs"][1])
            res["ratio_d"].append(got["deferfs"][0] / got["direct"][0])
            if "peer" in got:
                res["ratio_p"].append(got["peer"][0] / got["direct"][0])


def fmt(xs, nd=0):
    if not xs:
        return "-"
    m, lo, hi = median_spread(xs)
    return f"{m:.{nd}f} ({lo:.{nd}f}..{hi:.{nd}f})"


def print_table(b):
    print()
    print(f"fio psync; read cases on a {b.size / GiB:g} GiB random-data file, write cases on "
          f"{b.write_size / GiB:g} GiB files; {b.args.rounds} rounds, sides alternating; medians "
          f"(min..max over the rounds); ratio = mount / direct, median of the per-round ratios "
          f"(min..max)")
    hdr = (f"{'case':<58} {'unit':<5} {'direct':>20} {'deferfs':>20} {'deferfs ratio':>18} "
           f"{'peer ratio':>18} {'target':>7} {'':>6}")
    print(hdr)
    print("-" * len(hdr))
    for c, (title, unit, target) in CASES.items():
        r = b.results[c]
        if not r["ratio_d"]:
            continue
        rd = statistics.median(r["ratio_d"])
        rp = statistics.median(r["ratio_p"]) if r["ratio_p"] else None
        verdict = ""
        if target is not None:
            verdict = "met" if rd >= target and (rp is None or rd >= rp) else "NOT"
        print(f"{c + ' ' + title:<58} {unit:<5} {fmt(r['direct']):>20} {fmt(r['deferfs']):>20} "
              f"{fmt(r['ratio_d'], 2):>18} {fmt(r['ratio_p'], 2):>18} "
              f"{('>= %.2f' % target) if target else '':>7} {verdict:>6}")
    if b.results["a"]["cpu"]:
        per_gib = [c / (b.size / GiB) for c in b.results["a"]["cpu"]]
        print(f"daemon CPU for the cold sequential read (a): {fmt(per_gib, 2)} s per GiB (target <= 1.0)")


def parse_size(s):
    return int(s[:-1]) << {"k": 10, "K": 10, "m": 20, "M": 20, "g": 30, "G": 30}[s[-1]] \
        if s[-1].isalpha() else int(s)


def fs_of(path):
    out = subprocess.run(["df", "--output=source,fstype", path], capture_output=True, text=True).stdout
    return " ".join(out.split()[-2:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp", help="where the files are made (a real disk, not tmpfs)")
    ap.add_argument("--size", default="4G", help="size of the read file (k/M/G suffixes)")
    ap.add_argument("--write-size", default="1G", help="size of the write cases' files")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated cases, e.g. a,d,w1")
    ap.add_argument("--rand-ios", type=int, default=20000, help="IOs of case d (cold random)")
    ap.add_argument("--hot-rand-ios", type=int, default=200000, help="IOs of cases e and ef")
    ap.add_argument("--rand-write-ios", type=int, default=50000, help="IOs of case w4")
    ap.add_argument("--rand-runtime", type=int, default=120, help="cap in seconds of a random case")
    ap.add_argument("--mount-opts", default="", help="-o options for the deferfs mount")
    ap.add_argument("--peer", default=DEFAULT_PEER,
                    help="the peer's deferfs-style command (passthrough_hp); 'none' to leave it out")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and its files")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("fio_compare: needs root (drop_caches)", file=sys.stderr)
        return 77
    if not shutil.which("fio"):
        print("fio_compare: fio is not installed", file=sys.stderr)
        return 77
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        print(f"fio_compare: unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    if args.peer != "none" and not os.access(args.peer, os.X_OK):
        notes.append(f"no peer at {args.peer}: its column is left out")
        args.peer = "none"
    size, write_size = parse_size(args.size), parse_size(args.write_size)
    term_as_interrupt()
    work = tempfile.mkdtemp(prefix="deferfs-fio-", dir=args.workdir)
    src_dir = os.path.join(work, "src")
    os.makedirs(src_dir)
    os.makedirs(os.path.join(work, "mnt"))
    os.makedirs(os.path.join(work, "mnt-peer"))
    b = None
    try:
        what = benchlib.describe_binary(benchlib.DEFERFS)
        benchlib.pin_binary(work)
        print(f"deferfs {what}; work dir {work} ({fs_of(work)}); {os.cpu_count()} CPUs; "
              f"loadavg {loadavg()}", flush=True)
        t0 = time.time()
        sha1 = make_random_file(os.path.join(src_dir, "random"), size)
        if any(c.startswith("w") and c != "wn" for c in cases):
            for name in ("direct", "deferfs", "peer"):
                make_random_file(os.path.join(src_dir, f"w.{name}"), write_size)
        os.sync()
        print(f"made the files in {time.time() - t0:.0f} s", flush=True)
        b = Bench(args, work, src_dir, "random", sha1, write_size)
        b.sides["direct"] = Side("direct", src_dir)
        b.mount_deferfs()
        if args.peer != "none":
            b.mount_peer()
        for rnd in range(1, args.rounds + 1):
            print(f"round {rnd} (loadavg {loadavg()})", flush=True)
            b.round(rnd, cases)
        d = b.sides["deferfs"]
        st = d.m.stats()
        print_table(b)
        print(f"deferfs at the end: rss {st['daemon_rss_bytes'] >> 20} MiB, materialized "
              f"{st['materialized_bytes'] >> 20} MiB, snapshots kept {st.get('snapshots_kept', 0)}, "
              f"evicted {st['evicted_bytes'] >> 20} MiB; loadavg {loadavg()}")
    finally:
        if b:
            b.unmount_all()
        for mnt in ("mnt", "mnt-peer"):
            if mounted(os.path.join(work, mnt)):
                subprocess.run(["fusermount3", "-uz", os.path.join(work, mnt)])
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
