"""Reading what io_trace.c recorded of a daemon (issue 16.3, 16.4, 16.6).

preload_env() starts a daemon with the shim; read_trace() parses its log;
phase_of() names the phase of a sync a trace ended in.
"""

import os
import re
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))

# The phases of one sync, in order (committer.cc), then the next mount's.
PHASES = ["planning", "journal write", "journal fsync", "apply", "fsyncs", "retire", "recovery"]


def shim_path(deferfs):
    """The shim built beside the daemon: BUILD/tests/crash/libdeferfs_iotrace.so."""
    build = os.path.dirname(os.path.dirname(os.path.abspath(deferfs)))
    p = os.path.join(build, "tests", "crash", "libdeferfs_iotrace.so")
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p}: the LD_PRELOAD shim is not built (ninja -C {build})")
    return p


def _sanitizer_runtimes(exe):
    """A sanitized daemon's runtime (libasan, libtsan), which must come first
    in LD_PRELOAD (the sanitizers refuse to start otherwise)."""
    out = subprocess.run(["ldd", exe], capture_output=True, text=True).stdout
    return [m.group(1) for m in re.finditer(r"=>\s+(\S*lib(?:asan|tsan)\.so\S*)", out)][:1]


def preload_env(deferfs, root, log, data=False, kill_at=None, base=None):
    """The environment of a daemon traced below `root` into `log`."""
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = ":".join(_sanitizer_runtimes(deferfs) + [shim_path(deferfs)])
    env["DEFERFS_TRACE_ROOT"] = os.path.realpath(root)
    env["DEFERFS_TRACE_LOG"] = str(log)
    env.pop("DEFERFS_TRACE_DATA", None)
    env.pop("DEFERFS_TRACE_KILL_AT", None)
    if data:
        env["DEFERFS_TRACE_DATA"] = "1"
    if kill_at is not None:
        env["DEFERFS_TRACE_KILL_AT"] = str(kill_at)
    return env


class Op:
    __slots__ = ("seq", "ns", "op", "path", "args", "failed")

    def __init__(self, seq, ns, op, path, args):
        self.seq, self.ns, self.op, self.path, self.args, self.failed = seq, ns, op, path, args, False

    def __repr__(self):
        return f"{self.seq} {self.op} {self.path} {' '.join(self.args)}"


def _unescape(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def last_seq(log):
    """The sequence number of the last call recorded so far (0 if none)."""
    ops = read_trace(log)
    return ops[-1].seq if ops else 0


def read_trace(log):
    """The recorded calls, in order: [Op]. A call that failed has .failed set."""
    ops, by_seq = [], {}
    try:
        with open(log) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return ops
    for line in lines:
        parts = line.split(" ")
        if len(parts) < 3:
            continue  # a line cut by the kill
        seq, ns, op = int(parts[0]), int(parts[1]), parts[2]
        if op == "failed":
            if int(parts[3]) in by_seq:
                by_seq[int(parts[3])].failed = True
            continue
        o = Op(seq, ns, op, _unescape(parts[3]) if len(parts) > 3 else "", [_unescape(a) for a in parts[4:]])
        ops.append(o)
        by_seq[seq] = o
    return ops


def is_state(path, root):
    """True for deferfs' own files below the source root (.deferfs)."""
    return path == os.path.join(root, ".deferfs") or path.startswith(os.path.join(root, ".deferfs") + "/")


def is_journal(path, journal):
    """`path` is a mount's sync journal: .deferfs/journal or .deferfs/journal.ID."""
    return path == journal or path.startswith(journal + ".")


def op_phase(o, root, journal_seen, retired):
    """The phase of a sync that op `o` belongs to."""
    journal = os.path.join(root, ".deferfs", "journal")  # journal.ID: each mount's own (issue 13)
    statedir = os.path.join(root, ".deferfs")
    if is_journal(o.path, journal) and o.op == "unlink":
        return "retire"
    if retired:
        return "retire"
    if is_journal(o.path, journal) and o.op in ("create", "trunc", "write"):
        return "journal write"
    if is_journal(o.path, journal) and o.op == "fsync" or (o.path == statedir and o.op == "fsync" and not journal_seen[1]):
        return "journal fsync"
    if not is_state(o.path, root):
        if o.op == "fsync":
            return "fsyncs"
        if o.op in ("write", "truncate", "punch", "mtime", "trunc"):
            return "apply"
    return None


def phase_of(ops, root, since_seq=0):
    """The phase a trace of one sync ended in: that of its last call after
    `since_seq` ("planning" if none)."""
    phases = sync_phases(ops, root, since_seq)
    return phases[-1][1] if phases else "planning"


def sync_phases(ops, root, since_seq=0):
    """[(op, phase)] of every call of a sync after `since_seq`."""
    root = os.path.realpath(root)
    journal_seen = [False, False]
    retired = False
    out = []
    for o in ops:
        if o.seq <= since_seq:
            continue
        p = op_phase(o, root, journal_seen, retired)
        if p is None:
            continue
        if p in ("apply", "fsyncs"):
            journal_seen[1] = True
        if p == "retire":
            retired = True
        out.append((o, p))
    return out
