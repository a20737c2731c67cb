"""Writing a file so that readers see the old one or the whole new one, never a part.

Standard library only; used by the serving tools, the deploy tools and the studio alike.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(target: Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside `target` to write to; it replaces `target` in one rename when the
    block succeeds, and is removed when it fails. Safe against racing writers of the same file:
    the last rename wins and every version is whole.
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    staging = Path(name)
    try:
        yield staging
        os.chmod(staging, mode)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
