"""The package layout: tokensel.* imports, and nothing shadows the standard library."""

import subprocess
import sys

from conftest import REPO


def test_no_selectors_package_at_top_level():
    # A regular package named `selectors` would shadow the standard library's (asyncio needs it).
    assert not (REPO / "selectors" / "__init__.py").exists()


def test_asyncio_imports_from_repo_root():
    result = subprocess.run([sys.executable, "-c", "import asyncio, selectors; print(selectors.SelectSelector)"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "SelectSelector" in result.stdout


def test_pytest_collects_from_repo_root():
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "test_pytest_collects_from_repo_root" in result.stdout


def test_card_folders_import_as_tokensel():
    import tokensel.callbacks.panels
    import tokensel.datamodules.shards
    import tokensel.experiments.config
    import tokensel.selectors.registry

    assert tokensel.selectors.registry.__file__.startswith(str(REPO / "selectors"))
    assert tokensel.datamodules.shards.__file__.startswith(str(REPO / "datamodules"))
