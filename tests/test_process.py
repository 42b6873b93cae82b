"""Process helpers shared by the supervisor's children."""

from __future__ import annotations

import subprocess
import sys


def test_startup_objects_are_frozen_out_of_the_cyclic_collector() -> None:
    # in a fresh interpreter: freezing the test runner's own objects would leak them
    code = (
        "import gc\n"
        "from vask.process import freeze_startup_objects\n"
        "assert gc.get_freeze_count() == 0\n"
        "freeze_startup_objects()\n"
        "frozen = gc.get_freeze_count()\n"
        "assert frozen > 1000, frozen\n"
        "assert all(gc.get_count()[g] == 0 for g in (1, 2)), gc.get_count()\n"
        "print(frozen)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 1000
