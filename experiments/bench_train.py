"""Training throughput with and without the feature cache: ``make bench-train``.

    python -m tokensel.experiments.bench_train [--samples 256] [--large-samples 32] [--steps 16] [key=value ...]

In one run, on a freshly generated corpus of ``--samples`` training images, the same selector
objective trains for ``--steps`` timed optimiser steps (after 3 untimed ones) with its features
served three ways:

- (a) **online**: the frozen encoder runs on every batch (``data.feature_cache=off``);
- (b) **cached**: the feature cache is read from its shards by the usual workers (``auto``; the
  build is timed apart, it happens once);
- (c) **in memory**: the same cached ``FeatureBatch`` objects, already decoded, from a list.

at two geometries: the default run (``make train SELECTOR=gumbel_ae``'s config) and the Gumbel
paper's LLaVA-1.5 one (open_clip ViT-L/14-336, 576 tokens x 1024, its 4+4+2-layer selector,
random init, ``--large-samples`` images, 32 by default on a CPU, where a ViT-L forward takes seconds
per image, and a quarter of the timed steps).
It prints steps/s, the encoder's measured share of the online step (its forward timed inside that
step, synchronised on a GPU), and the two goals as ratios measured in this one run:

- (b)/(c) >= 0.9: the cache's I/O is hidden;
- (b)/(a) >= 0.9 / (1 - encoder share): the encoder's cost is gone.

Last, the encoder forwards that the shipped depth sweep (``experiments/sweeps/depth.yaml``) needs
on the default corpus without a cache (every run, epoch and validation encodes again) and with one
(each training and held-out image once).
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from tokensel.common.cli import ArgumentParser, quiet_known_warnings, run_main
from tokensel.datamodules.config import DataConfig
from tokensel.datamodules.datamodule import FeatureDataModule
from tokensel.datamodules.shards import ShardIndex
from tokensel.datamodules.synthetic import ensure_data, generate_corpus
from tokensel.experiments.config import EXPERIMENTS_DIR, load_config
from tokensel.experiments.sweep import expand, read_sweep
from tokensel.selectors.catalog import selector_entry

WARMUP_STEPS = 3
# The Gumbel paper's LLaVA-1.5 geometry: 576 tokens x 1024 from the 336 px CLIP tower, its 4+4+2-layer
# selector at the feature width (the laptop's narrower width and 224 px do not apply).
LARGE = ["encoder.name=open_clip:ViT-L-14-336", "encoder.pretrained=", "encoder.image_size=336", "encoder.layer=-2",
         "encoder.norm=false", "data.recon_size=64", "selector.width=null", "selector.depth=4",
         "selector.reconstructor_depth=4", "selector.image_decoder_depth=2"]


class StepClock(L.Callback):
    """Lightning callback: the wall time of every finished training batch."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def steps_per_s(self) -> float:
        timed = self.times[WARMUP_STEPS - 1:]
        return (len(timed) - 1) / (timed[-1] - timed[0])


def fit(config, dims, datamodule=None, batches: Optional[list] = None) -> tuple[float, float]:
    """Train ``config.trainer.max_steps`` steps from a datamodule or from a list of FeatureBatches;
    returns ``(steps/s after warm-up, encoder seconds per timed step)``."""
    dims = dims.as_dict()
    entry = selector_entry(config.selector.name)
    L.seed_everything(config.seed, verbose=False)
    module = entry.module_cls(selector=asdict(config.selector), dims=dims, optim=asdict(config.optim))
    clock = StepClock()
    trainer = L.Trainer(max_steps=config.trainer.max_steps, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock])
    online = datamodule.sources[config.data.train_split] if datamodule is not None else None
    timed = online is not None and online.kind == "online"
    if timed:
        online.timed = True
    if batches is not None:
        trainer.fit(module, train_dataloaders=DataLoader(_Batches(batches), batch_size=None, collate_fn=lambda b: b))
    else:
        trainer.fit(module, datamodule=datamodule)
    encoder_s = 0.0
    if timed:  # the encoder forwards inside the timed steps
        encoder_s = sum(online.encode_seconds[WARMUP_STEPS:]) / (len(clock.times) - WARMUP_STEPS)
    return clock.steps_per_s(), encoder_s


