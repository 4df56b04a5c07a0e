#!/usr/bin/python3
"""Power-cut simulation of a sync (issue 16.3), after LevelDB's
fault_injection_test: what a power cut leaves is what was made durable,
plus any part of what was not.

1. A daemon runs under the LD_PRELOAD shim io_trace.c, which records every
   write, truncate, hole punch, fsync/fdatasync (files and directories),
   create, unlink and rename below the source, with the bytes written. Three
   files get scattered changes (one grows, one shrinks) through the mount and
   one `deferfs sync` commits them: its calls are the record.
2. For every prefix of the record (the cut came after call k), the model
   knows what was durable: a file's writes up to its last fsync, a
   directory's entries up to its last fsync. Each crash state keeps that
   plus a subset of the rest (writes after a file's last fsync, directory
   changes after the directory's last fsync): every subset when at most
   FULL_SUBSETS calls are not durable, else a bounded family (none, all,
   every prefix, every one dropped alone, every one kept alone, and random
   ones).
3. Each distinct state is written into the source directory (the source
   files keep their inodes: the journal names them by dev and inode), a
   daemon is mounted on it (the next mount's recovery runs before anything
   is served) and unmounted, and the three files must be all old or all new
   together, with no journal left behind.

Prints the number of crash states checked (and how many were distinct);
exit 0 only if every one held.

    powercut.py [--workdir DIR] [--seed S] [--ignore-fsync SUFFIX]

--ignore-fsync /journal shows that the test can fail: with the journal's
fsync taken out of the record, states where the journal is lost but the
files were partly written exist, and are reported torn.
"""
import argparse
import hashlib
import itertools
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import daemonwatch  # noqa: E402
import tracelib  # noqa: E402

DEFERFS = os.environ.get("DEFERFS") or os.path.join(HERE, "../../build/src/deferfs")
PAGE = 4096
NFILES = 3
FILE_PAGES = 192
# Up to this many calls not durable: every subset (2^8 states). POWERCUT_FULL_SUBSETS
# lowers it for slow (sanitized) runs.
FULL_SUBSETS = int(os.environ.get("POWERCUT_FULL_SUBSETS", "8"))
RANDOM_SUBSETS = 24  # beyond: this many random subsets besides the fixed family


def mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


class Daemon:
    """A foreground daemon on src/mnt; stop() checks it exits 0."""

    def __init__(self, src, mnt, log, env=None):
        self.mnt = mnt
        with open(log, "ab") as logf:
            self.proc = subprocess.Popen([DEFERFS, src, mnt, "-f"], stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=logf, env=env)
        end = time.time() + 20
        while not mounted(mnt):
            if self.proc.poll() is not None:
                raise RuntimeError(f"deferfs exited with status {self.proc.returncode} instead of mounting")
            if time.time() > end:
                raise RuntimeError(f"{mnt} not mounted after 20 s")
            time.sleep(0.005)

    def stop(self, discard=True):
        subprocess.run([DEFERFS, "umount"] + (["--discard"] if discard else []) + [self.mnt],
                       capture_output=True, timeout=60)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if mounted(self.mnt):
            subprocess.run(["fusermount3", "-uz", self.mnt], capture_output=True)
        return rc


# ------------------------------------------------------------------ model

class Call:
    """One recorded call, resolved: kind 'data' (an inode's content) or 'name'
    (a directory entry), with what it does."""

    def __init__(self, kind, target, what, directory=None):
        self.kind, self.target, self.what, self.dir = kind, target, what, directory


def apply_content(data, what):
    op = what[0]
    if op == "w":
        _, off, b = what
        if len(data) < off:
            data.extend(b"\0" * (off - len(data)))
        data[off:off + len(b)] = b
    elif op == "t":
        size = what[1]
        if size < len(data):
            del data[size:]
        else:
            data.extend(b"\0" * (size - len(data)))
    elif op == "z":
        _, off, n = what
        end = min(off + n, len(data))
        if off < end:
            data[off:end] = b"\0" * (end - off)


def resolve(ops, datafile):
    """The record as Calls, and the fsyncs: [(Call or ('fsync', path))]."""
    with open(datafile, "rb") as f:
        blob = f.read()
    out = []
    inode_of = {}  # path -> inode name while it has that name
    new_inodes = 0
    for o in ops:
        if o.failed:
            continue
        p = o.path
        if o.op == "write":
            off, n, at = int(o.args[0]), int(o.args[1]), int(o.args[2])
            out.append(Call("data", inode_of.get(p, p), ("w", off, blob[at:at + n])))
        elif o.op == "truncate":
            out.append(Call("data", inode_of.get(p, p), ("t", int(o.args[0]))))
        elif o.op == "trunc":
            out.append(Call("data", inode_of.get(p, p), ("t", 0)))
        elif o.op == "punch":
            out.append(Call("data", inode_of.get(p, p), ("z", int(o.args[0]), int(o.args[1]))))
        elif o.op == "create":
            new_inodes += 1
            ino = f"new#{new_inodes}"
            inode_of[p] = ino
            out.append(Call("name", p, ("link", ino), os.path.dirname(p)))
        elif o.op == "unlink":
            out.append(Call("name", p, ("unlink",), os.path.dirname(p)))
        elif o.op == "rename":
            a, b = p, o.args[0]
            out.append(Call("name", a, ("rename", b), os.path.dirname(a)))
            out.append(Call("name", b, ("rename-to", a), os.path.dirname(b)))
            if a in inode_of:
                inode_of[b] = inode_of.pop(a)
        elif o.op in ("mkdir", "rmdir"):
            out.append(Call("name", p, (o.op,), os.path.dirname(p)))
        elif o.op == "fsync":
            out.append(("fsync", p, inode_of.get(p, p)))
        elif o.op == "syncfs":
            out.append(("syncfs", p, None))
        # mtime: the contents do not depend on it.
    return out


