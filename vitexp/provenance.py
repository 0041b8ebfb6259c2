"""Where and with what a result was made, recorded beside every trial and benchmark row."""

from __future__ import annotations

import functools
import socket
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """The commit (with -dirty when vitexp/ differs from it), versions, host. Read once per
    process, when its first trial starts: the code a process runs is what it loaded then,
    whatever is committed while it runs."""
    import torch

    from vitexp import __version__

    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                cwd=here, timeout=5).stdout.strip()
        dirty = commit and subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=here,
                                          capture_output=True, timeout=5).returncode == 1
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"commit": (commit + ("-dirty" if dirty else "")) or "unknown", "vitexp": __version__,
            "torch": torch.__version__, "host": socket.gethostname()}
