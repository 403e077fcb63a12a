"""Write files that other processes read: whole or not at all, readable by their owner only.

A reader (``Cluster.connect``, ``jupyter-dist list``, the server extension)
may look at any moment. Writing in place lets it see a file that exists but
is still empty or half-written; so the text goes to a temporary file with
mode 0600 in the same folder, which then replaces the target in one
``rename`` (atomic within a file system).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` in one step; the file has mode 0600."""
    target = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
