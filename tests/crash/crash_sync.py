#!/usr/bin/python3
"""Crash test of the sync journal (spec 6.3, issue 4).

Each trial: 3 source files with known "old" bytes; through a deferfs mount,
5,000 scattered pages of each are changed ("new"); `deferfs sync` starts and
the daemon is killed with SIGKILL after a random delay spread over the whole
sync (journal writing, commit, in-place apply, retire). The source is then
mounted again (recovery finishes or drops the journal) and unmounted, and
the 3 files must be all old or all new together: none torn, none mixed.

    crash_sync.py [--trials N] [--workdir DIR] [--seed S]

Exit 0 if every trial passed, 1 otherwise. Prints the phases hit.
"""
import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

DEFERFS = os.environ.get("DEFERFS") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "../../build/src/deferfs")
PAGE = 4096
FILE_PAGES = 8192          # 32 MiB per file
CHANGED = 5000             # pages changed per file
NFILES = 3


def mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def wait_gone(pid, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def cleanup_mount(mnt):
    if mounted(mnt):
        subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def daemon_pid(mnt):
    out = subprocess.run([DEFERFS, "stats", "--json", mnt], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["pid"]


def trial(work, rnd, delay_max, kill=True):
    src, mnt = os.path.join(work, "src"), os.path.join(work, "mnt")
    os.makedirs(src, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    old, new = [], []
    for i in range(NFILES):
        data = bytearray(rnd.randbytes(FILE_PAGES * PAGE))
        with open(os.path.join(src, f"f{i}"), "wb") as f:
            f.write(data)
        old.append(hashlib.sha256(data).hexdigest())
        pages = rnd.sample(range(FILE_PAGES), CHANGED)
        patch = {p: rnd.randbytes(PAGE) for p in pages}
        for p, b in patch.items():
            data[p * PAGE:(p + 1) * PAGE] = b
        new.append((hashlib.sha256(data).hexdigest(), patch))
    os.sync()
    subprocess.run([DEFERFS, src, mnt], check=True)
    pid = daemon_pid(mnt)
    try:
        for i in range(NFILES):
            fd = os.open(os.path.join(mnt, f"f{i}"), os.O_WRONLY)
            for p, b in new[i][1].items():
                os.pwrite(fd, b, p * PAGE)
            os.close(fd)
        delay = rnd.uniform(0, delay_max)
        sync = subprocess.Popen([DEFERFS, "sync", mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.perf_counter()
        if kill:
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            elapsed = time.perf_counter() - t0
            sync.wait(timeout=30)
            wait_gone(pid)
        else:
            sync.wait(timeout=120)
            elapsed = time.perf_counter() - t0
    finally:
        cleanup_mount(mnt)
    # journal.ID: the killed mount's own journal (issue 13).
    journal = any(n.startswith("journal") for n in os.listdir(os.path.join(src, ".deferfs")))
    # Remount: recovery runs before anything is served.
    proc = subprocess.Popen([DEFERFS, src, mnt, "-f"], stderr=subprocess.PIPE, text=True)
    try:
        end = time.time() + 20
        while not mounted(mnt) and time.time() < end:
            time.sleep(0.02)
        state = []
        for i in range(NFILES):
            d = digest(os.path.join(src, f"f{i}"))
            state.append("old" if d == old[i] else "new" if d == new[i][0] else "TORN")
    finally:
        subprocess.run([DEFERFS, "umount", "--discard", mnt], capture_output=True)
        cleanup_mount(mnt)
        try:
            _, log = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, log = proc.communicate()
    recovery = "finished" if "finished an interrupted sync" in log else \
               "dropped" if "had not committed" in log else "none"
    return state, journal, recovery, elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=int(os.environ.get("CRASH_TRIALS", "20")))
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("CRASH_SEED", "0")) or None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("crash_sync: needs root (drop of FUSE mounts, SIGKILL of the daemon)")
        return 77
    def stop(signum, frame):  # meson's timeout, or kill: unmount and clean up first
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)
    seed = args.seed or random.randrange(1 << 30)
    rnd = random.Random(seed)
    print(f"seed {seed}, {args.trials} trials, {NFILES} files x {CHANGED} changed pages")
    # How long does an uninterrupted sync take? The kill delays spread over it.
    work = tempfile.mkdtemp(prefix="deferfs-crash-", dir=args.workdir)
    failures, outcomes = 0, {}
    try:
        # Calibrate: an uninterrupted sync; kills then spread over 0..1.1x its time.
        _, _, _, full = trial(work, rnd, 0, kill=False)
        subprocess.run(["rm", "-rf", os.path.join(work, "src")])
        delay_max = full * 1.1
        print(f"an uninterrupted sync takes {full*1000:.0f} ms; kills spread over 0..{delay_max*1000:.0f} ms")
        for t in range(args.trials):
            state, journal, recovery, elapsed = trial(work, rnd, delay_max)
            ok = state in (["old"] * NFILES, ["new"] * NFILES)
            failures += not ok
            key = f"{'all ' + state[0] if ok else 'BAD ' + ','.join(state)} / journal left: {journal} / recovery: {recovery}"
            outcomes[key] = outcomes.get(key, 0) + 1
            print(f"trial {t}: kill after {elapsed*1000:.0f} ms: {state} journal={journal} recovery={recovery}"
                  + ("" if ok else "  <-- FAILED"), flush=True)
            subprocess.run(["rm", "-rf", os.path.join(work, "src")])
    finally:
        cleanup_mount(os.path.join(work, "mnt"))
        subprocess.run(["rm", "-rf", work])
    print("outcomes:")
    for k, v in sorted(outcomes.items()):
        print(f"  {v:4d}  {k}")
    print(f"{args.trials - failures} of {args.trials} trials all old or all new")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
