"""Fixtures of the model suite: the mount suite's mount_factory (tests/mount/
conftest.py), loaded through mountlib, with its daemon checks (daemon_watch)
and DEFERFS_NO_SKIP hook."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mountlib import mount_factory, daemon_watch  # noqa: E402,F401  (pytest fixtures)
from mountlib import pytest_runtest_makereport  # noqa: E402,F401  (DEFERFS_NO_SKIP)
