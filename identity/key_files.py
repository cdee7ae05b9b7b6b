"""Who may read a key file: its owner, and at most its group (read only).

A pseudonymisation or ledger key readable by other users lets any of them recompute every
pseudonym or sign ledger checkpoints, so a key file with wider permissions is refused when it
is loaded, never used with a warning. Group read is allowed because Kubernetes mounts a
Secret for a non-root container as root-owned files readable by the pod's fsGroup (0440).
"""

from __future__ import annotations

import stat
from pathlib import Path

# Any permission for others, and write or execute for the group.
TOO_OPEN = stat.S_IRWXO | stat.S_IWGRP | stat.S_IXGRP


def key_file_mode_problem(path: Path) -> str | None:
    """Why ``path`` may not hold a key (None when it may, or when it cannot be read: the
    caller's read reports that)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    if mode & TOO_OPEN:
        return (
            f"key file {path} has mode {mode:04o}: other users can read or change it; "
            f"make it readable by its owner only (chmod 600 {path})"
        )
    return None
