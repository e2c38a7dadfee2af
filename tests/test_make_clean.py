"""`make clean` deletes only what can be rebuilt; results go only through `make clean-results`, which
lists them and asks, and without a terminal (or under CI=true) needs FORCE=1."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

RESULTS = ["runs/gumbel_ae/version_0/checkpoints/last.ckpt", "runs/gumbel_ae/version_0/config.yaml",
           "sweeps/depth/results.csv", "eval/20261203-120000/results.csv", "eval_vlm/20261203-120000/results.csv",
           "bench/bench.md"]
REBUILDABLE = ["data/default/index.json", ".pytest_cache/v/cache/nodeids", ".ruff_cache/CACHEDIR.TAG",
               "build/lib/tokensel/__init__.py", "dist/tokensel-0.1.0-py3-none-any.whl", "tokensel.egg-info/PKG-INFO",
               "selectors/__pycache__/catalog.cpython-311.pyc"]
KEPT = ["data/shards/index.json", "data/vlm/llava-tiny/config.json", ".venv/lib/keep.txt",
        ".venv/lib/__pycache__/keep.pyc"]


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A folder with the repo's Makefile, results, caches and data (no .venv needed: these targets
    do no set-up)."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("Makefile", "requirements.txt"):
        shutil.copy2(REPO / name, root / name)
    for name in RESULTS + REBUILDABLE + KEPT:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    return root


def make(root: Path, *args: str, env: dict | None = None, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("CI", "FORCE")}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=root, capture_output=True, text=True,
                          stdin=stdin, timeout=60, env={**full_env, **(env or {})})


def test_make_clean_keeps_runs_and_every_result(checkout):
    result = make(checkout, "clean")
    assert result.returncode == 0, result.stderr
    for name in RESULTS + KEPT:
        assert (checkout / name).is_file(), name
    for name in REBUILDABLE:
        assert not (checkout / name).exists(), name


@pytest.mark.parametrize("env", [{"CI": "true"}, {}])  # under CI, or no terminal to ask
def test_clean_results_refuses_without_a_terminal_or_in_ci_unless_forced(checkout, env):
    result = make(checkout, "clean-results", env=env)
    assert result.returncode != 0
    assert "clean-results deletes:" in result.stdout and "runs" in result.stdout and "bench" in result.stdout
    assert "FORCE=1" in result.stderr
    for name in RESULTS:
        assert (checkout / name).is_file(), name


def test_clean_results_with_force_lists_and_deletes_only_results(checkout):
    result = make(checkout, "clean-results", "FORCE=1", env={"CI": "true"})
    assert result.returncode == 0, result.stderr
    for folder in ("runs", "sweeps", "eval/", "eval_vlm/", "bench"):
        assert folder in result.stdout
    for name in RESULTS:
        assert not (checkout / name).exists(), name
    for name in KEPT + REBUILDABLE:
        assert (checkout / name).exists(), name
    again = make(checkout, "clean-results", env={"CI": "true"})
    assert again.returncode == 0 and "no runs/" in again.stdout
