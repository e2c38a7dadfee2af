"""Where tokensel keeps what it computes once, and how it writes there safely.

- :func:`cache_root`: ``$TOKENSEL_CACHE``, default ``~/.cache/tokensel``; converted packaged weights
  live in its ``weights/`` folder (``datamodules/encoders/packaged.py``);
- :func:`file_sha256`: the hex sha256 of a file, read in chunks, once per process while the file
  keeps its size and modification time;
- :func:`atomic_write`: write a file through a temporary sibling, ``fsync`` and one ``os.replace``,
  so a reader never sees half a file and two processes writing the same entry cannot corrupt it
  (each rename is of a complete file; the last one wins). Checkpoints are written through it too
  (``common/checkpoint_files.py``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

CACHE_ENV = "TOKENSEL_CACHE"
TEMP_SUFFIX = ".tmp"


def cache_root() -> Path:
    """``$TOKENSEL_CACHE`` if set, else ``~/.cache/tokensel``."""
    value = os.environ.get(CACHE_ENV, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "tokensel"


def file_sha256(path: Path) -> str:
    """The file's sha256, computed once per process for each (path, size, modification time):
    a fingerprint asks for the same weights file several times per start-up."""
    path = Path(path).resolve()
    st = path.stat()
    return _sha256(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: Path, size: int, mtime_ns: int, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (``.<name>.*.tmp``), ``fsync`` it,
    rename it to ``path`` and ``fsync`` the folder: a kill or a power loss at any moment leaves the
    previous file or the new one, never part of one. On an error the temporary file is removed and
    ``path`` is left as it was; a kill mid-write can leave it (``remove_stale_temps`` clears them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # mkstemp makes it private; a cache or a run folder may be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that a killed :func:`atomic_write` left in ``folder``."""
    stale = [p for p in Path(folder).glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
