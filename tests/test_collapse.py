"""The collapse detector (callbacks/collapse.py) and the collapse study's summary."""

import math
import subprocess

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from conftest import FAST_ARGS, REPO
from tokensel.callbacks.collapse import CollapseDetector, CollapseWatch, find_collapse
from tokensel.experiments.collapse import objective_rows, summary_rows

COLLAPSING = [0.6, 0.5, 0.3, 0.2, 0.1, 0.04, 0.02, 0.01, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # below 0.05 from step 5
HOLDING = [0.6, 0.5, 0.3, 0.04, 0.03, 0.2, 0.55, 0.6, 0.62, 0.58, 0.61, 0.6, 0.59, 0.6]  # a short dip only


def test_watch_dates_collapse_at_the_start_of_the_streak():
    assert find_collapse(enumerate(COLLAPSING), threshold=0.05, patience=4) == 5
    assert find_collapse(enumerate(HOLDING), threshold=0.05, patience=4) is None
    assert find_collapse(enumerate(HOLDING), threshold=0.05, patience=2) == 3  # the dip counts if patience allows
    assert find_collapse([(0, 0.0), (1, math.nan), (2, 0.0)], 0.05, 2) is None  # nan breaks a streak
    watch = CollapseWatch(0.05, 2)
    fired = [watch.update(s, v) for s, v in enumerate([0.0, 0.0, 0.0, 0.0])]
    assert fired == [False, True, False, False] and watch.collapse_step == 0
    with pytest.raises(ValueError, match="patience"):
        CollapseWatch(0.05, 0)


class ScriptedKeepRatio(L.LightningModule):
    """Logs a given keep-ratio curve as train/keep_ratio, one value per step (a real Trainer)."""

    def __init__(self, curve):
        super().__init__()
        self.curve = curve
        self.weight = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        self.log("train/keep_ratio", self.curve[self.global_step], on_step=True, on_epoch=False)
        return (self.weight * batch[0]).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(len(self.curve), 1)), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit_curve(curve, tmp_path):
    detector = CollapseDetector(threshold=0.05, patience=4)
    logger = TensorBoardLogger(str(tmp_path), name="run", version="v")
    trainer = L.Trainer(max_epochs=1, logger=logger, callbacks=[detector], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1,
                        accelerator="cpu", devices=1)
    trainer.fit(ScriptedKeepRatio(curve))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "v"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return detector, acc


def test_detector_fires_once_in_a_real_trainer_and_logs_step_and_text(tmp_path):
    detector, acc = fit_curve(COLLAPSING, tmp_path)
    assert detector.collapse_step == 5
    assert [(e.step, e.value) for e in acc.Scalars("collapse/step")] == [(8, 5.0)]  # flagged at step 5 + 4 - 1
    texts = [e for e in acc.Tensors("collapse/text_summary")]
    assert len(texts) == 1 and b"from step 5" in texts[0].tensor_proto.string_val[0]


def test_detector_is_silent_on_a_curve_that_holds(tmp_path):
    detector, acc = fit_curve(HOLDING, tmp_path)
    assert detector.collapse_step is None
    assert "collapse/step" not in acc.Tags()["scalars"] and "collapse/text_summary" not in acc.Tags()["tensors"]


def test_detector_state_survives_a_checkpoint():
    detector = CollapseDetector(0.05, 3)
    for step, value in enumerate([0.5, 0.0, 0.0]):
        detector.watch.update(step, value)
    restored = CollapseDetector(0.05, 3)
    restored.load_state_dict(detector.state_dict())
    assert restored.watch.update(3, 0.0) and restored.collapse_step == 1


def test_collapse_summary_per_run_and_per_objective():
    def record(run_id, estimator, regulariser, seed, step, val_keep):
        return {"run_id": run_id, "axes": {"selector.estimator": estimator, "selector.regulariser": regulariser},
                "seed": seed, "collapse_step": step, "global_step": 100, "train_s": 10.0 + seed,
                "metrics": {"val/keep_ratio": val_keep, "val/feat_recon": 0.5, "val/img_recon": 0.1}}

    records = [record("a", "gumbel", "plain", 0, 40, 0.0), record("b", "gumbel", "plain", 1, None, 0.2),
               record("c", "gumbel", "maxmin", 0, None, 0.6)]
    curves = {"a": {"train/keep_ratio": [(s, 0.0) for s in range(20)]},
              "b": {"train/keep_ratio": [(s, 0.1 * (s % 2)) for s in range(20)]},  # last 10 average 0.05
              "c": {"train/keep_ratio": [(s, 0.6) for s in range(20)]}}
    rows = summary_rows(records, curves)
    assert [r["objective"] for r in rows] == ["gumbel+plain", "gumbel+plain", "gumbel+maxmin"]
    assert [r["collapse_step"] for r in rows] == [40, "none", "none"]
    assert rows[1]["train_keep_ratio"] == pytest.approx(0.05)
    per = {r["objective"]: r for r in objective_rows(rows)}
    assert per["gumbel+plain"]["collapsed"] == "1/2 seeds (mean step 40)"
    assert per["gumbel+maxmin"]["collapsed"] == "0/1 seeds"
    mean, std, n = per["gumbel+plain"]["val_keep_ratio"]
    assert (mean, n) == (pytest.approx(0.1), 2) and std == pytest.approx(math.sqrt(0.02))


@pytest.mark.slow
def test_make_collapse_runs_four_objectives_into_one_root(tiny_corpus, tmp_path):
    # threshold above 1: every keep ratio counts as collapsed, so the detector's event must reach
    # the table for all four objectives; the real default is the study of docs/results/collapse.md.
    args = [a for a in FAST_ARGS if not a.startswith("run.panels")] + [
        f"data.root={tiny_corpus}", "trainer.max_steps=4", "run.collapse_threshold=1.01", "run.collapse_patience=2",
        "run.panels_every_n_steps=0"]
    result = subprocess.run(["make", "--no-print-directory", "collapse", f"ARGS=--out {tmp_path} {' '.join(args)}"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = tmp_path / "collapse"
    names = sorted(p.name for p in (folder / "runs").iterdir())
    assert names == [f"estimator={e}_regulariser={r}_seed=0" for e in ("gumbel", "straight_through")
                     for r in ("maxmin", "plain")]
    table = (folder / "collapse.md").read_text()
    for objective in ("gumbel+maxmin", "gumbel+plain", "straight_through+maxmin", "straight_through+plain"):
        assert objective in table
    assert table.count("| 0 |") >= 4  # collapse step 0 in each run row
    assert "1/1 seeds (mean step 0)" in table
    assert (folder / "collapse.png").stat().st_size > 1000
    assert str(folder / "collapse.md") in result.stdout
