"""What the host offers a CPU backend: its physical cores, and the process's resident memory (and
the CPU's name, for results files).

Threads: one per physical core (hyper-threads share a core's vector units, and a second thread
per core only contends for them). A CPU backend's peak memory is the process's: Linux lets a
process reset its own high-water mark (writing 5 to /proc/self/clear_refs resets VmHWM), so each
answer reports its own peak; where that is not possible the figure is the process's lifetime peak.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import sys
from pathlib import Path


def physical_cores() -> int:
    """Physical cores of this machine (Linux: distinct (package, core) pairs), else logical CPUs."""
    try:
        cores, package = set(), "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                package = value.strip()
            elif key.strip() == "core id":
                cores.add((package, value.strip()))
        if cores:
            return min(len(cores), len(os.sched_getaffinity(0)))
    except (OSError, AttributeError):
        pass
    return os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU as results files name it: its model (Linux: /proc/cpuinfo) and logical CPU count."""
    model = platform.processor()
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def cpu_threads(requested: int | None = None) -> int | None:
    """Intra-op threads for a CPU backend: `requested`, else STS_EDGE_THREADS, else one per physical
    core; None when OMP_NUM_THREADS is set, which the framework honours by itself."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be >= 1, got {requested}")
        return requested
    if os.environ.get("STS_EDGE_THREADS"):
        return int(os.environ["STS_EDGE_THREADS"])
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return physical_cores()


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


def map_large_allocations(threshold: int = 16 << 20) -> None:
    """Give every allocation of `threshold` bytes or more its own mapping, returned to the OS when
    freed (glibc; elsewhere nothing to do). Loading a model frees many large transients (a layer's
    checkpoint layout once it is repacked), and glibc's default threshold rises as such blocks are
    freed, so that later ones land in its heap and stay resident (benchmarks/README.md, the CPU path)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD; fixing it stops the rise
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc; elsewhere nothing to do)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
