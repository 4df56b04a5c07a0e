#!/usr/bin/env python3
"""Sums a large array of 64-bit words through a deferfs view, without
copying it and without a FUSE request per read; compares with reading the
file through the mount.

    PYTHONPATH=build/python python3 examples/view_sum.py /mnt/data/big.u64

With --make SIZE it first writes SIZE bytes of random words to the path
(through the mount: they are staged, and the view sees them at once)."""
import argparse
import os
import time

import numpy as np

import deferfs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="a regular file on a deferfs mount")
    ap.add_argument("--make", metavar="MiB", type=int, help="first write this many MiB of random words")
    args = ap.parse_args()
    if args.make:
        rng = np.random.default_rng(14)
        with open(args.path, "wb") as f:
            for _ in range(args.make):
                f.write(rng.integers(0, 1 << 63, size=(1 << 20) // 8, dtype=np.uint64).tobytes())

    t = time.perf_counter()
    v = deferfs.view(args.path)
    words = np.frombuffer(v, dtype=np.uint64, count=len(v) // 8)
    total = int(words.sum())
    t_view = time.perf_counter() - t
    print(f"view: {len(v)} bytes, sum of {words.size} words = {total} ({t_view:.3f} s)")

    t = time.perf_counter()
    check = 0
    with open(args.path, "rb", buffering=0) as f:
        buf = np.empty((1 << 20) // 8, dtype=np.uint64)
        while n := f.readinto(buf):
            check += int(buf[: n // 8].sum())
    t_read = time.perf_counter() - t
    print(f"read() through the mount: sum = {check % (1 << 64)} ({t_read:.3f} s)")
    assert check % (1 << 64) == total % (1 << 64)
    st = deferfs.stats(os.path.dirname(os.path.abspath(args.path)))
    print(f"mount: loaded_bytes={st['loaded_bytes']} materialized_bytes={st['materialized_bytes']}")


if __name__ == "__main__":
    main()
