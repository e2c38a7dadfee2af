"""The corpus teacher: a small CoCa head that reads the run's frozen encoder, trained once on the corpus.

    python -m tokensel.experiments.teacher [SELECTOR] [--config FILE.yaml] [key=value ...]   (make teacher)

With ``selector.vlm`` set to another frozen VLM (``selector.vlm.backend=hf selector.vlm.model=<folder>``
and its encoder), the command trains nothing and prints that VLM's held-out check and headroom,
measured as below, so teachers compare in one table.

vp_noise (AutoSelect, arXiv 2603.07135) learns which tokens matter from a frozen VLM's next-token
loss, so it needs a VLM whose loss depends on the image. On a laptop the real small LLaVA of
``make vlm`` costs seconds per sample, and a random CoCa reads nothing. The corpus teacher sits
between: a CoCa-style captioner (Yu et al., "CoCa: Contrastive Captioners are Image-Text
Foundation Models", arXiv:2205.01917, Sec. 3: attentional pooler + causal text decoder with
cross-attention; ``common/model_configs/coca_head.json``, 64 queries, 3 + 3 layers of width 256,
CLIP's BPE), whose pooler reads the run's frozen encoder tokens (DINOv2 ViT-S/14 by default).
It is trained on the corpus's own captions and answers, not pretrained on the web: it knows the
corpus, which is what a teacher for a selector trained on that corpus needs. The ``coca`` VLM
backend loads it like any CoCa (``selectors/vlm_coca.py``, "a CoCa head").

Training (``teacher.*`` keys of the run config, ``experiments/config.py`` ``TeacherConfig``): every parameter of the head
(pooler, ``ln_post``, text tower, decoder) learns the caption (coco) or answer (docvqa, chartqa, vqav2;
the question is the prompt) NTP loss of the ``coca`` backend over the train split's features, read
through the run's datamodule and so from the feature cache; AdamW, linear warm-up then cosine
decay. None of this is given by a paper; the defaults are sized for a 2-core CPU.

Held-out check (printed by the command that builds it, and kept in ``teacher.json``): the mean
target-token NLL of every val sample with the head at init, trained with the sample's own
tokens, and trained with another sample's tokens (a derangement, ``experiments/vlm_align.py``),
with 95 % CIs; real - shuffled with a paired CI. Then its headroom, the question vp_noise's
training depends on: with only :data:`HEADROOM_KEEP` of the tokens (vp_noise's default keep
ratio) in :data:`HEADROOM_DRAWS` random keep sets per sample, the spread of the loss, best-of-R
minus the mean and the noise floor (``selectors/diagnostics.py``, as ``make eval``'s headroom table),
what one random keep set costs against all tokens (overall and per source: the coco scenes have no
answer box, so this is where a loss that reads them shows it), and how much keeping the answer box's
tokens first (the rest at random) lowers the loss against a random set, on the samples with a box
(overall and per source): whether the loss depends on local evidence at all.

Where: ``$TOKENSEL_CACHE/teachers/<model>-<encoder>-<fingerprint16>/`` (``open_clip_model.safetensors``,
whose metadata names the encoder it reads, and ``teacher.json``). The fingerprint is both splits'
feature fingerprints (encoder name, weights, layer, norm, image size, shards, ...), the stream's
settings, ``teacher.*`` and :data:`TEACHER_VERSION`; a match is reused, anything else builds anew.
``selector.vlm.pretrained=corpus`` (the vp_noise default) and ``make eval``'s NTP metric resolve
to this file through :func:`ensure_teacher`.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import open_clip
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tokensel.common.cache import atomic_write, cache_root
from tokensel.common.cli import quiet_known_warnings, run_main
from tokensel.common.errors import ConfigError
from tokensel.common.stats import mean_ci
from tokensel.datamodules.config import data_root
from tokensel.datamodules.datamodule import FeatureDataModule
from tokensel.datamodules.feature_cache import fingerprint, weights_identity
from tokensel.datamodules.shards import ShardIndex
from tokensel.datamodules.synthetic import ensure_data
from tokensel.experiments.config import config_yaml, load_config, parse_run_args
from tokensel.experiments.vlm_align import derangement, format_losses, held_out_losses, per_sample_loss, summary
from tokensel.selectors.budget import resolve_budget
from tokensel.selectors.diagnostics import headroom, headroom_verdict, random_keep_masks
from tokensel.selectors.inference import gather_tokens
from tokensel.selectors.metrics import keep_mask, kept_indices
from tokensel.selectors.vlm_backends import build_vlm
from tokensel.selectors.vlm_coca import HEAD_METADATA, CoCaVLM, create_head, init_decoder_projection, names_corpus_teacher

TEACHER_VERSION = 2  # bump when the build changes what it makes: every cached teacher is then rebuilt
WEIGHTS_FILE = "open_clip_model.safetensors"
HEADROOM_KEEP = 0.25  # vp_noise's default keep ratio (experiments/vp_noise.yaml)
HEADROOM_DRAWS = 8  # random keep sets per sample, as make eval's --headroom-draws


def teacher_base() -> Path:
    return cache_root() / "teachers"


def teacher_fingerprint(config) -> tuple[str, dict]:
    """(sha256, the parts) of what the teacher of ``config`` depends on; builds nothing."""
    data = config.data
    root = data_root(data)
    index = ShardIndex.load(root)
    splits = {s: fingerprint(data, config.encoder, root, s, index.shards(s))
              for s in (data.train_split, data.val_split) if s in index.splits}
    parts = {"version": TEACHER_VERSION, "teacher": asdict(config.teacher), "features": splits,
             "stream": {k: getattr(data, k) for k in ("batch_size", "samples_per_epoch", "shuffle_buffer")}
             | {"weights": dict(data.weights)}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest(), parts


def teacher_folder(config, key: Optional[str] = None) -> Path:
    key = key or teacher_fingerprint(config)[0]
    encoder = config.encoder.name.partition(":")[2].replace("/", "_").replace(":", "_")[-40:]
    return teacher_base() / f"{config.teacher.model}-{encoder}-{key[:16]}"


def find_teacher(config) -> Optional[Path]:
    """The weights file of ``config``'s corpus teacher, or None when it is not built yet."""
    weights = teacher_folder(config) / WEIGHTS_FILE
    return weights if weights.is_file() else None


