"""Malformed control input (spec 8.2) against a real daemon: 2,000 random and
crafted bad messages on its control socket (found, like the CLI finds it,
through the user.deferfs.control attribute of the mount). Each gets an error
reply (or, for a framing error, an error reply and a closed connection; an
empty packet reads as end of stream and just closes it), none is acted on,
clients that connect and stall do not hold up others, and afterwards the
daemon is alive, the mount works, and the staged state and the source are
exactly as before.

Never sent: a valid request for sync, discard or umount (they would change
the state this test checks is unchanged).
"""

import hashlib
import json
import os
import random
import socket
import time

import pytest

from conftest import pread, pwrite, read_file, write_file

PAGE = 4096
MAX_PACKET = 64 << 10
MAX_MESSAGE = 1 << 20
SERVER_IO_TIMEOUT = 5.0   # ControlServer::kIoTimeoutMs
MAX_CLIENTS = 16          # ControlServer::kMaxClients
REPLY_WAIT = 3.0
N_MESSAGES = 2000

OPS = ["sync", "status", "discard", "stats", "umount"]


# ------------------------------------------------------------ the socket


class Conn:
    """One SOCK_SEQPACKET connection to the daemon's control socket."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.s.settimeout(REPLY_WAIT)
        self.s.connect(path)

    def send(self, packet):
        """Sends one packet; False if the daemon already closed its end."""
        try:
            self.s.send(packet)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def reply(self, timeout=REPLY_WAIT):
        """The next message as a dict (reassembling fragments), or None at end of stream."""
        self.s.settimeout(timeout)
        text = b""
        while True:
            try:
                p = self.s.recv(MAX_PACKET + 16)
            except ConnectionResetError:
                return None
            if not p:
                return None
            if p[:1] == b"+":
                text += p[1:]
                continue
            if p[:1] == b"=":
                p = text + p[1:]
            return json.loads(p)

    def closed(self, timeout=REPLY_WAIT):
        """True if the daemon closed the connection (end of stream) within `timeout`."""
        self.s.settimeout(timeout)
        try:
            while True:
                p = self.s.recv(MAX_PACKET + 16)
                if not p:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.s.close()


def request(sock, req):
    c = Conn(sock)
    try:
        assert c.send(json.dumps(req).encode())
        return c.reply(timeout=30)
    finally:
        c.close()


# ---------------------------------------------------------- the messages


def valid_texts():
    """Valid requests, used only as material to cut and mutate."""
    out = []
    for op in OPS:
        req = {"version": 1, "op": op}
        if op in ("sync", "status", "discard"):
            req["paths"] = ["", "f.bin"]
        if op == "sync":
            req["force"] = True
        if op == "umount":
            req["discard"] = False
        out.append(json.dumps(req))
        out.append(json.dumps(req, indent=2))
    return out


def truncated(rng):
    t = rng.choice(valid_texts())
    return t[:rng.randrange(1, len(t) - 1)].encode()  # every proper prefix of an object is invalid


def random_bytes(rng):
    n = rng.choice([1, 2, 3, 7, 64, 512, 4096, rng.randrange(1, 20000)])
    b = bytearray(rng.randbytes(n))
    if b[0] == ord("+"):  # would start a fragmented message: that has its own cases
        b[0] = ord("x")
    return bytes(b)


NON_UTF8 = [b"\xff", b"\xfe\xff", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"\xf8\x88\x80\x80\x80", b"\x80", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98"]


def non_utf8(rng):
    bad = rng.choice(NON_UTF8)
    op = rng.choice(OPS)
    where = rng.randrange(4)
    if where == 0:
        return b'{"version":1,"op":"' + op.encode() + bad + b'","paths":[""]}'
    if where == 1:
        return b'{"version":1,"op":"' + op.encode() + b'","paths":["dir/' + bad + b'"]}'
    if where == 2:
        return b'{"version":1,"op":"' + op.encode() + b'","paths":[""],"' + bad + b'":1}'
    t = bytearray(rng.choice(valid_texts()).encode())
    t[rng.randrange(len(t))] = bad[0]
    return bytes(t) if bad[0] >= 0x80 else bytes(t) + b"\xff"


def wrong_types(rng):
    op = rng.choice(OPS)
    base = {"version": 1, "op": op}
    if op in ("sync", "status", "discard"):
        base["paths"] = [""]
    field, values = rng.choice([
        ("version", ["1", 1.5, 0, 2, -1, None, True, [1], {"v": 1}, 1e300, 2 ** 70]),
        ("op", [5, None, True, [op], {"op": op}, 1.0]),
        ("paths", ["", "f.bin", 1, None, True, {"p": ""}, [1], [None], [[""]], [{"p": ""}], [True]]),
        ("force", ["yes", 1, None, [True], {"f": True}, 0.0]),
        ("discard", ["no", 0, None, [False], {}]),
    ])
    req = dict(base)
    req[field] = rng.choice(values)
    # force/discard with the right type are still wrong on the wrong op;
    # with the right op their type above is always wrong.
    return json.dumps(req).encode()


def not_an_object(rng):
    return rng.choice([b"[]", b"null", b"1", b'"sync"', b"true", b'[{"version":1,"op":"stats"}]', b" ",
                       b"{}", b'{"version":1}', b'{"op":"stats"}', b"\n\t ", b"{,}", b'{"version":1,"op":"stats"}x',
                       b'{"version":1,"op":"stats"}{}', b"\x00", b'{"version":1,"op":"stats"}\x00',
                       b'{"version":1,"op":"stats",}', b"{'version':1,'op':'stats'}"])


UNKNOWN_OPS = ["SYNC", "Sync", "sync ", " status", "stat", "statss", "rm", "", "mount", "unmount", "delete",
               "status\n", "sync\u0000", "discard\t", "umount!", "\u00fcmount", "sync;umount", "../sync",
               "commit", "fsync", "shutdown", "kill", "exec", "x" * 5000]


def unknown_op(rng):
    req = {"version": 1, "op": rng.choice(UNKNOWN_OPS), "paths": [""]}
    if rng.random() < 0.3:
        req["extra"] = rng.choice([1, "x", None])
        req["op"] = rng.choice(["sync", "status", "discard", "umount"])  # known op, unknown field
    return json.dumps(req).encode()


BAD_PATHS = ["..", "../", "../etc", "/", "/etc/passwd", "a/..", "a/../..", "a/../../b", "./..", "x/./../..",
             "..//", "sub/../../../../root", "\u0000", "a\u0000b", "f.bin\u0000", "/f.bin", "//f.bin",
             "x" * 4097, ("d/" * 2100), "n" * 256, "ok/" + "n" * 300]


def bad_path(rng):
    op = rng.choice(OPS)
    paths = [rng.choice(BAD_PATHS)]
    if rng.random() < 0.5:
        paths.insert(rng.randrange(2), "f.bin")  # a good path next to it does not make it good
    req = {"version": 1, "op": op, "paths": paths}
    if op == "sync":
        req["force"] = rng.random() < 0.5
    return json.dumps(req).encode()


def deep_nesting(rng):
    depth = rng.choice([9, 10, 50, 1000, 30000])
    where = rng.randrange(3)
    if where == 0:
        inner = "[" * depth + "]" * depth
        return ('{"version":1,"op":"status","paths":' + inner + "}").encode()
    if where == 1:
        inner = '{"a":' * depth + "1" + "}" * depth
        return ('{"version":1,"op":"stats","x":' + inner + "}").encode()
    return ("[" * depth + "]" * depth).encode()


GENERATORS = [
    ("random", random_bytes, 550),
    ("truncated", truncated, 300),
    ("non-utf8", non_utf8, 250),
    ("wrong-type", wrong_types, 300),
    ("not-object", not_an_object, 100),
    ("unknown-op", unknown_op, 200),
    ("bad-path", bad_path, 250),
    ("nesting", deep_nesting, 50),
]


def message_list(seed=8_2):
    rng = random.Random(seed)
    msgs = []
    for kind, gen, n in GENERATORS:
        msgs += [(kind, gen(rng)) for _ in range(n)]
    rng.shuffle(msgs)
    return msgs


# ------------------------------------------------------------- fixtures


def source_digest(m):
    h = {}
    for root, dirs, files in os.walk(m.src):
        for name in files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            h[os.path.relpath(p, m.src)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(read_file(p)).hexdigest())
    return h


@pytest.fixture
def staged(mount_factory, tmp_path):
    """A mount with f.bin (16 pages) whose pages 1 and 7 are staged, and a
    staged new file. Returns (mount, socket path, snapshot of the state)."""
    src = tmp_path / "src"
    src.mkdir()
    write_file(src / "f.bin", bytes(range(256)) * (16 * PAGE // 256))
    (src / "sub").mkdir()
    write_file(src / "sub" / "g", b"g" * 100)
    m = mount_factory()
    pwrite(m.m("f.bin"), b"S" * PAGE, 1 * PAGE)
    pwrite(m.m("f.bin"), b"T" * 10, 7 * PAGE + 5)
    write_file(m.m("sub/new"), b"new file")
    sock = os.getxattr(str(m.mnt), "user.deferfs.control").decode()
    assert os.path.exists(sock)
    return m, sock, snapshot(m)


def snapshot(m):
    st = m.status()
    s = m.stats()
    return {"status": st, "dirty_pages": s["dirty_pages"], "dirty_bytes": s["dirty_bytes"],
            "synced_bytes": s["synced_bytes"], "source": source_digest(m),
            "view": hashlib.sha256(read_file(m.m("f.bin"))).hexdigest()}


def assert_unchanged(m, before):
    assert m.proc.poll() is None, f"daemon died: exit status {m.proc.returncode}\n{m.log()}"
    assert m.mounted()
    after = snapshot(m)
    assert after == before, f"state changed\nbefore {before}\nafter {after}\n{m.log()}"
    # The mount still works for reading and writing.
    assert pread(m.m("f.bin"), PAGE, PAGE) == b"S" * PAGE
    assert read_file(m.m("sub/new")) == b"new file"


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def is_error_reply(r):
    return (isinstance(r, dict) and r.get("ok") is False and isinstance(r.get("error"), str) and r["error"]
            and isinstance(r.get("errno"), str) and r["errno"].startswith("E"))


# ----------------------------------------------------------------- tests


def test_two_thousand_malformed_messages(staged):
    m, sock, before = staged
    pid = m.proc.pid
    fds_before = fd_count(pid)
    msgs = message_list()
    assert len(msgs) >= N_MESSAGES
    answered = closed = 0
    kinds = {}
    c = Conn(sock)
    t0 = time.monotonic()
    try:
        for i, (kind, data) in enumerate(msgs):
            packets = [data]
            if len(data) > MAX_PACKET and i % 2:
                # Too large for one packet: half of them travel as fragments
                # (reassembled, then refused like any other bad request).
                pieces = [data[o:o + MAX_PACKET - 1] for o in range(0, len(data), MAX_PACKET - 1)]
                packets = [b"+" + p for p in pieces[:-1]] + [b"=" + pieces[-1]]
            # Framing errors: the daemon replies, then closes the connection.
            framing = len(packets) == 1 and (len(data) > MAX_PACKET or data[:1] == b"=")
            sent = all(c.send(p) for p in packets)
            r = c.reply()
            if r is None:
                pytest.fail(f"message {i} ({kind}, {len(data)} bytes, sent={sent}): connection closed "
                            f"without a reply: {data[:120]!r}")
            assert is_error_reply(r), f"message {i} ({kind}): {data[:200]!r} got {r}"
            assert "progress" not in r and "result" not in r, r
            answered += 1
            kinds[kind] = kinds.get(kind, 0) + 1
            if framing:
                if len(data) > MAX_PACKET:
                    assert r["errno"] == "EMSGSIZE", r
                assert c.closed(), f"message {i}: connection still open after a framing error"
                closed += 1
                c.close()
                c = Conn(sock)
            else:
                assert r["errno"] == "EINVAL", (i, kind, data[:200], r)
    finally:
        c.close()
    elapsed = time.monotonic() - t0
    print(f"{answered} malformed messages answered with an error ({closed} framing errors closed the "
          f"connection) in {elapsed:.1f} s: {kinds}")
    assert answered == len(msgs)
    assert_unchanged(m, before)
    assert fd_count(pid) <= fds_before + 2, "the daemon leaks file descriptors"


def test_framing_errors(staged):
    """Oversized packets and messages, fragments out of order or cut off."""
    m, sock, before = staged
    cases = 0

    def expect_error_then_close(packets, errno_name):
        nonlocal cases
        c = Conn(sock)
        try:
            for p in packets:
                if not c.send(p):
                    break
            r = c.reply(timeout=SERVER_IO_TIMEOUT + 3)
            assert is_error_reply(r) and r["errno"] == errno_name, (packets[0][:40], r)
            assert c.closed()
        finally:
            c.close()
        cases += 1

    # One packet over the limit.
    for n in (MAX_PACKET + 1, 100_000, 200_000):
        expect_error_then_close([b"{" + b" " * (n - 2) + b"}"], "EMSGSIZE")
    # Fragments adding up to more than the message limit.
    piece = b"+" + b"[" * (MAX_PACKET - 1)
    expect_error_then_close([piece] * (MAX_MESSAGE // (MAX_PACKET - 1) + 2), "EMSGSIZE")
    # A final fragment with no first one; a plain packet inside a fragmented message.
    expect_error_then_close([b'={"version":1,"op":"stats"}'], "EINVAL")
    expect_error_then_close([b'+{"version":1,', b'"op":"stats"}'], "EINVAL")
    # A first fragment, then the connection is closed: nothing to answer, nothing done.
    c = Conn(sock)
    c.send(b'+{"version":1,"op":"discard","paths":[""]')
    c.close()
    # Fragments that reassemble into something malformed or unsafe: an error, connection kept.
    c = Conn(sock)
    try:
        for text in [b'{"version":1,"op":"discard","paths":[".."]}', b'{"version":1,"op":"umount","discard":"1"}',
                     b'{"version":1,"op":"sync","paths":["/"]}']:
            assert c.send(b"+" + text[:10]) and c.send(b"+" + text[10:20]) and c.send(b"=" + text[20:])
            r = c.reply()
            assert is_error_reply(r) and r["errno"] == "EINVAL", r
            cases += 1
        # ... and the same connection still serves a good request.
        assert c.send(b'{"version":1,"op":"stats"}')
        r = c.reply()
        assert r["ok"] is True, r
    finally:
        c.close()
    # Empty packets: read as end of stream; the connection closes, nothing happens.
    for _ in range(20):
        c = Conn(sock)
        c.send(b"")
        assert c.closed()
        c.close()
        cases += 1
    print(f"{cases} framing cases")
    assert_unchanged(m, before)


def test_stalled_clients_do_not_block_others(staged):
    m, sock, before = staged
    pid = m.proc.pid
    threads_before = thread_count(pid)
    stalled = []
    try:
        # Clients that connect and send nothing, or half a message, and stall.
        for i in range(MAX_CLIENTS - 2):
            c = Conn(sock)
            if i % 2:
                c.send(b'+{"version":1,"op":"stats"')
            stalled.append(c)
        time.sleep(0.2)
        # Others are served at once meanwhile, through the CLI and directly.
        for _ in range(5):
            t0 = time.monotonic()
            r = request(sock, {"version": 1, "op": "status", "paths": [""]})
            assert r["ok"] is True and time.monotonic() - t0 < 1.0, r
        t0 = time.monotonic()
        st = m.status()
        assert time.monotonic() - t0 < 2.0 and st == before["status"]
        # Filling every slot: one more is told the daemon is busy, at once (not hung).
        extra = [Conn(sock) for _ in range(4)]
        stalled += extra
        time.sleep(0.2)
        c = Conn(sock)
        c.send(b'{"version":1,"op":"stats"}')
        t0 = time.monotonic()
        r = c.reply()
        c.close()
        assert time.monotonic() - t0 < 1.0
        assert r["ok"] is True or r["errno"] == "EBUSY", r
        # Stalled clients are dropped after the server's timeout, and their
        # slots free up: the stalled-with-a-fragment ones get a truncation error.
        deadline = time.monotonic() + SERVER_IO_TIMEOUT + 5
        for i, s in enumerate(stalled):
            left = max(0.1, deadline - time.monotonic())
            r = s.reply(timeout=left)
            assert r is None or (is_error_reply(r) and r["errno"] in ("EINVAL", "EBUSY")), r
        r = request(sock, {"version": 1, "op": "stats"})
        assert r["ok"] is True, r
    finally:
        for s in stalled:
            s.close()
    assert wait_threads(pid, threads_before + 4), (thread_count(pid), threads_before)
    assert_unchanged(m, before)


def wait_threads(pid, limit, timeout=SERVER_IO_TIMEOUT + 5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if thread_count(pid) <= limit:
            return True
        time.sleep(0.1)
    return False
