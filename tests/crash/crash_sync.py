#!/usr/bin/python3
"""Crash test of the sync journal (spec 6.3, issues 4 and 16.4, 16.6).

Each trial: 3 source files with known "old" bytes; through a deferfs mount,
scattered pages of each are changed ("new"); `deferfs sync` starts and the
daemon is killed with SIGKILL. The source is then mounted again (recovery
finishes or drops the journal) and unmounted, and the 3 files must be all
old or all new together: none torn, none mixed.

The kills are spread evenly over the phases of the sync: trial t aims at
phase t mod 7 of planning, journal write, journal fsync, apply, fsyncs,
retire, recovery. Every daemon runs under the LD_PRELOAD shim io_trace.c,
which records each write, fsync, unlink of the source's files: a
calibration sync gives the calls of each phase; a trial aimed at a phase
has the shim SIGKILL the daemon at one of that phase's calls, chosen at
random, just before or just after it (planning: alternately just before
the sync's first call, and a timer within the calibrated planning time). A "recovery" trial kills the sync after it committed, then kills the
next mount's daemon in its recovery, then mounts a third time. The phase a
kill really landed in is read back from the killed daemon's trace, and the
outcome is reported by that phase; the test fails unless every phase was
hit (with at least 7 trials) and every trial is all old or all new.

    crash_sync.py [--trials N] [--file-pages P] [--changed C] [--workdir DIR] [--seed S]

Exit 0 if every trial passed, 1 otherwise.
"""
import argparse
import hashlib
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
from tracelib import PHASES  # noqa: E402

DEFERFS = os.environ.get("DEFERFS") or os.path.join(HERE, "../../build/src/deferfs")
PAGE = 4096
NFILES = 3


def mounted(path):
    path = os.path.abspath(path)  # never a stat of the mount: its daemon may be stuck
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def wait_mounted(mnt, proc, timeout=20):
    end = time.time() + timeout
    while not mounted(mnt):
        if proc.poll() is not None:
            raise RuntimeError(f"deferfs exited with status {proc.returncode} instead of mounting {mnt}")
        if time.time() > end:
            raise RuntimeError(f"{mnt} not mounted after {timeout}s")
        time.sleep(0.01)