def durability(record, k):
    """For the cut after record[:k]: (durable calls, volatile calls), each in order."""
    calls = [c for c in record[:k] if isinstance(c, Call)]
    synced = set()
    idx = {id(c): i for i, c in enumerate(calls)}
    pos = 0
    for c in record[:k]:
        if isinstance(c, Call):
            pos += 1
            continue
        what, path, ino = c
        for d in calls[:pos]:
            if what == "syncfs" or (d.kind == "data" and d.target == ino) or \
               (d.kind == "name" and d.dir == path):
                synced.add(idx[id(d)])
    durable = [c for i, c in enumerate(calls) if i in synced]
    volatile = [c for i, c in enumerate(calls) if i not in synced]
    return durable, volatile


def subsets(n, rnd):
    """Index sets of the kept volatile calls."""
    if n <= FULL_SUBSETS:
        for m in range(n + 1):
            yield from itertools.combinations(range(n), m)
        return
    seen = set()
    fam = [tuple(range(n)), ()]
    fam += [tuple(range(m)) for m in range(1, n)]                          # prefixes
    fam += [tuple(i for i in range(n) if i != j) for j in range(n)]        # one dropped
    fam += [(j,) for j in range(n)]                                       # one kept
    fam += [tuple(i for i in range(n) if rnd.random() < 0.5) for _ in range(RANDOM_SUBSETS)]
    for s in fam:
        if s not in seen:
            seen.add(s)
            yield s


def build_state(base_files, base_dirs, calls):
    """Applies calls (in record order) to the base: {path: bytes}, {dirs}."""
    names = {p: p for p in base_files}  # path -> inode
    content = {p: bytearray(b) for p, b in base_files.items()}
    dirs = set(base_dirs)
    for c in calls:
        if c.kind == "data":
            if c.target not in content:
                content[c.target] = bytearray()
            apply_content(content[c.target], c.what)
        else:
            op = c.what[0]
            if op == "link":
                names[c.target] = c.what[1]
                content.setdefault(c.what[1], bytearray())
            elif op == "unlink":
                names.pop(c.target, None)
            elif op == "rename":
                if c.target in names:
                    names[c.what[1]] = names.pop(c.target)
            elif op == "mkdir":
                dirs.add(c.target)
            elif op == "rmdir":
                dirs.discard(c.target)
    files = {p: bytes(content.get(ino, b"")) for p, ino in names.items()}
    return files, dirs


def state_key(files, dirs):
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(p.encode() + b"\0" + hashlib.sha256(files[p]).digest())
    for d in sorted(dirs):
        h.update(b"D" + d.encode() + b"\0")
    return h.hexdigest()


def materialize(root, files, dirs, base_files):
    """Makes the directory tree below root hold exactly files/dirs, writing
    files of the base in place (same inode)."""
    for d in sorted(dirs, key=len):
        os.makedirs(d, exist_ok=True)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames:
            p = os.path.join(dirpath, n)
            if p not in files:
                if p in base_files and not tracelib.is_state(p, root):
                    raise RuntimeError(f"{p}: a state without this source file (not modelled: its inode)")
                os.unlink(p)
    for p, data in files.items():
        fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)


def snapshot(root):
    files, dirs = {}, set()
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            dirs.add(os.path.join(dirpath, d))
        for n in filenames:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                files[p] = f.read()
    return files, dirs


