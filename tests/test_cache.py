"""``common/cache.py``: where the cache lives, and writes that leave either the old state or a whole file."""

from pathlib import Path

import pytest

from tokensel.common.cache import atomic_write, cache_root, file_sha256


def test_cache_root_follows_tokensel_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENSEL_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("TOKENSEL_CACHE")
    assert cache_root() == Path.home() / ".cache" / "tokensel"


def test_atomic_write_renames_a_complete_file_or_leaves_nothing(tmp_path):
    target = tmp_path / "entry.bin"
    atomic_write(target, lambda tmp: tmp.write_bytes(b"abc"))
    assert target.read_bytes() == b"abc"
    assert file_sha256(target) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")

    def half_then_fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"abc"  # the old entry, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["entry.bin"]  # no temporary file left


def test_file_sha256_is_computed_again_when_the_file_changes(tmp_path):
    import hashlib
    import os

    target = tmp_path / "weights.bin"
    target.write_bytes(b"abc")
    first = file_sha256(target)
    target.write_bytes(b"abd")  # same size: the modification time tells them apart
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert first == hashlib.sha256(b"abc").hexdigest()
    assert file_sha256(target) == hashlib.sha256(b"abd").hexdigest()
    assert file_sha256(target) == file_sha256(str(target))  # a str path is the same file
