"""Where hetserve keeps what it builds or measures once per machine (compiled kernels, device profiles)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """$XDG_CACHE_HOME/hetserve/<parts> (default ~/.cache/hetserve/<parts>)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root, "hetserve", *parts)
