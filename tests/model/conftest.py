"""Fixtures of the model suite: the mount suite's mount_factory (tests/mount/
conftest.py), loaded through mountlib."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mountlib import mount_factory  # noqa: E402,F401  (a pytest fixture)
