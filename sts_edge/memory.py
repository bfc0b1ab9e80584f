"""The process's resident memory high-water mark, per answer where the OS allows it.

A CPU backend's peak memory is the process's: Linux lets a process reset its own high-water mark
(writing 5 to /proc/self/clear_refs resets VmHWM), so each answer reports its own peak; where that
is not possible the figure is the process's lifetime peak, and says so.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def reset_process_peak() -> bool:
    """Start a new high-water mark; False where the OS keeps the lifetime peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def process_peak() -> int:
    """Bytes resident at most since the last reset (Linux) or since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
