"""A trained selector to share: `make export` writes safetensors + config.json, `from_pretrained` /
`load_selector` read it back with the same `select()`, `make eval` scores the folder, and
`push_to_hub` gets as far as the upload."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import FAST_ARGS, REPO, run_module
from tokensel.common.errors import CheckpointError
from tokensel.selectors.catalog import load_selector
from tokensel.selectors.inference import SelectorNet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tiny_corpus, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    args = FAST_ARGS + [f"data.root={tiny_corpus}", f"run.root={runs}", "trainer.max_steps=2", "run.panels_every_n_steps=0"]
    result = run_module("tokensel.experiments.train", "gumbel_ae", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    (ckpt,) = runs.glob("gumbel_ae/*/checkpoints/last.ckpt")
    return ckpt


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "gumbel_ae"
    result = subprocess.run(["make", "--no-print-directory", "export", f"CKPT={checkpoint}", f"OUT={folder}"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"to {folder}/" in result.stdout
    return folder


def test_export_writes_safetensors_and_a_config_that_names_what_it_was_trained_on(exported, checkpoint):
    assert {p.name for p in exported.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    config = json.loads((exported / "config.json").read_text())
    hp = torch.load(checkpoint, weights_only=True, map_location="cpu")["hyper_parameters"]
    assert config["format"] == "tokensel-selector" and config["objective"] == "gumbel_ae"
    assert config["selector"] == hp["selector"] and config["dims"] == hp["dims"]
    assert config["encoder"]["name"] == "timm:vit_tiny_patch16_224" and config["encoder"]["image_size"] == 64
    assert config["run_config"] == hp["config"]
    assert "tokensel" in (exported / "README.md").read_text()  # the hub's model card, with the library tag


def test_from_pretrained_gives_the_same_network_and_selection(exported, checkpoint):
    from_ckpt = load_selector(checkpoint)
    from_folder = SelectorNet.from_pretrained(exported)
    assert type(from_folder) is type(from_ckpt) and not from_folder.training
    assert from_folder.dims == from_ckpt.dims and from_folder.config == from_ckpt.config
    state_a, state_b = from_ckpt.state_dict(), from_folder.state_dict()
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    features = torch.randn(3, from_ckpt.dims.num_tokens, from_ckpt.dims.dim, generator=torch.Generator().manual_seed(0))
    for budget in (0.25, 5):
        idx_a, kept_a = from_ckpt.select(features, budget)
        idx_b, kept_b = load_selector(exported).select(features, budget)
        assert torch.equal(idx_a, idx_b) and torch.equal(kept_a, kept_b)


def test_make_eval_takes_the_exported_folder(exported, tiny_corpus, tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run(["make", "--no-print-directory", "eval", f"CKPTS={exported}", "SELECTORS=random,gumbel_ae",
                             "BUDGETS=0.5", f"ARGS=--out {out} --max-samples 8 data.root={tiny_corpus}"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["selector"] for r in rows} == {"random", "gumbel_ae"}
    gumbel = next(r for r in rows if r["selector"] == "gumbel_ae")
    assert 0 <= float(gumbel["recall_mean"]) <= 1 and gumbel["psnr_n"] == "8"


def test_push_to_hub_uploads_the_exported_folder(exported, monkeypatch):
    """Up to the network: the repo is created and the folder handed to `upload_folder` is one that
    loads back (HfApi's two calls are stand-ins: no hub is reachable here)."""
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = repo_id
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        calls["select"] = load_selector(folder_path).select(torch.ones(1, net.dims.num_tokens, net.dims.dim), 4)[0]
        return f"https://hub.example/{repo_id}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    net = load_selector(exported)
    assert net.push_to_hub("me/gumbel-ae-tiny") == "https://hub.example/me/gumbel-ae-tiny"
    assert calls["create"] == "me/gumbel-ae-tiny"
    assert calls["files"] == ["README.md", "config.json", "model.safetensors"]
    assert torch.equal(calls["select"], net.select(torch.ones(1, net.dims.num_tokens, net.dims.dim), 4)[0])


def test_export_with_push_offline_writes_the_folder_and_fails_in_one_line(checkpoint, tmp_path):
    folder = tmp_path / "out"
    result = run_module("tokensel.experiments.cli", "export", str(checkpoint), str(folder), "--push-to-hub",
                        "me/sel", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: --push-to-hub me/sel:") and f"{folder}/ is written" in line
    assert (folder / "model.safetensors").is_file()


def test_folders_that_are_not_exports_are_one_line(tmp_path, exported):
    with pytest.raises(CheckpointError, match="not an exported selector"):
        load_selector(tmp_path)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set"):
        load_selector("someone/no-such-selector")
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((exported / "config.json").read_text())
    config["dims"]["dim"] += 8
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "model.safetensors").write_bytes((exported / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="weights do not match gumbel_ae"):
        load_selector(broken)
