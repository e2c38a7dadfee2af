"""Where tokensel keeps what it computes once, and how it writes there safely.

- :func:`cache_root`: ``$TOKENSEL_CACHE``, default ``~/.cache/tokensel``; converted packaged weights
  live in its ``weights/`` folder (``datamodules/encoders/packaged.py``);
- :func:`file_sha256`: the hex sha256 of a file, read in chunks;
- :func:`atomic_write`: write a file through a temporary sibling and one ``os.replace``, so a reader
  never sees half a file and two processes writing the same entry cannot corrupt it (each rename is
  of a complete file; the last one wins).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

CACHE_ENV = "TOKENSEL_CACHE"


def cache_root() -> Path:
    """``$TOKENSEL_CACHE`` if set, else ``~/.cache/tokensel``."""
    value = os.environ.get(CACHE_ENV, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "tokensel"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp makes it private; a cache may be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
