"""transport=uring where the kernel does not allow it (enable_uring=N).

Run alone (meson: is_parallel false): enable_uring is turned off for a
moment and put back; uring_param refuses while another process holds it.
"""

import pytest

import uring_param
from conftest import DEFERFS, run


@pytest.fixture
def param_off():
    if not uring_param.available():
        pytest.skip(f"needs root and {uring_param.PARAM}")
    with uring_param.uring_disabled_alone():
        yield


def test_uring_refused_at_mount(param_off, tmp_path, mount_factory):
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    r = run(DEFERFS, tmp_path / "src", tmp_path / "mnt", "-f", "-o", "transport=uring", timeout=30)
    assert r.returncode == 2, r
    assert "transport=uring" in r.stderr and uring_param.PARAM in r.stderr, r.stderr
    assert "echo Y > " + uring_param.PARAM in r.stderr


def test_auto_chooses_dev_and_says_why(param_off, mount_factory):
    m = mount_factory(opts=["transport=auto"])
    st = m.stats()
    assert st["transport"] == "dev"
    assert "transport=auto" in st["transport_reason"] and uring_param.PARAM in st["transport_reason"]
    assert "transport: /dev/fuse (transport=auto: FUSE over io_uring is off" in m.log()
    # The daemon never turns the parameter on by itself.
    assert uring_param.read_param() == "N"