def wait_dead(proc, timeout):
    """The exit status of proc within timeout s, or None."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def abort_connection(mnt):
    """Aborts the FUSE connection of the mount on mnt (fusectl, mounted for this if need be)."""
    dev = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == os.path.abspath(mnt):
                dev = fields[2].split(":")[1]
    if dev is None:
        return
    ctl = "/sys/fs/fuse/connections"
    ours = not os.path.ismount(ctl) and subprocess.run(["mount", "-t", "fusectl", "fusectl", ctl]).returncode == 0
    try:
        with open(os.path.join(ctl, dev, "abort"), "w") as f:
            f.write("1")
    except OSError as e:
        print(f"cannot abort the FUSE connection of {mnt}: {e}")
    finally:
        if ours:
            subprocess.run(["umount", ctl])


def cleanup_mount(mnt):
    if mounted(mnt):
        subprocess.run(["fusermount3", "-uz", mnt], capture_output=True)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Runner:
    def __init__(self, work, rnd, file_pages, changed):
        self.work, self.rnd = work, rnd
        self.src, self.mnt = os.path.join(work, "src"), os.path.join(work, "mnt")
        self.file_pages = file_pages
        # The same pages change in every trial (new bytes each time): every
        # sync then makes the same calls, and the calibration's hold.
        self.pattern = [sorted(rnd.sample(range(file_pages), changed)) for _ in range(NFILES)]
        self.n = 0
        self.bad_exits = []

    def daemon(self, log, kill_at=None):
        self.n += 1
        env = tracelib.preload_env(DEFERFS, self.src, os.path.join(self.work, f"trace.{self.n}"), kill_at=kill_at)
        with open(log, "ab") as logf:
            proc = subprocess.Popen([DEFERFS, self.src, self.mnt, "-f"], stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=logf, env=env)
        proc.trace = env["DEFERFS_TRACE_LOG"]
        wait_mounted(self.mnt, proc)
        return proc

    def expect_exit(self, proc, allowed, what, timeout=60):
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            if wait_dead(proc, 10) is None:
                # Killed, but a thread of it waits in a request to its own
                # mount that nobody will answer: abort the FUSE connection.
                abort_connection(self.mnt)
            rc = proc.wait()
            self.bad_exits.append(f"{what}: the daemon did not end in {timeout}s (SIGKILL did not end it either: "
                                  f"a thread of it was stuck in a request to its own mount)")
        if rc not in allowed:
            self.bad_exits.append(f"{what}: the daemon exited with status {rc}, expected {allowed}")
        cleanup_mount(self.mnt)
        return rc

    def setup_files(self):
        subprocess.run(["rm", "-rf", self.src])
        os.makedirs(self.src)
        os.makedirs(self.mnt, exist_ok=True)
        old, new = [], []
        for i in range(NFILES):
            data = bytearray(self.rnd.randbytes(self.file_pages * PAGE))
            with open(os.path.join(self.src, f"f{i}"), "wb") as f:
                f.write(data)
            old.append(hashlib.sha256(data).hexdigest())
            patch = {p: self.rnd.randbytes(PAGE) for p in self.pattern[i]}
            for p, b in patch.items():
                data[p * PAGE:(p + 1) * PAGE] = b
            new.append((hashlib.sha256(data).hexdigest(), patch))
        os.sync()
        return old, new

    def stage(self, new):
        for i in range(NFILES):
            fd = os.open(os.path.join(self.mnt, f"f{i}"), os.O_WRONLY)
            for p, b in new[i][1].items():
                os.pwrite(fd, b, p * PAGE)
            os.close(fd)

    def trial(self, sync_kill=None, delay=None, recovery_kill=None):
        """One sync: killed by the shim at call `sync_kill` ("N" or "N:after"),
        or by a timer after `delay` s, or not at all. Then the next mount
        (killed at `recovery_kill` if given, then a third mount). Returns a dict."""
        log = os.path.join(self.work, "daemon.log")
        open(log, "w").close()
        old, new = self.setup_files()
        proc = self.daemon(log, kill_at=sync_kill)
        before = tracelib.last_seq(proc.trace)
        self.stage(new)
        t0 = time.monotonic_ns()
        sync = subprocess.Popen([DEFERFS, "sync", self.mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed = sync_kill is not None or delay is not None
        if delay is not None:
            time.sleep(delay)
            proc.kill()
        missed = False
        if killed:
            # The shim's kill comes before the sync ends, unless the call
            # aimed at was never made: then the sync ends and the daemon lives.
            try:
                rc = sync.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.bad_exits.append(f"deferfs sync still running 120 s after the kill at {sync_kill or delay}")
                sync.kill()
                rc = sync.wait()
            if sync_kill is not None and wait_dead(proc, 2 if rc == 0 else 30) is None:
                missed = True
                proc.kill()
            self.expect_exit(proc, (-signal.SIGKILL,), f"the sync killed at {sync_kill or delay}")
        else:
            sync.wait(timeout=300)
            t_end = time.monotonic_ns()
            subprocess.run([DEFERFS, "umount", self.mnt], capture_output=True)
            self.expect_exit(proc, (0,), "a sync then umount")
        ops = tracelib.read_trace(proc.trace)
        phase = tracelib.phase_of(ops, self.src, before) if killed else "none"
        made = [o for o in ops if o.seq > before]
        if sync_kill is not None and ":" not in sync_kill and made and made[0].seq == int(sync_kill):
            phase = "planning"  # killed before the sync's first call was made
        if missed:
            phase = "after the sync (the call aimed at was not made)"
        journal = any(n.startswith("journal") for n in os.listdir(os.path.join(self.src, ".deferfs")))
        if not killed:  # the calls of the sync only, not those of the umount after it
            ops = [o for o in ops if o.ns <= t_end]
        result = {"ops": ops, "before": before, "t0": t0, "phase": phase, "journal": journal}
        if recovery_kill is not None:
            # The next mount's daemon is killed during its recovery.
            env = tracelib.preload_env(DEFERFS, self.src, os.path.join(self.work, "trace.recovery"),
                                       kill_at=recovery_kill)
            with open(log, "ab") as logf:
                proc2 = subprocess.Popen([DEFERFS, self.src, self.mnt, "-f"], stdin=subprocess.DEVNULL,
                                         stdout=logf, stderr=logf, env=env)
            rc = proc2.wait(timeout=60) if not self._mounts_or_dies(proc2) else None
            if rc is None:  # the kill missed the recovery: it mounted
                subprocess.run([DEFERFS, "umount", "--discard", self.mnt], capture_output=True)
                self.expect_exit(proc2, (0,), "the recovery mount")
            elif rc != -signal.SIGKILL:
                self.bad_exits.append(f"the recovery mount exited with status {rc}")
            cleanup_mount(self.mnt)
            rops = tracelib.read_trace(env["DEFERFS_TRACE_LOG"])
            src_ops = [o for o in rops if not tracelib.is_state(o.path, os.path.realpath(self.src))
                       or os.path.basename(o.path).startswith("journal")]
            result["phase"] = "recovery" if rc == -signal.SIGKILL and src_ops and \
                (rops[-1].seq == src_ops[-1].seq) else result["phase"] + " (recovery kill missed)"
        # The next mount: recovery runs before anything is served.
        with open(log, "ab") as logf:
            proc3 = subprocess.Popen([DEFERFS, self.src, self.mnt, "-f"], stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=logf)
        try:
            wait_mounted(self.mnt, proc3)
            state = []
            for i in range(NFILES):
                d = digest(os.path.join(self.src, f"f{i}"))
                state.append("old" if d == old[i] else "new" if d == new[i][0] else "TORN")
        finally:
            subprocess.run([DEFERFS, "umount", "--discard", self.mnt], capture_output=True)
            self.expect_exit(proc3, (0,), "the mount after the crash")
        text = open(log, errors="replace").read()
        reports = daemonwatch.log_problems(text)
        if reports:
            self.bad_exits.append("sanitizer reports: " + "; ".join(reports[:3]))
        result["recovery"] = "finished" if "finished an interrupted sync" in text else \
            "dropped" if "had not committed" in text else "none"
        result["state"] = state
        return result

    def _mounts_or_dies(self, proc, timeout=20):
        end = time.time() + timeout
        while time.time() < end:
            if proc.poll() is not None:
                return False
            if mounted(self.mnt):
                return True
            time.sleep(0.01)
        return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=int(os.environ.get("CRASH_TRIALS", "21")))
    ap.add_argument("--file-pages", type=int, default=int(os.environ.get("CRASH_FILE_PAGES", "8192")))
    ap.add_argument("--changed", type=int, default=int(os.environ.get("CRASH_CHANGED", "5000")))
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("CRASH_SEED", "0")) or None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("crash_sync: needs root (FUSE mounts, SIGKILL of the daemon)")
        return daemonwatch.no_skip_exit()

    def stop(signum, frame):  # meson's timeout, or kill: unmount and clean up first
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, stop)
    seed = args.seed or random.randrange(1 << 30)
    rnd = random.Random(seed)
    print(f"seed {seed}, {args.trials} trials, {NFILES} files of {args.file_pages} pages, "
          f"{args.changed} changed in each")
    work = tempfile.mkdtemp(prefix="deferfs-crash-", dir=args.workdir)
    failures, outcomes, hit = 0, {}, {p: 0 for p in PHASES}
    r = Runner(work, rnd, args.file_pages, args.changed)
    try:
        # Calibration: an uninterrupted sync gives the calls of each phase.
        cal = r.trial()
        if cal["state"] != ["new"] * NFILES:
            print(f"the uninterrupted sync left {cal['state']}")
            return 1
        calls = tracelib.sync_phases(cal["ops"], r.src, cal["before"])
        by_phase = {p: [o.seq for o, q in calls if q == p] for p in PHASES}
        first_ns = calls[0][0].ns - cal["t0"] if calls else 0
        print(f"calibration: {len(calls)} calls in the sync; " +
              ", ".join(f"{p} {len(by_phase[p])}" for p in PHASES[1:6]) +
              f"; planning {first_ns / 1e6:.0f} ms")
        # The calls of the next mount's recovery: a sync killed after its
        # commit, then a traced mount that is not killed.
        first_apply = (by_phase["apply"] or by_phase["fsyncs"])[0]
        env = tracelib.preload_env(DEFERFS, r.src, os.path.join(work, "trace.cal-recovery"))
        old, new = r.setup_files()
        proc = r.daemon(os.path.join(work, "daemon.log"), kill_at=str(first_apply))
        r.stage(new)
        subprocess.run([DEFERFS, "sync", r.mnt], capture_output=True, timeout=120)
        r.expect_exit(proc, (-signal.SIGKILL,), "recovery calibration: the killed sync")
        with open(os.path.join(work, "daemon.log"), "ab") as logf:
            p2 = subprocess.Popen([DEFERFS, r.src, r.mnt, "-f"], stdout=logf, stderr=logf, env=env)
        wait_mounted(r.mnt, p2)
        subprocess.run([DEFERFS, "umount", "--discard", r.mnt], capture_output=True)
        r.expect_exit(p2, (0,), "recovery calibration: the recovery mount")
        realsrc = os.path.realpath(r.src)
        rec_calls = [o.seq for o in tracelib.read_trace(env["DEFERFS_TRACE_LOG"])
                     if not tracelib.is_state(o.path, realsrc) or os.path.basename(o.path).startswith("journal")]
        print(f"calibration: the next mount's recovery makes {len(rec_calls)} calls")
        if not rec_calls:
            print("the recovery calibration saw no recovery")
            return 1

        for t in range(args.trials):
            aim = PHASES[t % len(PHASES)]
            after = rnd.random() < 0.5
            kw = {}
            if aim == "planning" and (t // len(PHASES)) % 2 == 0:
                # The last instant of planning: just before the sync's first call.
                kw["sync_kill"] = str(calls[0][0].seq)
                how = f"just before call {kw['sync_kill']}, the sync's first"
            elif aim == "planning":
                kw["delay"] = rnd.uniform(0, 0.9 * first_ns / 1e9)
                how = f"timer {kw['delay'] * 1000:.0f} ms"
            elif aim == "recovery":
                kw["sync_kill"] = str(rnd.choice(by_phase["apply"] or by_phase["fsyncs"]))
                k = rnd.choice(rec_calls)
                kw["recovery_kill"] = f"{k}:after" if after else str(k)
                how = f"sync call {kw['sync_kill']}, recovery call {kw['recovery_kill']}"
            else:
                if not by_phase[aim]:
                    print(f"the calibration sync made no call in phase {aim}")
                    return 1
                k = rnd.choice(by_phase[aim])
                kw["sync_kill"] = f"{k}:after" if after else str(k)
                how = f"call {kw['sync_kill']}"
            res = r.trial(**kw)
            state, phase = res["state"], res["phase"]
            ok = state in (["old"] * NFILES, ["new"] * NFILES)
            failures += not ok
            if phase in hit:
                hit[phase] += 1
            key = (phase, ("all " + state[0]) if ok else "BAD " + ",".join(state), res["recovery"])
            outcomes[key] = outcomes.get(key, 0) + 1
            print(f"trial {t}: aimed at {aim} ({how}): landed in {phase}: {state} "
                  f"journal left={res['journal']} recovery={res['recovery']}" + ("" if ok else "  <-- FAILED"),
                  flush=True)
    finally:
        cleanup_mount(r.mnt)
        subprocess.run(["rm", "-rf", work])
    print("outcomes by the phase the kill landed in:")
    print(f"  {'phase':34s} {'outcome':10s} {'next mount':10s} trials")
    for (phase, state, rec), v in sorted(outcomes.items(), key=lambda kv: (PHASES.index(kv[0][0])
                                                                        if kv[0][0] in PHASES else 99, kv[0])):
        print(f"  {phase:34s} {state:10s} {rec:10s} {v:6d}")
    missed = [p for p in PHASES if hit[p] == 0] if args.trials >= len(PHASES) else []
    print(f"{args.trials - failures} of {args.trials} trials all old or all new; phases hit: " +
          ", ".join(f"{p} {hit[p]}" for p in PHASES))
    for b in r.bad_exits:
        print("FAILED:", b)
    if missed:
        print("FAILED: no kill landed in: " + ", ".join(missed))
    return 1 if failures or missed or r.bad_exits else 0


if __name__ == "__main__":
    sys.exit(main())
