"""`make eval` end to end on generated data with a short-trained selector, and its bad inputs."""

import csv
import shutil
import subprocess

import pytest
import torch

from conftest import FAST_ARGS, REPO, run_module

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    args = FAST_ARGS + [f"data.root={tiny_corpus}", f"run.root={runs}", "trainer.max_steps=4"]
    result = run_module("tokensel.experiments.train", "gumbel_ae", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    return runs


def make_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "eval", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


def test_make_eval_compares_baselines_and_the_trained_selector(trained, tiny_corpus, tmp_path):
    out = tmp_path / "eval"
    result = make_eval("BUDGETS=0.25,0.5,4", f"ARGS=--out {out} data.root={tiny_corpus} run.root={trained}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"eval folder: {out}" in result.stdout
    rows = list(csv.DictReader((out / "results.csv").open()))
    selectors = {r["selector"] for r in rows}
    assert selectors == {"random", "uniform", "l2norm", "divprune", "cls_attention", "dart", "pool", "visionzip",
                         "cdpruner", "gumbel_ae"}
    assert len(rows) == 10 * 3
    assert "cdpruner: n/a (query-aware, and encoder timm:vit_tiny_patch16_224 has no text tower" in result.stdout
    for row in rows:
        assert row["samples"] == "18"
        if row["selector"] == "cdpruner":  # no question embedding on a timm encoder: n/a, not a stand-in
            assert row["coverage_n"] == row["recall_n"] == "0"
            continue
        assert float(row["coverage_mean"]) <= 1.0
        assert 0.0 <= float(row["recall_mean"]) <= 1.0  # the generated docs and charts have answer boxes
    gumbel = [r for r in rows if r["selector"] == "gumbel_ae"]
    assert all(r["psnr_n"] == "18" for r in gumbel)
    assert all(r["psnr_n"] == "0" for r in rows if r["selector"] != "gumbel_ae")
    assert all(r["ntp_increase_n"] == "0" for r in rows)  # CoCa cannot read a ViT-tiny's tokens
    markdown = (out / "results.md").read_text()
    assert "n/a" in markdown and "±" in markdown
    assert list(out.glob("*.png")) and list(out.glob("events.out.tfevents.*"))
    assert "gumbel_ae was trained for a keep ratio of 0.222" in result.stdout  # asked for other budgets


def test_make_eval_says_why_a_selector_wins_or_loses(trained, tiny_corpus, tmp_path):
    out = tmp_path / "why"
    result = make_eval(f"ARGS=--out {out} --max-samples 12 --headroom-draws 3 data.root={tiny_corpus} "
                       f"run.root={trained}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    # the budget-matched checkpoint at the keep ratio it was trained for; the baselines at every default one
    gumbel = [r for r in rows if r["selector"] == "gumbel_ae"]
    assert [(r["budget"], r["trained_at"]) for r in gumbel] == [("0.222", "0.222")]
    assert len([r for r in rows if r["selector"] == "divprune"]) == 5
    for row in rows:
        # no order: an even grid, a merging rule, DART (its set at k is no prefix); cdpruner is n/a here
        ranks = row["selector"] not in ("uniform", "pool", "visionzip", "dart", "cdpruner")
        assert (row["auroc_n"] != "0") == ranks, row["selector"]
        assert (row["norm_spearman_n"] != "0") == ranks
        # the objective scores every selector's kept subset (merged tokens are no subset; cdpruner n/a)
        subset = row["selector"] not in ("pool", "visionzip", "cdpruner")
        assert row["gumbel_ae_loss_vs_random_n"] == ("12" if subset else "0"), row["selector"]
        if ranks:
            assert 0.0 <= float(row["auroc_mean"]) <= 1.0
    room = list(csv.DictReader((out / "headroom.csv").open()))
    assert {r["loss"] for r in room} == {"gumbel_ae_loss"} and len(room) == 5
    assert all(r["verdict"] in ("separable", "within noise") and float(r["best_gain_mean"]) >= 0 for r in room)
    assert "headroom" in result.stdout and "noise floor" in result.stdout
    samples = list(csv.DictReader((out / "samples.csv").open()))
    paired = [float(s["value"]) for s in samples if s["selector"] == "gumbel_ae"
              and s["metric"] == "gumbel_ae_loss_vs_random"]
    assert len(paired) == 12 and sum(paired) / 12 == pytest.approx(float(gumbel[0]["gumbel_ae_loss_vs_random_mean"]))


@pytest.mark.parametrize("args, words", [
    (["BUDGETS=0"], ["BUDGETS", "'0'"]),
    (["BUDGETS=2.5"], ["ratio above 1"]),
    (["SELECTORS=magic"], ["unknown magic"]),
])
def test_bad_eval_arguments_are_one_line(args, words, tiny_corpus, trained):
    result = make_eval(*args, f"ARGS=data.root={tiny_corpus} run.root={trained}")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    for word in words:
        assert word in errors[0]


def test_make_eval_runs_cdpruner_on_an_open_clip_encoders_text_tower(tiny_corpus, tmp_path):
    out = tmp_path / "eval"
    result = run_module("tokensel.experiments.evaluate", "--selectors", "random,cdpruner,pool,visionzip",
                        "--budgets", "0.25", "--out", str(out), f"data.root={tiny_corpus}", f"run.root={tmp_path}",
                        "encoder.name=open_clip:coca_tiny", "encoder.pretrained=", "data.num_workers=0",
                        f"data.feature_cache_dir={tmp_path / 'cache'}", "baselines.cdpruner.theta=0.5")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["selector"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert rows["cdpruner"]["coverage_n"] == "18" and rows["cdpruner"]["recall_n"] == "10"
    assert int(rows["pool"]["k"]) == 49 and int(rows["visionzip"]["k"]) == 49  # 14 x 14 tokens: 7 x 7 cells
    bad = run_module("tokensel.experiments.evaluate", f"data.root={tiny_corpus}", "baselines.visionzip.merge=sum")
    assert bad.returncode == 2 and "baselines.visionzip.merge='sum'" in bad.stderr and "Traceback" not in bad.stderr


def test_a_foreign_checkpoint_is_named(tmp_path, tiny_corpus):
    bogus = tmp_path / "model.ckpt"
    bogus.write_bytes(b"not a checkpoint")
    result = run_module("tokensel.experiments.evaluate", "--ckpts", str(bogus), f"data.root={tiny_corpus}",
                        "encoder.name=timm:vit_tiny_patch16_224", "encoder.pretrained=")
    assert result.returncode == 2
    assert str(bogus) in result.stderr and "Traceback" not in result.stderr


def test_a_budget_larger_than_n_is_refused(trained, tiny_corpus):
    result = run_module("tokensel.experiments.evaluate", "--budgets", "100000", f"data.root={tiny_corpus}",
                        f"run.root={trained}")
    assert result.returncode == 2 and "N=" in result.stderr


def test_bench_runs_and_prints_its_tables(tmp_path, tiny_llava):
    result = run_module("tokensel.experiments.bench", "--batches", "1", "--repeats", "2", "--warmup", "1",
                        "--selectors", "random,divprune,vp_noise", "--encoder-max-images", "1", "--out", str(tmp_path),
                        "--prefill-model", str(tiny_llava), "--prefill-budgets", "4,0.5", "--prefill-batch", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "bench.md").read_text()
    for geometry in ("llava15 (1x576x1024)", "llava_next (5x576x1024)"):
        for name in ("random", "divprune", "vp_noise"):
            assert f"| {geometry} | 1 | {name} |" in table
    assert "0.69 ms" in table
    prefill = [line.split("|") for line in table.splitlines() if line.startswith(("| all |", "| 4 |", "| 0.5 |"))]
    assert [int(row[2]) for row in prefill] == [16, 4, 8]  # image tokens of the tiny LLaVA's 16
    prompts = [int(row[3]) for row in prefill]
    assert prompts[0] - prompts[1] == 12 and prompts[0] - prompts[2] == 8  # the same text, fewer image tokens
    assert float(prefill[0][6].strip(" x")) == 1.0 and float(prefill[1][7].strip(" x")) > 1.0  # ideal > 1


def test_a_checkpoint_on_the_command_line_is_evaluated_beside_the_named_selectors(trained, tiny_corpus, tmp_path):
    ckpt = next(trained.glob("gumbel_ae/*/checkpoints/last.ckpt"))
    out = tmp_path / "named"
    result = run_module("tokensel.experiments.evaluate", "--ckpts", str(ckpt), "--selectors", "random",
                        "--budgets", "0.25", "--max-samples", "8", "--headroom-draws", "2", "--out", str(out),
                        f"data.root={tiny_corpus}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["selector"] for r in csv.DictReader((out / "results.csv").open())] == ["random", "gumbel_ae"]


def test_checkpoints_trained_on_other_data_are_each_scored_on_their_own(trained, tiny_corpus, tmp_path):
    first = next(trained.glob("gumbel_ae/*/checkpoints/last.ckpt"))
    other = tmp_path / "other_corpus"
    shutil.copytree(tiny_corpus, other)
    ckpt = torch.load(first, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["config"]["data"]["root"] = str(other)  # the same run, as if trained on the copy
    second = tmp_path / "other" / "last.ckpt"
    second.parent.mkdir()
    torch.save(ckpt, second)
    out = tmp_path / "by_data"
    result = run_module("tokensel.experiments.evaluate", "--ckpts", f"{first},{second}", "--selectors", "random",
                        "--budgets", "0.25", "--max-samples", "8", "--headroom-draws", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [(r["selector"].partition("[")[0], r["data"]) for r in csv.DictReader((out / "results.csv").open())]
    assert sorted(rows) == sorted((s, str(d)) for s in ("random", "gumbel_ae") for d in (tiny_corpus, other))
    samples = {s["data"] for s in csv.DictReader((out / "samples.csv").open())}
    assert samples == {str(tiny_corpus), str(other)}
    assert len([p for p in out.iterdir() if p.is_dir() and list(p.glob("*.png"))]) == 2  # plots per held-out set


def test_a_checkpoint_for_other_features_names_the_mismatch(trained, tiny_corpus):
    ckpt = next(trained.glob("gumbel_ae/*/checkpoints/last.ckpt"))
    result = run_module("tokensel.experiments.evaluate", "--ckpts", str(ckpt), "--selectors", "gumbel_ae",
                        f"data.root={tiny_corpus}", "encoder.image_size=32")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "was trained on features" in errors[0] and "num_tokens" in errors[0]


@pytest.mark.slow
def test_bench_train_prints_the_three_modes_and_the_sweep_forwards(tmp_path):
    result = run_module("tokensel.experiments.bench_train", "--samples", "24", "--steps", "2", "--skip-large",
                        "--out", str(tmp_path), "encoder.name=timm:vit_tiny_patch16_224", "encoder.pretrained=",
                        "encoder.image_size=64", "data.batch_size=8")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    table = (tmp_path / "bench_train.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| default run |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "16 x 192" and all(float(c) > 0 for c in cells[2:5])  # three measured steps/s
    assert "encoder forwards without the cache" in table


@pytest.mark.parametrize("selection", ["per_view", "across"])
def test_make_eval_on_anyres_views(selection, tiny_corpus, tmp_path):
    views = ["data.views=anyres", "data.view_pinpoints=[[64,128],[128,64],[128,128]]",
             f"data.view_selection={selection}", "encoder.name=timm:vit_tiny_patch16_224", "encoder.pretrained=",
             "encoder.image_size=64", "data.recon_size=32",
             f"data.feature_cache_dir={tmp_path / 'cache'}", "data.num_workers=0"]
    out = tmp_path / "eval"
    result = run_module("tokensel.experiments.evaluate", "--selectors", "random,uniform,divprune",
                        "--budgets", "0.25,0.5", "--out", str(out), f"data.root={tiny_corpus}",
                        f"run.root={tmp_path}/runs", *views)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["selector"] for r in rows} == {"random", "uniform", "divprune"} and len(rows) == 6
    for row in rows:
        assert int(row["samples"]) > 18  # one row per view: every image has 3 to 5
        assert 0.0 < float(row["coverage_mean"]) <= 1.0 and 0.0 <= float(row["recall_mean"]) <= 1.0
    if selection == "across":
        assert "selected across each image's views" in result.stdout
        counts = run_module("tokensel.experiments.evaluate", "--selectors", "random", "--budgets", "16",
                            f"data.root={tiny_corpus}", *views)
        assert counts.returncode == 2 and "budgets must be keep ratios" in counts.stderr


def test_two_checkpoints_of_one_objective_get_a_row_each(trained, tiny_corpus, tmp_path):
    first = next(trained.glob("gumbel_ae/*/checkpoints/last.ckpt"))
    second = tmp_path / "again" / "gumbel_ae" / "version_0" / "checkpoints" / "last.ckpt"
    second.parent.mkdir(parents=True)
    shutil.copy(first, second)
    out = tmp_path / "two"
    result = make_eval("SELECTORS=random,gumbel_ae", f"CKPTS={first},{second}", "BUDGETS=0.25",
                       f"ARGS=--out {out} --max-samples 8 --headroom-draws 2 data.root={tiny_corpus}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = [r["selector"] for r in csv.DictReader((out / "results.csv").open())]
    assert sorted(n for n in names if n.startswith("gumbel_ae")) == [f"gumbel_ae[{first}]", f"gumbel_ae[{second}]"]
    again = make_eval("SELECTORS=gumbel_ae", f"CKPTS={first},{first}", f"ARGS=--out {out} data.root={tiny_corpus}")
    assert again.returncode == 2 and "given more than once" in again.stderr