def ensure_teacher(config, log=print) -> Path:
    """The teacher's weights file, built first when there is none (see the module docstring)."""
    key, parts = teacher_fingerprint(config)
    folder = teacher_folder(config, key)
    if (folder / WEIGHTS_FILE).is_file():
        record = json.loads((folder / "teacher.json").read_text())
        room = record["headroom"]
        log(f"corpus teacher: {folder} (held-out NTP: real {record['losses']['real']['mean']:.3f}, "
            f"shuffled {record['losses']['shuffled']['mean']:.3f}; headroom at {room['keep']} of {room['of']} "
            f"tokens: spread {room['spread']['mean']:.4f}, {room['verdict']})", flush=True)
        return folder / WEIGHTS_FILE
    return build_teacher(config, folder, key, parts, log)


# ---- training -------------------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine decay to 0."""
    ramp = max(1, round(warmup * total))
    if step < ramp:
        return (step + 1) / ramp
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - ramp) / max(1, total - ramp))))


def build_head(config, width: int):
    """A random CoCa head (``teacher.model`` at token width ``width``) and its NTP loss module."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.teacher.seed)
        model = create_head(config.teacher.model, width)
        init_decoder_projection(model)
    vlm = CoCaVLM(model, open_clip.get_tokenizer(config.teacher.model), config.teacher.max_text_tokens)
    return model, vlm


def train_head(vlm, datamodule, teacher, log=print) -> float:
    """Fit ``vlm``'s parameters in place on the train split; returns the seconds spent."""
    vlm.requires_grad_(True)
    optimizer = torch.optim.AdamW(vlm.parameters(), lr=teacher.lr, weight_decay=teacher.weight_decay)
    split = datamodule.cfg.train_split
    total = teacher.epochs * len(datamodule.epoch_loader(split))
    began, step = time.perf_counter(), 0
    bar = tqdm(total=total, desc="corpus teacher", unit="step", dynamic_ncols=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(teacher.seed)
        for epoch in range(teacher.epochs):
            for raw in datamodule.epoch_loader(split, epoch):
                batch = datamodule.features(raw, split)
                for group in optimizer.param_groups:
                    group["lr"] = teacher.lr * lr_factor(step, total, teacher.warmup)
                loss = vlm.ntp_loss(batch.features, batch.prompt, batch.target).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    bar.close()
    vlm.requires_grad_(False)
    return time.perf_counter() - began


def held_out(datamodule) -> tuple[torch.Tensor, list, list, list, torch.Tensor]:
    """Every val sample: features, prompts, targets, sources, answer-box tokens ``(n, N)`` bool
    (all False for a sample without a box)."""
    if not datamodule.has_val:
        raise ConfigError(f"{datamodule.root}: a teacher's held-out check needs a {datamodule.cfg.val_split!r} "
                          "split, to measure that it reads the image")
    feats, prompts, targets, sources, answer = [], [], [], [], []
    for raw in datamodule.epoch_loader(datamodule.cfg.val_split):
        batch = datamodule.features(raw)
        feats.append(batch.features)
        prompts += batch.prompt
        targets += batch.target
        sources += batch.source
        boxes = batch.answer_tokens if batch.answer_tokens is not None else torch.zeros(batch.features.shape[:2])
        answer.append(boxes.bool())
    return torch.cat(feats), prompts, targets, sources, torch.cat(answer)


def kept_loss(vlm, feats: torch.Tensor, prompts: list, targets: list, keep: torch.Tensor, batch_size: int,
              desc: Optional[str] = None) -> np.ndarray:
    """Per-sample NTP loss with only the tokens of ``keep`` ``(n, N)`` bool (K per row), gathered."""
    return per_sample_loss(vlm, gather_tokens(feats, kept_indices(keep)), prompts, targets, batch_size, desc)


@torch.no_grad()
def held_out_headroom(vlm, feats: torch.Tensor, prompts: list, targets: list, answer: torch.Tensor,
                      real: np.ndarray, batch_size: int, seed: int, sources: list) -> dict:
    """The teacher's headroom on the held-out samples (see the module docstring); ``sources``: one
    name per sample, for "random keep set - all tokens" per source."""
    n, num_tokens = feats.shape[:2]
    k = resolve_budget(HEADROOM_KEEP, num_tokens)
    generator = torch.Generator().manual_seed(seed)
    masks = random_keep_masks(n, num_tokens, k, HEADROOM_DRAWS, generator)
    losses = np.stack([kept_loss(vlm, feats, prompts, targets, m, batch_size, f"headroom: random keep set {i + 1}/{len(masks)}")
                       for i, m in enumerate(masks)])
    room = headroom(torch.from_numpy(losses))
    floor = mean_ci(room["draw_difference"])[1]
    best = summary(room["best_gain"].numpy())
    first = (answer.float() * 2 + torch.rand(n, num_tokens, generator=generator)).topk(k, dim=1).indices
    boxed = answer.any(1).numpy()
    answer_first = kept_loss(vlm, feats, prompts, targets, keep_mask(first, num_tokens), batch_size,
                             "headroom: answer box first")
    dropped, gained, names = losses[0] - real, (answer_first - losses[0])[boxed], np.asarray(sources)
    return {"keep": k, "of": num_tokens, "draws": HEADROOM_DRAWS, "spread": summary(room["spread"].numpy()),
            "best_gain": best, "noise_floor": floor, "verdict": headroom_verdict(best["mean"], floor),
            "random_minus_all": summary(dropped), "random_minus_all_by_source": by_source(dropped, names),
            "answer_first_minus_random": summary(gained),
            "answer_first_minus_random_by_source": by_source(gained, names[boxed])}


def by_source(values: np.ndarray, names: np.ndarray) -> dict:
    """:func:`summary` of ``values`` per source (``names``: one per value)."""
    return {name: summary(values[names == name]) for name in sorted(set(names.tolist()))}


def format_headroom(room: dict) -> str:
    """The headroom lines the build prints."""
    def cell(s: dict) -> str:
        return f"{s['mean']:+.4f} ± {s['ci95']:.4f}"

    def per_source(key: str) -> list[str]:
        return [f"    {name:<8} n={s['n']:<4}                      {cell(s)}" for name, s in room.get(key, {}).items()]

    return "\n".join([
        f"headroom: {room['keep']} of {room['of']} tokens in {room['draws']} random keep sets per sample:",
        f"  spread of the loss {room['spread']['mean']:.4f} ± {room['spread']['ci95']:.4f}, best of {room['draws']} "
        f"- their mean {room['best_gain']['mean']:.4f} ± {room['best_gain']['ci95']:.4f}, noise floor "
        f"{room['noise_floor']:.4f}: {room['verdict']}",
        f"  random keep set - all tokens          {cell(room['random_minus_all'])}",
        *per_source("random_minus_all_by_source"),
        f"  answer box first - random ({room['answer_first_minus_random']['n']} with a box) "
        f"{cell(room['answer_first_minus_random'])}",
        *per_source("answer_first_minus_random_by_source")])


def measure(vlm, samples: tuple, teacher, init: Optional[np.ndarray] = None) -> tuple[dict, dict]:
    """(held-out losses, headroom) of ``vlm`` on ``samples`` (:func:`held_out`); ``teacher``: the
    ``teacher.*`` keys (batch size, seed)."""
    feats, prompts, targets, sources, answer = samples
    size = teacher.eval_batch_size
    real = per_sample_loss(vlm, feats, prompts, targets, size, "held-out: real image tokens")
    perm = torch.from_numpy(derangement(len(prompts), teacher.seed))
    shuffled = per_sample_loss(vlm, feats[perm], prompts, targets, size, "held-out: shuffled image tokens")
    losses = held_out_losses(init, real, shuffled, sources)
    return losses, held_out_headroom(vlm, feats, prompts, targets, answer, real, size, teacher.seed, sources)


def measure_vlm(config, log=print) -> tuple[dict, dict]:
    """The held-out check and headroom of the run's frozen VLM when it is not the corpus teacher
    (the LLaVA of ``make vlm``, any VLM family): the same figures a teacher's build prints, for
    comparing teachers; nothing is trained or saved."""
    vlm_cfg = config.selector.vlm
    log(f"frozen VLM {vlm_cfg.backend}:{vlm_cfg.model}: measuring it on the held-out split over "
        f"{config.encoder.name} tokens", flush=True)
    datamodule = FeatureDataModule(config.data, config.encoder, config.teacher.seed)
    vlm = build_vlm(vlm_cfg)
    losses, room = measure(vlm, held_out(datamodule), config.teacher)
    log("\n" + format_losses(losses) + "\n" + format_headroom(room), flush=True)
    return losses, room


def build_teacher(config, folder: Path, key: str, parts: dict, log=print) -> Path:
    """Train, measure and save the teacher of ``config`` (fingerprint ``key`` of ``parts``) into
    ``folder``; returns its weights file."""
    started = time.perf_counter()
    log(f"corpus teacher: building {folder} (once; a CoCa head over {config.encoder.name} tokens, trained on "
        "the corpus)", flush=True)
    datamodule = FeatureDataModule(config.data, config.encoder, config.teacher.seed)
    model, vlm = build_head(config, datamodule.dims.dim)
    samples = held_out(datamodule)
    init = per_sample_loss(vlm, *samples[:3], config.teacher.eval_batch_size)
    train_s = train_head(vlm, datamodule, config.teacher, log)
    losses, room = measure(vlm, samples, config.teacher, init)
    enc = config.encoder
    meta = {"open_clip_model": config.teacher.model, "width": datamodule.dims.dim, "fingerprint": key,
            "encoder": {"name": enc.name, "weights": weights_identity(enc), "layer": enc.layer, "norm": enc.norm,
                        "image_size": enc.image_size}}
    record = {"meta": meta, "fingerprint_parts": parts, "losses": losses, "headroom": room,
              "timing": {"train_s": train_s, "total_s": time.perf_counter() - started},
              "params": sum(p.numel() for p in vlm.parameters())}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "teacher.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={HEAD_METADATA: json.dumps(meta)}))
    log("\n" + format_losses(losses, "head at init") + "\n" + format_headroom(room), flush=True)
    log(f"corpus teacher: built in {record['timing']['total_s'] / 60:.1f} min ({train_s:.0f}s training, "
        f"{record['params'] / 1e6:.1f}M params): {folder / WEIGHTS_FILE}", flush=True)
    return folder / WEIGHTS_FILE


def main(argv: Optional[list[str]] = None) -> int:
    quiet_known_warnings()
    selector, config_file, overrides, print_only = parse_run_args(sys.argv[1:] if argv is None else argv,
                                                                  "python -m tokensel.experiments.teacher", __doc__)
    config = load_config(selector or "vp_noise", config_file, overrides)
    if print_only:
        print(config_yaml(config), end="")
        return 0
    ensure_data(config.data)
    vlm = getattr(config.selector, "vlm", None)
    if vlm is None or names_corpus_teacher(vlm):
        ensure_teacher(config)
    else:
        measure_vlm(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
