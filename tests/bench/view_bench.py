#!/usr/bin/env python3
"""Views against the source read directly (issue 14): runs view_bench (C++)
on a file of --size bytes (default 4 GiB of random data) through a deferfs
mount, then the numpy comparison in Python. Prints figures with the load
average; never asserts a timing. Needs root (drop_caches, mount)."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import GiB, MiB, Mount, drop_caches, loadavg, make_random_file  # noqa: E402


def parse_size(s):
    units = {"k": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def numpy_figures(view_path, src_path, rounds):
    import numpy as np
    import deferfs
    v = deferfs.view(view_path)
    a = np.frombuffer(v, dtype=np.uint64)
    a.sum()  # maps every page (they are resident in the daemon's segment)
    t_view, s_view = 1e300, None
    for _ in range(rounds):
        t = time.perf_counter()
        s_view = int(a.sum()) & ((1 << 64) - 1)
        t_view = min(t_view, time.perf_counter() - t)
    buf = np.empty(MiB // 8, dtype=np.uint64)
    t_read, s_read = 1e300, None
    for _ in range(rounds):
        t = time.perf_counter()
        total = 0
        with open(src_path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                total = (total + int(buf[: n // 8].sum())) & ((1 << 64) - 1)
        s_read = total
        t_read = min(t_read, time.perf_counter() - t)
    assert s_view == s_read, (s_view, s_read)
    size = a.nbytes
    return {"numpy_view_gbps": round(size / t_view / 1e9, 2), "numpy_read_gbps": round(size / t_read / 1e9, 2),
            "numpy_ratio": round(t_read / t_view, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--ops", type=int, default=200000)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bench", default=os.environ.get("VIEW_BENCH") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "../../build/tests/bench/view_bench"))
    args = ap.parse_args()
    size = parse_size(args.size)
    top = tempfile.mkdtemp(prefix="deferfs-viewbench-", dir=args.workdir)
    src, mnt, state = (os.path.join(top, d) for d in ("src", "mnt", "state"))
    os.mkdir(src)
    os.mkdir(mnt)
    benchlib.pin_binary(top)
    out = {"loadavg_start": loadavg()}
    try:
        make_random_file(os.path.join(src, "f"), size)
        with Mount(src, mnt, state_dir=state) as m:
            r = subprocess.run([args.bench, "resident", os.path.join(mnt, "f"), os.path.join(src, "f"),
                                str(args.ops)], capture_output=True, text=True, check=True)
            out.update(json.loads(r.stdout))
            out.update(numpy_figures(os.path.join(mnt, "f"), os.path.join(src, "f"), args.rounds))
        with Mount(src, mnt, state_dir=state) as m:
            drop_caches()
            before = m.stats()
            r = subprocess.run([args.bench, "first", os.path.join(mnt, "f"), os.path.join(src, "f"), str(args.k)],
                               capture_output=True, text=True, check=True)
            after = m.stats()
            out.update(json.loads(r.stdout))
            out["first_touch_pages_materialized"] = (after["materialized_bytes"] - before["materialized_bytes"]) // 4096
            out["first_touch_pages_loaded"] = (after["loaded_bytes"] - before["loaded_bytes"]) // 4096
    finally:
        out["loadavg_end"] = loadavg()
        subprocess.run(["rm", "-rf", top])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
