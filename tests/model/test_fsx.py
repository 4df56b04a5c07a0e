"""The fsx model test (fsx.py) as a pytest: at least 200,000 random
operations per CI run, split over fixed seeds, with the default 4 KiB pages
and with -o page_size=16k. Zero mismatches allowed (issue 4).

Two meson tests run it: fsx_4k (-k page4k) and fsx_16k (-k page16k).
Environment:
  FSX_OPS    operations per case (default: CASES below; 200,000 in all)
  FSX_SEED   a base seed: case k then uses FSX_SEED + k instead of its fixed seed
On a mismatch the failure message holds the seed, the op number, expected vs
actual bytes, the op log tail, the command that reproduces it and the tail of
the daemon's log; the run's directory (source and log) is kept in tmp_path.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fsx  # noqa: E402

# (id, mount options, seed, ops)
CASES = [
    ("page4k-a", [], 1001, 55_000),
    ("page4k-b", [], 1002, 55_000),
    ("page16k-a", ["page_size=16k"], 1601, 45_000),
    ("page16k-b", ["page_size=16k"], 1602, 45_000),
]
assert sum(c[3] for c in CASES) >= 200_000


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fsx(case, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (FUSE mounts, SIGKILL of the daemon, lazy unmount)")
    name, opts, seed, ops = case
    k = CASES.index(case)
    if os.environ.get("FSX_SEED"):
        seed = int(os.environ["FSX_SEED"]) + k
    ops = int(os.environ.get("FSX_OPS", ops))
    failure, f, elapsed = fsx.run_fsx(tmp_path / "fsx", seed, ops, opts=opts)
    print(f"fsx {name}: seed {seed}, {f.opno} ops in {elapsed:.1f} s; "
          + ", ".join(f"{op} {n}" for op, n in sorted(f.counts.items())))
    assert failure is None, failure
