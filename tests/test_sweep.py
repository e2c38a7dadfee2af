"""Sweeps: the grid, bad sweep files, seed aggregation, and a real 2 x 1 sweep with resume."""

import csv
import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import FAST_ARGS, REPO
from tokensel.common.cli import run_main
from tokensel.common.stats import aggregate, mean_std, t_quantile
from tokensel.experiments.sweep_report import ci_error_bars
from tokensel.experiments.sweep import (SweepError, check_grid, expand, first_difference, main, prepare_folder,
                                        read_sweep)


def write_sweep(tmp_path: Path, **spec) -> Path:
    path = tmp_path / f"{spec.get('name', 'grid')}.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "sweeps"), **spec}, sort_keys=False))
    return path


# ---------------------------------------------------------------- the grid

def test_grid_is_the_product_of_axes_times_seeds_first_axis_slowest(tmp_path):
    path = write_sweep(tmp_path, axes={"selector.depth": [1, 2], "optim.lr": [0.001, 0.0001]}, seeds=[0, 1])
    runs = expand(read_sweep(path))
    assert [r.run_id for r in runs] == [
        f"depth={d}_lr={lr}_seed={s}" for d in (1, 2) for lr in ("0.001", "0.0001") for s in (0, 1)]
    assert runs[5].axis_values == {"selector.depth": 2, "optim.lr": 0.001} and runs[5].seed == 1
    assert runs[5].overrides == ["selector.depth=2", "optim.lr=0.001"]


def test_nested_axes_and_cli_seeds_and_overrides(tmp_path):
    path = write_sweep(tmp_path, axes={"selector": {"regulariser": ["maxmin", "plain"]}}, seeds=[0])
    sweep = read_sweep(path, seeds=[3, 4], overrides=["trainer.max_steps=5"])
    runs = expand(sweep)
    assert [r.run_id for r in runs] == ["regulariser=maxmin_seed=3", "regulariser=maxmin_seed=4",
                                        "regulariser=plain_seed=3", "regulariser=plain_seed=4"]
    assert runs[0].overrides == ['selector.regulariser="maxmin"']
    assert sweep.config["trainer.max_steps"] == 5
    base = check_grid(sweep, runs)  # every run's config builds; the shared base drops per-run keys
    assert base["trainer"]["max_steps"] == 5 and "regulariser" not in base["selector"]
    assert "root" not in base["run"] and "seed" not in base


def test_shipped_sweeps_expand_and_check(tmp_path):
    for name, n in (("depth", 8), ("epochs", 4), ("collapse", 4)):
        sweep = read_sweep(REPO / "experiments" / "sweeps" / f"{name}.yaml", out=str(tmp_path))
        runs = expand(sweep)
        assert len(runs) == n
        check_grid(sweep, runs)
    depth = read_sweep(REPO / "experiments" / "sweeps" / "depth.yaml")
    assert depth.axes == {"selector.depth": [1, 2, 3, 4, 5, 6, 7, 8]}
    for name in ("depth", "epochs"):
        paper = read_sweep(REPO / "experiments" / "sweeps" / "paper" / f"{name}.yaml", out=str(tmp_path))
        with pytest.raises(SweepError, match="data.root is required"):  # the paper presets need real shards
            check_grid(paper, expand(paper))
        paper = read_sweep(paper.file, out=str(tmp_path), overrides=["data.root=/data/shards"])
        check_grid(paper, expand(paper))


# ---------------------------------------------------------------- bad input: one line, before any run