class _Batches(torch.utils.data.IterableDataset):
    """Decoded FeatureBatches, cycled forever (the step limit ends the run)."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches


def bench_geometry(label: str, overrides: list[str], samples: int, steps: int, workdir: Path, log=print) -> dict:
    corpus = workdir / f"corpus-{samples}"
    if not (corpus / "index.json").is_file():
        third = max(1, samples // 3)
        generate_corpus(corpus, seed=0, train={"coco": samples - 2 * third, "docvqa": third, "chartqa": third},
                        val={})
    base = [f"data.root={corpus}", f"data.feature_cache_dir={workdir / 'cache'}", "data.val_split=none",
            f"trainer.max_steps={steps + WARMUP_STEPS}", "trainer.max_epochs=1000", "run.panels_every_n_steps=0",
            *overrides]
    config = load_config("gumbel_ae", overrides=base + ["data.feature_cache=off"])
    online = FeatureDataModule(config.data, config.encoder, config.seed)
    dims = online.dims
    log(f"[bench-train] {label}: {config.encoder.name}, {dims.num_tokens} tokens x {dims.dim}, batch "
        f"{config.data.batch_size}, {samples} images, {steps} timed steps")
    a, encoder_s = fit(config, dims, online)
    log(f"  (a) online     {a:7.3f} steps/s   (encoder {encoder_s:.3f} s of each step)")
    cached_config = load_config("gumbel_ae", overrides=base + ["data.feature_cache=auto"])
    cached = FeatureDataModule(cached_config.data, cached_config.encoder, cached_config.seed)
    start = time.perf_counter()
    cached.prepare_features(cached_config.data.train_split)
    build_s = time.perf_counter() - start
    b, _ = fit(cached_config, dims, cached)
    log(f"  (b) cached     {b:7.3f} steps/s   (built once in {build_s:.1f} s)")
    held = [cached.features(raw, cached_config.data.train_split) for raw in cached._stream(train=True)]
    c, _ = fit(cached_config, dims, batches=held)
    log(f"  (c) in memory  {c:7.3f} steps/s")
    share = min(encoder_s * a, 0.999)
    return {"geometry": label, "encoder": config.encoder.name, "tokens": dims.num_tokens, "dim": dims.dim,
            "online": a, "cached": b, "memory": c, "encoder_share": share, "build_s": build_s,
            "io_hidden": b / c, "speedup": b / a, "speedup_goal": 0.9 / (1 - share)}


def sweep_forwards(sweep_file: Path) -> tuple[int, int, int]:
    """Encoder forwards of a shipped sweep on the default corpus: ``(runs, without cache, with it)``."""
    sweep = read_sweep(sweep_file)
    runs = len(expand(sweep))
    index = ShardIndex.load(ensure_data(DataConfig()))
    train, val = sum(index.counts("train").values()), sum(index.counts("val").values())
    epochs = int(sweep.config.get("trainer.max_epochs", 1))
    per_epoch = int(sweep.config.get("data.samples_per_epoch") or train)
    evals = 1  # each run's make eval over the held-out split
    online = runs * (epochs * (per_epoch + val) + evals * val)
    return runs, online, train + val


def table(rows: list[dict]) -> str:
    lines = ["| geometry | tokens x dim | (a) online | (b) cached | (c) in memory | encoder share | (b)/(c) (goal >= 0.9) "
             "| (b)/(a) | goal 0.9/(1-share) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['geometry']} | {r['tokens']} x {r['dim']} | {r['online']:.3f} | {r['cached']:.3f} | "
                     f"{r['memory']:.3f} | {r['encoder_share']:.0%} | {r['io_hidden']:.2f} "
                     f"{'ok' if r['io_hidden'] >= 0.9 else 'MISSED'} | {r['speedup']:.2f} | {r['speedup_goal']:.2f} "
                     f"{'ok' if r['speedup'] >= r['speedup_goal'] else 'MISSED'} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m tokensel.experiments.bench_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=256, help="training images at the default geometry")
    parser.add_argument("--large-samples", type=int, default=None,
                        help="training images at the ViT-L/14-336 geometry (default: 32 on a CPU, 256 on a GPU)")
    parser.add_argument("--steps", type=int, default=16, help="timed optimiser steps per mode")
    parser.add_argument("--skip-large", action="store_true", help="only the default geometry")
    parser.add_argument("--out", default=None, help="folder for bench_train.md (default: bench/train-<time>)")
    parser.add_argument("overrides", nargs="*", help="train-config key=value for the default geometry")
    args = parser.parse_intermixed_args(argv)
    quiet_known_warnings()
    large = args.large_samples or (256 if torch.cuda.is_available() else 32)
    out = Path(args.out or f"bench/train-{time.strftime('%Y%m%d-%H%M%S')}")
    workdir = Path(tempfile.mkdtemp(prefix="tokensel-bench-train-"))
    try:
        rows = [bench_geometry("default run", args.overrides, args.samples, args.steps, workdir)]
        if not args.skip_large:
            large_steps = max(4, math.ceil(args.steps / 4)) if not torch.cuda.is_available() else args.steps
            rows.append(bench_geometry("LLaVA-1.5 ViT-L/14-336", LARGE + ["data.batch_size=8"], large, large_steps,
                                       workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    runs, without, with_cache = sweep_forwards(EXPERIMENTS_DIR / "sweeps" / "depth.yaml")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    text = "\n".join([
        f"# make bench-train ({device}); steps/s after {WARMUP_STEPS} warm-up steps", "", table(rows), "",
        f"depth sweep (experiments/sweeps/depth.yaml, {runs} runs, default corpus): {without:,} encoder forwards "
        f"without the cache, {with_cache:,} with it ({without / with_cache:.0f}x fewer)",
    ])
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.md").write_text(text + "\n")
    print("\n" + text + f"\n\nwritten: {out / 'bench_train.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
