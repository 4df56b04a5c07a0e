#!/usr/bin/python3
"""`deferfs sync` of 20,000 scattered changed pages vs writing them straight (issue 3).

Run as root (drop_caches):  tests/bench/sync_bench.py [--rounds 3] [--workdir /var/tmp]
or `meson test -C build --benchmark sync_bench`.

Files, all on the same disk (under --workdir), in one mounted source directory:
  random4g  4 GiB of random data
  sparse64g 64 GiB: its first 4 GiB are the same random data, the other 60 GiB
            a hole (so that with the same page indexes both files need exactly
            the same disk work, and only the file's size differs)
Each has a baseline copy (made the same way) in a sibling directory that is
not mounted.

Pages: --pages (20,000) distinct random 4 KiB page indexes, drawn once
  "same"   within the first 4 GiB, the same indexes for both files (the
           figures of the issue: sync / baseline for 4 GiB, and 64G / 4G)
  "spread" over the whole 64 GiB of sparse64g (most land in the hole), an
           extra row with its own baseline
Each round writes new random bytes into every page (whole, aligned pages), so
every page differs from the source.

Per round and variant, alternating:
  deferfs: stage the pages by pwrite through the mount (timed, for
           information), os.sync(), [cold: drop_caches], then time
           `deferfs sync --json FILE` (the CLI's whole run: the committer's
           compare against the source, journal, write, fsync); check
           pages_written == pages and read every page back from the source.
  baseline: os.sync(), [cold: drop_caches], then time a program (this one,
           in-process) that opens the copy, pwrites the same bytes to the same
           pages in the same order, fsyncs once and closes.
--cache hot: nothing dropped (the files' pages are mostly in the page cache
  since they were made); cold: drop_caches right before each timed operation
  (staged pages survive it: they are in deferfs's segments).

The daemon and the CLI run from a copy of the deferfs binary, and the
daemon's control socket lives in a private state_dir under the work
directory (others rebuild and mount on this shared machine: see benchlib.py).

Prints medians over the rounds with their spread, the ratios sync/baseline
(target <= 2.0 for 4 GiB) and sync(64G)/sync(4G) (target <= 1.5). Never
asserts a timing: exits 1 only on a correctness failure, 77 when not root.
"""
import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import (GiB, MiB, Mount, drop_caches, loadavg,  # noqa: E402
                      make_random_file, median_spread, mounted, term_as_interrupt)

PAGE = 4096
failures = []


def fail(msg):
    print("FAILED:", msg, flush=True)
    failures.append(msg)


def make_sparse_with_head(path, head_src, size):
    """`size`-byte file whose first bytes are a copy of `head_src`, the rest a hole."""
    n = os.path.getsize(head_src)
    with open(head_src, "rb") as r, open(path, "wb") as w:
        left, off = n, 0
        while left:
            done = os.copy_file_range(r.fileno(), w.fileno(), min(left, 256 * MiB), off, off)
            if done <= 0:
                raise OSError(f"copy_file_range returned {done}")
            left -= done
            off += done
        w.truncate(size)


