"""Fixtures for the views suite: the mount suite's (tests/mount/conftest.py),
re-exported, and the `deferfs` Python module from the build tree
(DEFERFS_PYTHONPATH, set by meson)."""

import importlib.util
import os
import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
# The mount suite's conftest imports its sibling modules (uring_param).
if str(_here.parent / "mount") not in sys.path:
    sys.path.insert(0, str(_here.parent / "mount"))
_spec = importlib.util.spec_from_file_location("mount_conftest", _here.parent / "mount" / "conftest.py")
_mount = importlib.util.module_from_spec(_spec)
sys.modules["mount_conftest"] = _mount
_spec.loader.exec_module(_mount)
globals().update({k: v for k, v in vars(_mount).items() if not k.startswith("__")})

_pp = os.environ.get("DEFERFS_PYTHONPATH")
if _pp and _pp not in sys.path:
    sys.path.insert(0, _pp)
