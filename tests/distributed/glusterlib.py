"""A private GlusterFS volume for tests and benchmarks (issue 13).

Gluster(...) starts glusterd with its working directory inside a private
temporary directory, creates a replica-2 volume on two bricks there, starts
it and mounts it through `clients` gluster clients (each mount a client of its
own, as two machines would be). close() unmounts everything, stops and
deletes the volume, kills glusterd and every glusterfs/glusterfsd it started,
and removes the directory, whatever state it was left in.

Only one such volume can run at a time on a machine (glusterd listens on
port 24007); a second start fails with a clear message.
"""
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

VOLUME = "deferfs_test"
COHERENCE_OPTIONS = ("performance.stat-prefetch", "performance.quick-read", "performance.io-cache")


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == os.path.realpath(path) for line in f)


def gluster_pids():
    """PIDs of the glusterd/glusterfsd/glusterfs processes running now."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            comm = open(f"/proc/{p}/comm").read().strip()
        except OSError:
            continue
        if comm in ("glusterd", "glusterfsd", "glusterfs"):
            out.append(int(p))
    return out


class Gluster:
    def __init__(self, clients=2, workdir=None):
        if not shutil.which("glusterd"):
            raise RuntimeError("glusterd not found: apt-get install glusterfs-server (.ci/packages)")
        self.host = socket.gethostname()
        self.dir = tempfile.mkdtemp(prefix="deferfs-gluster-", dir=workdir)
        self.before = set(gluster_pids())
        if any(open(f"/proc/{p}/comm").read().strip() == "glusterd" for p in self.before if os.path.exists(f"/proc/{p}")):
            shutil.rmtree(self.dir, ignore_errors=True)
            raise RuntimeError("a glusterd already runs on this machine (port 24007): stop it first")
        self.mounts = []
        self.started = False
        try:
            self._start(clients)
        except BaseException:
            self.close()
            raise

    def _cli(self, *args, check=True, timeout=60):
        r = subprocess.run(["gluster", "--mode=script", *args], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"gluster {' '.join(args)}: {r.stdout}{r.stderr}")
        return r

    def _start(self, clients):
        wd = os.path.join(self.dir, "glusterd")
        os.makedirs(wd)
        with open("/etc/glusterfs/glusterd.vol") as f:
            vol = f.read().replace("/var/lib/glusterd", wd)
        volfile = os.path.join(self.dir, "glusterd.vol")
        with open(volfile, "w") as f:
            f.write(vol)
        subprocess.run(["glusterd", "-f", volfile, "-p", os.path.join(self.dir, "glusterd.pid"),
                        "-l", os.path.join(self.dir, "glusterd.log")], check=True, timeout=30)
        self.started = True
        end = time.time() + 30
        while self._cli("volume", "list", check=False).returncode != 0:
            if time.time() > end:
                raise RuntimeError("glusterd did not answer within 30 s (see " + self.dir + "/glusterd.log)")
            time.sleep(0.2)
        bricks = [f"{self.host}:{os.path.join(self.dir, 'bricks', b)}" for b in ("b1", "b2")]
        os.makedirs(os.path.join(self.dir, "bricks"))
        self._cli("volume", "create", VOLUME, "replica", "2", *bricks, "force")
        # Client-side caches of attributes and small-file content that
        # another client's change does not invalidate: off, so that what one
        # client (one deferfs mount) commits is seen by the other (README:
        # running over a distributed filesystem).
        for opt in COHERENCE_OPTIONS:
            self._cli("volume", "set", VOLUME, opt, "off")
        self._cli("volume", "start", VOLUME)
        for i in range(clients):
            m = os.path.join(self.dir, f"client{i}")
            os.makedirs(m)
            end = time.time() + 30
            while True:
                r = subprocess.run(["mount", "-t", "glusterfs", f"{self.host}:/{VOLUME}", m],
                                   capture_output=True, text=True, timeout=60)
                if r.returncode == 0 and mounted(m):
                    break
                if time.time() > end:
                    raise RuntimeError(f"mount of the volume on {m} failed: {r.stderr}")
                time.sleep(0.5)
            self.mounts.append(m)

    def brick_pids(self):
        """The glusterfsd processes serving this volume's bricks."""
        out = []
        for p in gluster_pids():
            try:
                comm = open(f"/proc/{p}/comm").read().strip()
                cmd = open(f"/proc/{p}/cmdline").read()
            except OSError:
                continue
            if comm == "glusterfsd" and self.dir in cmd:
                out.append(p)
        return out

    def brick_io(self):
        """(read, written) bytes of the brick processes so far: rchar, wchar."""
        r = w = 0
        for p in self.brick_pids():
            for line in open(f"/proc/{p}/io"):
                k, v = line.split(":")
                if k == "rchar":
                    r += int(v)
                elif k == "wchar":
                    w += int(v)
        return r, w

    def close(self):
        for m in self.mounts:
            if mounted(m):
                if subprocess.run(["umount", m], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", m], capture_output=True)
        if self.started:
            try:
                self._cli("volume", "stop", VOLUME, "force", check=False, timeout=60)
                self._cli("volume", "delete", VOLUME, check=False, timeout=60)
            except subprocess.TimeoutExpired:
                pass
        # Everything gluster that was not running before: glusterd, the
        # bricks, the self-heal daemon, the clients.
        def ours():
            out = []
            for p in gluster_pids():
                try:
                    cmd = open(f"/proc/{p}/cmdline").read()
                except OSError:
                    continue
                if p not in self.before and (self.dir in cmd or VOLUME in cmd):
                    out.append(p)
            return out

        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = ours()
            for p in left:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            end = time.time() + 10
            while ours() and time.time() < end:
                time.sleep(0.1)
        shutil.rmtree(self.dir, ignore_errors=True)