def write_pages(path, pages, data, sync):
    """pwrites data[i] at pages[i] (in that order); fsyncs once if `sync`.
    Returns (seconds of the pwrites, seconds of open..close in all)."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    try:
        for p, d in zip(pages, data):
            os.pwrite(fd, d, p * PAGE)
        t1 = time.perf_counter()
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return t1 - t0, time.perf_counter() - t0


def deferfs_sync(path):
    t0 = time.perf_counter()
    out = subprocess.run([benchlib.DEFERFS, "sync", "--json", path], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        fail(f"deferfs sync {path}: rc {out.returncode}: {out.stderr.strip()}")
        return dt, {}
    return dt, json.loads(out.stdout)


def check_pages(path, pages, data, what):
    fd = os.open(path, os.O_RDONLY)
    try:
        bad = sum(1 for p, d in zip(pages, data) if os.pread(fd, PAGE, p * PAGE) != d)
    finally:
        os.close(fd)
    if bad:
        fail(f"{what}: {bad} of {len(pages)} pages of the source differ from what was synced")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/var/tmp", help="where the files are made (a real disk)")
    ap.add_argument("--pages", type=int, default=20000)
    ap.add_argument("--small", default="4G", help="size of the random-data file (the issue: 4G)")
    ap.add_argument("--big", default="64G", help="size of the sparse file (the issue: 64G)")
    ap.add_argument("--cache", default="hot,cold", help="hot, cold or hot,cold (see above)")
    ap.add_argument("--variants", default="4g,64g,64g-spread")
    ap.add_argument("--mount-opts", default="")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("sync_bench: needs root (drop_caches)", file=sys.stderr)
        return 77

    def size_of(s):
        mult = {"k": 10, "K": 10, "m": 20, "M": 20, "g": 30, "G": 30}
        return int(s[:-1]) << mult[s[-1]] if s[-1] in mult else int(s)

    small, big = size_of(args.small), size_of(args.big)
    caches = args.cache.split(",")
    variants = args.variants.split(",")
    term_as_interrupt()
    work = tempfile.mkdtemp(prefix="deferfs-sync-", dir=args.workdir)
    src_dir, base_dir, mnt = (os.path.join(work, d) for d in ("src", "base", "mnt"))
    for d in (src_dir, base_dir, mnt):
        os.makedirs(d)
    try:
        what = benchlib.describe_binary(benchlib.DEFERFS)
        benchlib.pin_binary(work)
        print(f"deferfs {what}; work dir {work}; {os.cpu_count()} CPUs; loadavg {loadavg()}", flush=True)
        t0 = time.time()
        f4 = os.path.join(src_dir, "random4g")
        f64 = os.path.join(src_dir, "sparse64g")
        make_random_file(f4, small)
        make_sparse_with_head(f64, f4, big)
        shutil.copyfile(f4, os.path.join(base_dir, "random4g"))
        make_sparse_with_head(os.path.join(base_dir, "sparse64g"), f4, big)
        os.sync()
        print(f"made the files ({small / GiB:g} GiB random, {big / GiB:g} GiB sparse with the same "
              f"{small / GiB:g} GiB at its head, and their copies) in {time.time() - t0:.0f} s", flush=True)

        rnd = random.Random(5)
        same = rnd.sample(range(small // PAGE), args.pages)   # random order, distinct
        spread = rnd.sample(range(big // PAGE), args.pages)
        plan = {"4g": ("random4g", same), "64g": ("sparse64g", same), "64g-spread": ("sparse64g", spread)}
        in_hole = sum(1 for p in spread if p * PAGE >= small)
        print(f"{args.pages} pages: 'same' = random indexes within the first {small / GiB:g} GiB, the same "
              f"for both files; '64g-spread' = random over all {big / GiB:g} GiB ({in_hole} in the hole "
              f"at the first round)", flush=True)

        res = {(c, v): {"sync": [], "base": [], "stage": [], "pwrite": [], "written": []}
               for c in caches for v in variants}
        with Mount(src_dir, mnt, args.mount_opts, state_dir=os.path.join(work, "state")) as m:
            print(f"mounted: daemon pid {m.pid}", flush=True)
            for r in range(1, args.rounds + 1):
                print(f"round {r} (loadavg {loadavg()})", flush=True)
                for c in caches:
                    for v in variants:
                        name, pages = plan[v]
                        data = [os.urandom(PAGE) for _ in pages]
                        # deferfs: stage, then time the sync.
                        mpath = os.path.join(mnt, name)
                        _, t_stage = write_pages(mpath, pages, data, sync=False)
                        st = m.cli("status", "--json", path=mpath)
                        if st["dirty_pages"] != len(pages):
                            fail(f"{v}: {st['dirty_pages']} dirty pages staged, expected {len(pages)}")
                        os.sync()
                        if c == "cold":
                            drop_caches()
                        t_sync, out = deferfs_sync(mpath)
                        written = out.get("pages_written", -1)
                        if written != len(pages):
                            fail(f"{v}/{c}: deferfs sync wrote {written} pages, expected {len(pages)}")
                        check_pages(os.path.join(src_dir, name), pages, data, f"{v}/{c}")
                        # baseline: the same bytes straight into the copy.
                        os.sync()
                        if c == "cold":
                            drop_caches()
                        t_pw, t_base = write_pages(os.path.join(base_dir, name), pages, data, sync=True)
                        e = res[(c, v)]
                        e["sync"].append(t_sync), e["base"].append(t_base), e["stage"].append(t_stage)
                        e["pwrite"].append(t_pw), e["written"].append(written)
                        print(f"  {c:4s} {v:11s} deferfs sync {t_sync:7.3f} s ({written} pages written; "
                              f"staging through the mount took {t_stage:.2f} s)   baseline pwrite+fsync "
                              f"{t_base:7.3f} s (pwrites {t_pw:.3f} s)   ratio {t_sync / t_base:.2f}",
                              flush=True)
            st = m.stats()

        print()
        print(f"deferfs sync of {args.pages} scattered changed 4 KiB pages vs pwrite of the same pages into a "
              f"copy + one fsync (same disk); {args.rounds} alternating rounds; medians (min..max)")
        hdr = (f"{'cache':<5} {'file / pages':<34} {'deferfs sync s':>22} {'baseline s':>22} "
               f"{'sync/baseline':>18} {'pages_written':>13}")
        print(hdr)
        print("-" * len(hdr))
        titles = {"4g": f"{small / GiB:g}G random, same pages", "64g": f"{big / GiB:g}G sparse, same pages",
                  "64g-spread": f"{big / GiB:g}G sparse, spread pages"}
        for c in caches:
            for v in variants:
                e = res[(c, v)]
                sm, slo, shi = median_spread(e["sync"])
                bm, blo, bhi = median_spread(e["base"])
                ratios = [s / b for s, b in zip(e["sync"], e["base"])]
                tgt = "  (target <= 2.0: " + ("met)" if sm / bm <= 2.0 else "NOT)") if v == "4g" else ""
                print(f"{c:<5} {titles[v]:<34} {f'{sm:.3f} ({slo:.3f}..{shi:.3f})':>22} "
                      f"{f'{bm:.3f} ({blo:.3f}..{bhi:.3f})':>22} "
                      f"{f'{sm / bm:.2f} ({min(ratios):.2f}..{max(ratios):.2f})':>18} "
                      f"{int(median_spread(e['written'])[0]):>13}{tgt}")
            if "4g" in variants and "64g" in variants:
                s4, s64 = res[(c, "4g")]["sync"], res[(c, "64g")]["sync"]
                q = median_spread(s64)[0] / median_spread(s4)[0]
                per = [b / a for a, b in zip(s4, s64)]
                print(f"{c:<5} sync time 64G / 4G (same pages) = {q:.2f} (per round {min(per):.2f}..{max(per):.2f})"
                      f"; target <= 1.5: {'met' if q <= 1.5 else 'NOT'}")
        print(f"daemon at the end: rss {st['daemon_rss_bytes'] >> 20} MiB, materialized "
              f"{st['materialized_bytes'] >> 20} MiB, synced {st['synced_bytes'] >> 20} MiB; loadavg {loadavg()}")
    finally:
        if mounted(mnt):
            subprocess.run(["fusermount3", "-uz", mnt])
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