@pytest.mark.parametrize("spec, message", [
    ({"axes": {"selector.depth": [1]}, "axis": [1]}, "unknown key 'axis'"),
    ({"axes": {"selector.depth": []}}, "axes.selector.depth is empty"),
    ({"axes": {"selector.depth": ["deep"]}}, "axes.selector.depth='deep'"),
    ({"axes": {"selector.dept": [1, 2]}}, "unknown key 'selector.dept'"),
    ({"axes": {"selector.depth": 3}}, "axes.selector.depth must be a list"),
    ({"axes": {}}, "axes must map at least one"),
    ({"axes": {"seed": [0, 1]}}, "seed is set by the sweep"),
    ({"axes": {"selector.depth": [1]}, "seeds": ["a"]}, "seeds must be a non-empty list of integers"),
    ({"axes": {"selector.depth": [1]}, "budgets": [2.5]}, "budgets: 2.5"),
    ({"axes": {"selector.depth": [1]}, "selector": "nope"}, "selector='nope' is not registered"),
    ({"axes": {"selector.p": [0.05]}}, "selector.p=0.05"),  # q < p fails for this value
])
def test_bad_sweep_file_is_one_line_error_before_any_run(tmp_path, capsys, spec, message):
    path = write_sweep(tmp_path, **spec)
    assert run_main(main, [str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "sweeps").exists()


def test_bad_seeds_and_missing_file(tmp_path, capsys):
    path = write_sweep(tmp_path, axes={"selector.depth": [1]})
    assert run_main(main, [str(path), "--seeds", "0,x"]) == 2
    assert "SEEDS: '0,x' is not a comma list" in capsys.readouterr().err
    assert run_main(main, [str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_refuses_a_folder_with_another_base_config(tmp_path):
    path = write_sweep(tmp_path, axes={"selector.depth": [1, 2]}, config={"trainer.max_epochs": 2})
    sweep = read_sweep(path)
    prepare_folder(sweep, check_grid(sweep, expand(sweep)))
    other = read_sweep(path, overrides=["trainer.max_epochs=3"])
    with pytest.raises(SweepError, match=r"another base config \(trainer.max_epochs: 2 -> 3\)"):
        prepare_folder(other, check_grid(other, expand(other)))
    more_seeds = read_sweep(path, seeds=[0, 1])  # more seeds or axis values: the same base
    prepare_folder(more_seeds, check_grid(more_seeds, expand(more_seeds)))
    assert first_difference({"a": {"b": 1}}, {"a": {"b": 1}}) is None


# ---------------------------------------------------------------- aggregation over seeds

def test_mean_std_is_the_sample_std_and_ignores_missing_values():
    mean, std, n = mean_std([0.2, 0.4, 0.9, float("nan")])
    assert n == 3 and mean == pytest.approx(0.5)
    assert std == pytest.approx(math.sqrt(((0.2 - 0.5) ** 2 + (0.4 - 0.5) ** 2 + (0.9 - 0.5) ** 2) / 2))
    assert mean_std([0.7])[0] == 0.7 and math.isnan(mean_std([0.7])[1])
    assert mean_std([])[2] == 0


def test_aggregate_groups_by_axis_and_budget_over_seeds():
    rows = [{"selector.depth": d, "budget": b, "seed": s, "recall": r, "train_s": t}
            for d, b, s, r, t in [(1, "0.2", 0, 0.5, 10), (1, "0.2", 1, 0.7, 12), (1, "0.4", 0, 0.8, 10),
                                  (1, "0.4", 1, 0.9, 12), (2, "0.2", 0, 0.6, 20), (2, "0.2", 1, float("nan"), 22)]]
    agg = aggregate(rows, ["selector.depth", "budget"])
    assert [(a["selector.depth"], a["budget"]) for a in agg] == [(1, "0.2"), (1, "0.4"), (2, "0.2")]
    mean, std, n = agg[0]["recall"]
    assert (mean, n) == (pytest.approx(0.6), 2) and std == pytest.approx(math.sqrt(0.02))
    assert agg[1]["recall"][0] == pytest.approx(0.85) and agg[1]["train_s"][:2] == (11, pytest.approx(math.sqrt(2)))
    assert agg[2]["recall"][0] == 0.6 and agg[2]["recall"][2] == 1  # the nan seed is not a zero
    assert "seed" not in agg[0]


# ---------------------------------------------------------------- a real sweep, through make

def make_sweep(sweep_file: Path, args: list[str], seeds: str = "") -> subprocess.CompletedProcess:
    cmd = ["make", "--no-print-directory", "sweep", f"SWEEP={sweep_file}", f"ARGS={' '.join(args)}"]
    if seeds:
        cmd.append(f"SEEDS={seeds}")
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


TINY_RUN = [a for a in FAST_ARGS if not a.startswith("selector.depth")] + [
    "trainer.max_steps=3", "trainer.max_epochs=1", "run.panels_every_n_steps=0"]


@pytest.mark.slow
def test_two_by_one_sweep_runs_reports_and_resumes(tiny_corpus, tmp_path):
    path = write_sweep(tmp_path, name="tiny", axes={"selector.depth": [1, 2]}, seeds=[0], budgets=[0.25, 0.5],
                       eval_max_samples=8)
    args = TINY_RUN + [f"data.root={tiny_corpus}"]
    first = make_sweep(path, args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    folder = tmp_path / "sweeps" / "tiny"
    assert "2 runs (2 selector.depth x 1 seeds); 0 done, 2 to run" in first.stdout
    for run_id in ("depth=1_seed=0", "depth=2_seed=0"):
        status = json.loads((folder / "runs" / run_id / "status.json").read_text())
        assert status["status"] == "done" and status["global_step"] == 3
        assert set(status["eval"]) == set(status["eval_random"]) == {"0.25", "0.5"}  # random: the plots' line
        assert yaml.safe_load((folder / "runs" / run_id / "train" / "config.yaml").read_text())["selector"]["depth"] \
            == int(run_id[6])
        assert list((folder / "hparams" / run_id).glob("events.out.tfevents.*"))
    with open(folder / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [(r["selector.depth"], r["budget"]) for r in table] == [("1", "0.25"), ("1", "0.5"), ("2", "0.25"),
                                                                  ("2", "0.5")]
    assert all(0 <= float(r["recall_mean"]) <= 1 and r["recall_n"] == "1" for r in table)
    assert float(table[0]["train_s_mean"]) > 0
    assert (folder / "selector.depth.png").stat().st_size > 1000
    for path_line in ("results.md", "results.csv", "selector.depth.png"):
        assert str(folder / path_line) in first.stdout

    logs = {p: p.read_text() for p in folder.glob("runs/*/train.log")}
    again = make_sweep(path, args)
    assert again.returncode == 0 and "2 done, 0 to run" in again.stdout, again.stdout[-2000:]
    assert {p: p.read_text() for p in folder.glob("runs/*/train.log")} == logs  # nothing re-trained

    # An interrupted sweep: one run has no finished status. Only that one runs again, resuming.
    (folder / "runs" / "depth=2_seed=0" / "status.json").unlink()
    (folder / "runs" / "depth=2_seed=0" / "train" / "metrics.json").unlink()
    resumed = make_sweep(path, args)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "2 runs (2 selector.depth x 1 seeds); 1 done, 1 to run" in resumed.stdout
    assert (folder / "runs" / "depth=1_seed=0" / "train.log").read_text() == logs[folder / "runs" / "depth=1_seed=0" / "train.log"]
    assert "run.resume=last" in (folder / "runs" / "depth=2_seed=0" / "train.log").read_text()
    # a second seed joins the same grid: its runs are to run, the finished ones are kept
    assert "4 runs (2 selector.depth x 2 seeds); 2 done, 2 to run" in make_sweep(path, args + ["--dry-run"], seeds="0,1").stdout

    changed = make_sweep(path, args + ["selector.reconstructor_depth=2"])
    assert changed.returncode == 2
    assert "another base config (selector.reconstructor_depth: 1 -> 2)" in changed.stderr


@pytest.mark.slow
def test_failed_run_is_recorded_and_the_sweep_goes_on(tiny_corpus, tmp_path):
    path = write_sweep(tmp_path, name="broken", axes={"data.root": [str(tmp_path / "no_such_shards"), str(tiny_corpus)]},
                       budgets=[0.5], eval_max_samples=8)
    result = make_sweep(path, TINY_RUN)
    assert result.returncode != 0  # make reports the sweep's exit status 1
    folder = tmp_path / "sweeps" / "broken"
    statuses = [json.loads(p.read_text()) for p in sorted(folder.glob("runs/*/status.json"))]
    assert sorted(s["status"] for s in statuses) == ["done", "failed"]
    failed = next(s for s in statuses if s["status"] == "failed")
    assert failed["stage"] == "train" and "no_such_shards" in failed["error"]
    assert "## Failed runs" in (folder / "results.md").read_text()
    assert "1/2 runs done, 1 failed" in result.stdout


def test_sweep_plots_draw_95_percent_cis_clipped_to_the_metrics_range():
    half = t_quantile(0.975, 2) * 0.1 / math.sqrt(3)  # three seeds, std 0.1
    assert ci_error_bars("ntp_increase", 0.5, 0.1, 3) == pytest.approx((half, half))
    below, above = ci_error_bars("recall", 0.95, 0.1, 3)  # recall cannot pass 1
    assert below == pytest.approx(half) and above == pytest.approx(0.05)
    assert ci_error_bars("recall", 0.02, 0.1, 3)[0] == pytest.approx(0.02)  # nor fall under 0
    assert ci_error_bars("recall", 0.5, 0.1, 1) == (0.0, 0.0)  # one seed: no interval
