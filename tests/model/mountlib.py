"""The helpers of tests/mount/conftest.py (mount, unmount, CLI, cleanup),
loaded under a name of their own so that this directory can have its own
conftest.py and fsx.py can run outside pytest."""

import importlib.util
import os
import sys

_NAME = "deferfs_mount_conftest"
_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "mount", "conftest.py")

if _NAME in sys.modules:
    _lib = sys.modules[_NAME]
else:
    _spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    _lib = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _lib
    _spec.loader.exec_module(_lib)

DEFERFS = _lib.DEFERFS
FSTYPE = _lib.FSTYPE
CliResult = _lib.CliResult
Mount = _lib.Mount
cli = _lib.cli
drop_cache = _lib.drop_cache
force_cleanup = _lib.force_cleanup
is_mounted = _lib.is_mounted
mount_factory = _lib.mount_factory
mounts_at = _lib.mounts_at
pread = _lib.pread
pwrite = _lib.pwrite
read_file = _lib.read_file
run = _lib.run
start_daemon = _lib.start_daemon
wait_for = _lib.wait_for
write_file = _lib.write_file
abspath = _lib._abspath
daemon_watch = _lib.daemon_watch
expect_daemon_exit = _lib.expect_daemon_exit
pytest_runtest_makereport = _lib.pytest_runtest_makereport
daemonwatch = _lib.daemonwatch
