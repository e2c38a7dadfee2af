"""Every entry point answers a user mistake with one ``error:`` line naming the key, file or value,
exit status 2, and no traceback (``common/cli.py``). Each case runs the module's ``main`` through
``run_main`` in this process, as its ``__main__`` does (an uncaught exception fails the test); a few
run as subprocesses too, as ``make`` runs them."""

from __future__ import annotations

import importlib

import pytest

from conftest import REPO, run_module
from tokensel.common.cli import run_main

TRAIN = "tokensel.experiments.train"


def bad_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("selector:\n  depth: [1, 2\n")
    return str(path)


def bad_ckpt(tmp_path, kind: str) -> str:
    """A checkpoint that must be refused: ``garbage`` bytes, ``truncated`` half of a real torch
    file, or ``pickled``: one that needs a pickled Python object (argparse.Namespace) to load."""
    import argparse

    import torch

    path = tmp_path / f"{kind}.ckpt"
    content = {"state_dict": {"net.w": torch.zeros(256)}, "hyper_parameters": {"selector": {"name": "gumbel_ae"}}}
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif kind == "truncated":
        torch.save(content, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save({**content, "hparams_namespace": argparse.Namespace(depth=4)}, path)
    return str(path)


def resume(kind: str):
    return lambda c, t: ["gumbel_ae", f"run.resume={bad_ckpt(t, kind)}", f"data.root={c}", f"run.root={t}/runs"]


EVAL = "tokensel.experiments.evaluate"


# (module, argv builder, words the one error line must contain)
CASES = {
    "train: no GPU here": (TRAIN, lambda c, t: ["gumbel_ae", "trainer.accelerator=gpu", f"data.root={c}"],
                           ["trainer.accelerator=gpu", "no GPU"]),
    "train: bad precision": (TRAIN, lambda c, t: ["gumbel_ae", "trainer.precision=fp7", f"data.root={c}"],
                             ["trainer.precision='fp7'", "bf16-mixed"]),
    "train: bad VLM precision": (TRAIN, lambda c, t: ["vp_noise", "selector.vlm.precision=64", f"data.root={c}"],
                                 ["selector.vlm.precision='64'", "bf16"]),
    "train: YAML syntax error": (TRAIN, lambda c, t: ["--config", bad_yaml(t)], ["broken.yaml", "not valid YAML"]),
    "train: unknown selector": (TRAIN, lambda c, t: ["gumbl_ae"], ["unknown selector 'gumbl_ae'", "gumbel_ae"]),
    "train: garbage checkpoint": (TRAIN, resume("garbage"), ["garbage.ckpt", "not a readable checkpoint"]),
    "train: pickled checkpoint": (TRAIN, resume("pickled"), ["pickled.ckpt", "holds a pickled Python object "
                                                             "(argparse.Namespace)", "weights_only=True"]),
    "train: unknown option": (TRAIN, lambda c, t: ["--confg", "x.yaml"], ["--confg"]),
    "train: bad cache mode": (TRAIN, lambda c, t: ["gumbel_ae", "data.feature_cache=sometimes", f"data.root={c}"],
                              ["data.feature_cache='sometimes'", "auto"]),
    "train: required cache missing": (TRAIN, lambda c, t: ["gumbel_ae", "data.feature_cache=required", f"data.root={c}",
                                                           f"data.feature_cache_dir={t}/none"],
                                      ["data.feature_cache=required", "none built yet"]),
    "eval: unknown baseline": (EVAL, lambda c, t: ["--selectors", "tome", f"data.root={c}"],
                               ["SELECTORS", "tome", "divprune"]),
    "eval: missing checkpoint": (EVAL, lambda c, t: ["--ckpts", f"{t}/nowhere.ckpt", f"data.root={c}"],
                                 ["nowhere.ckpt", "no such checkpoint"]),
    "eval: truncated checkpoint": (EVAL, lambda c, t: ["--ckpts", bad_ckpt(t, "truncated"), f"data.root={c}"],
                                   ["truncated.ckpt", "not a readable checkpoint"]),
    "sweep: missing file": ("tokensel.experiments.sweep", lambda c, t: [f"{t}/nope.yaml"], ["nope.yaml", "does not exist"]),
    "collapse: bad override": ("tokensel.experiments.sweep",  # what `make collapse ARGS=selector.dpeth=2` runs
                               lambda c, t: ["experiments/sweeps/collapse.yaml", "selector.dpeth=2", "--out", f"{t}/sw"],
                               ["collapse.yaml", "unknown key 'selector.dpeth'"]),
    "bench: unknown selector": ("tokensel.experiments.bench", lambda c, t: ["--selectors", "tome"], ["tome", "divprune"]),
    "convert: wrong folder": ("tokensel.datamodules.convert", lambda c, t: ["coco", f"{t}/no_coco", f"{t}/out"],
                              ["no_coco"]),
    "convert: unknown source": ("tokensel.datamodules.convert", lambda c, t: ["imagenet", f"{t}", f"{t}/out"],
                                ["imagenet", "coco"]),
    "data generator: bad count": ("tokensel.datamodules.synthetic", lambda c, t: ["--out", f"{t}/d", "--train-coco", "x"],
                                  ["--train-coco", "'x'"]),
}


def assert_one_error_line(code: int, stderr: str, words: list[str]) -> None:
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for word in words:
        assert word in errors[0], errors[0]


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistake_is_one_line_and_exit_status_2(case, tiny_corpus, tmp_path, capsys, monkeypatch):
    module, argv, words = CASES[case]
    monkeypatch.chdir(REPO)
    code = run_main(importlib.import_module(module).main, argv(tiny_corpus, tmp_path))
    assert_one_error_line(code, capsys.readouterr().err, words)


@pytest.mark.parametrize("case", ["train: YAML syntax error", "eval: missing checkpoint", "convert: unknown source"])
def test_the_same_mistake_from_python_dash_m(case, tiny_corpus, tmp_path):
    module, argv, words = CASES[case]
    result = run_module(module, *argv(tiny_corpus, tmp_path), timeout=300)
    assert_one_error_line(result.returncode, result.stderr, words)
