"""Lazy reading (spec 4.1-4.4): a 64 GiB sparse file opens at once, only the
touched pages are loaded and materialized, holes cost nothing, and the bytes
are the source's."""

import hashlib
import mmap
import os
import random
import subprocess
import threading
import time

import pytest

from conftest import read_file, run

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10
PAGE = 4096
BIG = 64 * GiB
# Kernel readahead may add up to this much per touch.
RA_SLACK = 128 * KiB

# Data chunks (offset, length) in the sparse file; the rest is holes.
CHUNKS = [
    (0, 1 * MiB),
    (5 * GiB + 3 * MiB, 512 * KiB),
    (17 * GiB, 1 * MiB),
    (31 * GiB + 512 * KiB, 512 * KiB),
    (48 * GiB + 4 * KiB, 768 * KiB),
    (BIG - 1 * MiB, 1 * MiB),
]
HOLES = [1 * GiB, 2 * GiB + 5 * PAGE, 20 * GiB, 40 * GiB + 123 * PAGE, BIG - 2 * MiB]


@pytest.fixture
def big(mount_factory, tmp_path, request):
    # Tests that count loads exactly mark themselves to mount without the
    # loader's own readahead (`@pytest.mark.mount_opts("readahead=0")`).
    marker = request.node.get_closest_marker("mount_opts")
    opts = list(marker.args) if marker else []
    src = tmp_path / "src"
    src.mkdir()
    path = src / "big.img"
    rng = random.Random(1234)
    data = {}
    with open(path, "wb") as f:
        f.truncate(BIG)
        for off, n in CHUNKS:
            b = rng.randbytes(n)
            os.pwrite(f.fileno(), b, off)
            data[off] = b
    m = mount_factory(opts=opts)
    return m, data


def source_bytes(data, off, n):
    """The expected bytes of the sparse file at [off, off+n)."""
    out = bytearray(n)
    for coff, b in data.items():
        a, e = max(off, coff), min(off + n, coff + len(b))
        if a < e:
            out[a - off:e - off] = b[a - coff:e - coff]
    return bytes(out)


def counters(m):
    s = m.stats()
    return s["loaded_bytes"], s["materialized_bytes"]


def test_stat_and_open_do_no_io(big):
    m, _ = big
    st = os.stat(m.m("big.img"))
    assert st.st_size == BIG
    t0 = time.monotonic()
    fd = os.open(m.m("big.img"), os.O_RDONLY)
    try:
        opened = time.monotonic() - t0
        s = m.stats()
        assert s["files_open"] == 1
        assert s["snapshots"] == 1
        assert s["loaded_bytes"] == 0, s
        assert s["materialized_bytes"] == 0, s
        assert opened < 1.0, f"open of a 64 GiB file took {opened:.3f}s"
    finally:
        os.close(fd)


def test_first_page_loads_only_touched_pages(big):
    m, data = big
    t0 = time.monotonic()
    fd = os.open(m.m("big.img"), os.O_RDONLY)
    try:
        got = os.read(fd, PAGE)
        elapsed = time.monotonic() - t0
    finally:
        os.close(fd)
    assert got == data[0][:PAGE]
    assert elapsed < 1.0, f"open + first 4 KiB of a 64 GiB file took {elapsed:.3f}s"
    loaded, mat = counters(m)
    assert PAGE <= loaded <= PAGE + RA_SLACK, loaded
    assert PAGE <= mat <= PAGE + RA_SLACK, mat


def test_holes_read_as_zeros_without_loading(big):
    m, _ = big
    fd = os.open(m.m("big.img"), os.O_RDONLY)
    try:
        for off in HOLES:
            assert os.pread(fd, PAGE, off) == bytes(PAGE), off
        # A large read in a hole: 1 MiB of zeros.
        assert os.pread(fd, MiB, 10 * GiB) == bytes(MiB)
    finally:
        os.close(fd)
    loaded, mat = counters(m)
    assert loaded == 0, f"holes must not be loaded: loaded_bytes={loaded}"
    assert mat == 0, f"holes must not be materialized: materialized_bytes={mat}"