# ------------------------------------------------------------------- run

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("POWERCUT_SEED", "0")) or None)
    ap.add_argument("--ignore-fsync", metavar="SUFFIX", default=None,
                    help="self-check of this test: model the fsyncs of paths ending in SUFFIX as never made "
                         "(e.g. --ignore-fsync /journal): the test must then fail")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("powercut: needs root (FUSE mounts)")
        return daemonwatch.no_skip_exit()

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)
    seed = args.seed or random.randrange(1 << 30)
    rnd = random.Random(seed)
    work = tempfile.mkdtemp(prefix="deferfs-powercut-", dir=args.workdir)
    src, mnt = os.path.join(work, "src"), os.path.join(work, "mnt")
    os.makedirs(src)
    os.makedirs(mnt)
    src = os.path.realpath(src)
    log = os.path.join(work, "daemon.log")
    trace = os.path.join(work, "trace")
    problems = []
    try:
        names = [os.path.join(src, f"f{i}") for i in range(NFILES)]
        old = []
        for p in names:
            b = rnd.randbytes(FILE_PAGES * PAGE)
            with open(p, "wb") as f:
                f.write(b)
            old.append(b)
        os.sync()
        d = Daemon(src, mnt, log, env=tracelib.preload_env(DEFERFS, src, trace, data=True))
        base_files, base_dirs = snapshot(src)
        before = tracelib.last_seq(trace)
        # Scattered runs of changed pages (over 1 MiB of journal in all: it is
        # written in more than one piece), f1 grows, f2 shrinks.
        for i in range(NFILES):
            fd = os.open(os.path.join(mnt, f"f{i}"), os.O_WRONLY)
            starts = sorted(rnd.sample(range(0, FILE_PAGES - 24, 26), 7))
            for s in starts:
                n = rnd.randint(6, 24)
                os.pwrite(fd, rnd.randbytes(n * PAGE - rnd.randint(0, 100)), (s + rnd.randint(0, 24 - n)) * PAGE)
            if i == 1:
                os.ftruncate(fd, (FILE_PAGES + 7) * PAGE + 123)
                os.pwrite(fd, rnd.randbytes(PAGE), (FILE_PAGES + 3) * PAGE)
            if i == 2:
                os.ftruncate(fd, (FILE_PAGES - 21) * PAGE - 5)
            os.close(fd)
        new = []
        for i in range(NFILES):
            with open(os.path.join(mnt, f"f{i}"), "rb") as f:
                new.append(f.read())
        r = subprocess.run([DEFERFS, "sync", mnt], capture_output=True, text=True, timeout=120)
        t_end = time.monotonic_ns()
        if r.returncode != 0:
            raise RuntimeError(f"deferfs sync: exit {r.returncode}: {r.stderr}")
        rc = d.stop(discard=False)
        if rc != 0:
            problems.append(f"the recorded daemon exited with status {rc}")
        for i, p in enumerate(names):
            with open(p, "rb") as f:
                if f.read() != new[i]:
                    problems.append(f"{p}: the sync did not leave the new bytes")
        ops = [o for o in tracelib.read_trace(trace) if o.seq > before and o.ns <= t_end]
        if args.ignore_fsync:
            ops = [o for o in ops if not (o.op == "fsync" and o.path.endswith(args.ignore_fsync))]
        record = resolve(ops, trace + ".data")
        counts = {}
        for o in ops:
            counts[o.op] = counts.get(o.op, 0) + 1
        print(f"seed {seed}: the sync of {NFILES} files made {len(ops)} calls: " +
              ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        final_files, _ = snapshot(src)

        checked, results, bad = 0, {}, []
        outcome_counts = {}
        for k in range(len(record) + 1):
            durable, volatile = durability(record, k)
            for keep in subsets(len(volatile), rnd):
                checked += 1
                kept = set(keep)
                chosen = {id(c) for c in durable} | {id(volatile[i]) for i in kept}
                calls = [c for c in record[:k] if isinstance(c, Call) and id(c) in chosen]
                files, dirs = build_state(base_files, base_dirs, calls)
                key = state_key(files, dirs)
                if key not in results:
                    materialize(src, files, dirs, base_files)
                    open(log, "w").close()
                    dd = Daemon(src, mnt, log)
                    got = []
                    for i, p in enumerate(names):
                        with open(p, "rb") as f:
                            b = f.read()
                        got.append("old" if b == old[i] else "new" if b == new[i] else "TORN")
                    journal_left = any(n.startswith("journal") for n in os.listdir(os.path.join(src, ".deferfs")))
                    rc = dd.stop()
                    text = open(log, errors="replace").read()
                    extra = []
                    if rc != 0:
                        extra.append(f"daemon exit {rc}")
                    if journal_left:
                        extra.append("journal left after recovery")
                    extra += daemonwatch.log_problems(text)
                    results[key] = (got, extra)
                got, extra = results[key]
                ok = got in (["old"] * NFILES, ["new"] * NFILES) and not extra
                outcome = ("all " + got[0]) if ok else "BAD " + ",".join(got) + " " + "; ".join(extra)
                outcome_counts[outcome] = outcome_counts.get(outcome, 0) + 1
                if not ok and len(bad) < 10:
                    bad.append(f"cut after call {k} of {len(record)}, {len(volatile)} not durable, kept "
                               f"{sorted(kept)}: {outcome}")
        # Leave the source as the sync did.
        materialize(src, final_files, base_dirs, base_files)
        print(f"{checked} crash states checked ({len(results)} distinct, each recovered by a mount): " +
              ", ".join(f"{v} {k}" for k, v in sorted(outcome_counts.items())))
        problems += bad
        if checked - sum(v for k, v in outcome_counts.items() if k.startswith("all ")):
            problems.append(f"{checked - outcome_counts.get('all old', 0) - outcome_counts.get('all new', 0)} "
                            f"of {checked} crash states did not hold")
    finally:
        if mounted(mnt):
            subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)
        subprocess.run(["rm", "-rf", work])
    for p in problems:
        print("FAILED:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
