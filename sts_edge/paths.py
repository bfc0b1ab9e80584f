"""Where sts-edge keeps what it makes once and reuses: calibration files and the converted demo pair."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """~/.cache/sts-edge, or the directory STS_EDGE_CACHE names."""
    return Path(os.environ.get("STS_EDGE_CACHE", Path.home() / ".cache" / "sts-edge"))