def scattered_offsets(seed, count):
    rng = random.Random(seed)
    offs = []
    for i in range(count):
        coff, n = CHUNKS[i % len(CHUNKS)]
        off = coff + rng.randrange(0, n - 2 * PAGE)
        if i % 3 == 0:
            off -= off % PAGE  # some aligned, some crossing a page boundary
        offs.append(off)
    rng.shuffle(offs)
    return offs


def touched_pages(offs, n):
    pages = set()
    for off in offs:
        pages.update(range(off // PAGE, (off + n - 1) // PAGE + 1))
    return pages


def test_scattered_reads_exact_bytes_bounded_loading(big):
    m, data = big
    offs = scattered_offsets(7, 30)
    fd = os.open(m.m("big.img"), os.O_RDONLY)
    try:
        for off in offs:
            assert os.pread(fd, PAGE, off) == source_bytes(data, off, PAGE), off
    finally:
        os.close(fd)
    pages = touched_pages(offs, PAGE)
    loaded, mat = counters(m)
    assert loaded >= len(pages) * PAGE
    assert loaded <= len(offs) * (2 * PAGE + RA_SLACK), loaded
    assert mat <= len(offs) * (2 * PAGE + RA_SLACK), mat
    # dd with skip far into the file, as a tool would
    off = CHUNKS[3][0] + 64 * KiB
    out = run_bytes("dd", f"if={m.m('big.img')}", "bs=4k", f"skip={off // PAGE}", "count=1", "status=none")
    assert out == source_bytes(data, off, PAGE)


def run_bytes(*cmd):
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=60).stdout


def test_random_access_loads_only_touched_pages(big):
    """With POSIX_FADV_RANDOM the kernel asks for exactly the touched pages;
    deferfs must then load just those (spec 3: random access loads only the
    touched pages)."""
    m, data = big
    offs = scattered_offsets(11, 40)
    fd = os.open(m.m("big.img"), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for off in offs:
            assert os.pread(fd, PAGE, off) == source_bytes(data, off, PAGE), off
    finally:
        os.close(fd)
    pages = touched_pages(offs, PAGE)
    loaded, mat = counters(m)
    assert loaded == len(pages) * PAGE, (loaded, len(pages))
    assert mat == len(pages) * PAGE, (mat, len(pages))


@pytest.mark.mount_opts("readahead=0")
def test_concurrent_readers_of_same_pages_load_once(big):
    """Spec 4.3: clients faulting the same page at once cause one load. O_DIRECT
    bypasses the kernel's page cache, so each reader's request reaches the daemon."""
    m, data = big
    base = CHUNKS[2][0]
    npages = 64
    errors = []
    start = threading.Barrier(6)

    def reader(seed):
        try:
            fd = os.open(m.m("big.img"), os.O_RDONLY | os.O_DIRECT)
            buf = mmap.mmap(-1, PAGE)
            try:
                order = list(range(npages))
                random.Random(seed).shuffle(order)
                start.wait(10)
                for p in order:
                    n = os.preadv(fd, [buf], base + p * PAGE)
                    assert n == PAGE
                    if buf[:] != source_bytes(data, base + p * PAGE, PAGE):
                        errors.append(f"wrong bytes at page {p}")
            finally:
                os.close(fd)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    loaded, mat = counters(m)
    assert loaded == npages * PAGE, f"loaded_bytes={loaded}, expected {npages * PAGE} (one load per page)"
    assert mat == npages * PAGE, mat


def test_whole_file_tools_match_source(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(32 * MiB)
    (src / "rand.bin").write_bytes(data)
    m = mount_factory()
    want = hashlib.sha256(data).hexdigest()
    r = run("sha256sum", m.m("rand.bin"), check=True)
    assert r.stdout.split()[0] == want
    out = tmp_path / "copy.bin"
    with open(out, "wb") as f:
        subprocess.run(["cat", str(m.m("rand.bin"))], stdout=f, check=True, timeout=60)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == want
    assert read_file(m.m("rand.bin")) == data
    s = m.stats()
    # Every page loaded once, none twice.
    assert s["loaded_bytes"] == 32 * MiB, s
    assert 32 * MiB <= s["materialized_bytes"] <= 32 * MiB + 2 * MiB, s
