"""Stage 1 of LLaVA for ``make vlm`` (``vlm_build.py``): train the projector alone, then measure it.

Feature alignment (Liu et al., "Visual Instruction Tuning", arXiv:2304.08485 Sec. 4.2; the first of
the two stages that "Improved Baselines with Visual Instruction Tuning", arXiv:2310.03744, keeps):
the vision tower and the language model stay frozen and only the multi-modal projector learns, by the next-token loss of
the caption (coco) or of the answer (docvqa, chartqa; the question is the prompt). The loss is
the LLaVA family's NTP head (``vlms/ntp.py``, ``LlavaNTP``), the ``hf`` VLM backend's: LLaVA-1.5's
conversation, the target's tokens and EOS scored. The tower's features are what the projector
receives in generation (``LlavaFamily.image_features``, ``vlms/llava.py``).

Data: the corpus's ``train`` split through :class:`~tokensel.datamodules.pipeline.ShardStream`
(seeded mixing and shuffling, a random caption/answer per sample), at the processor's size, mean
and std (PIL bicubic, as the saved processor's PIL backend; transformers' default torchvision
backend, which ``from_pretrained`` picks, differs by at most one grey level on a few pixels).
AdamW (no weight decay), linear warm-up then cosine decay, as LLaVA's stage 1.

Held-out check, on every sample of the ``val`` split (the first caption/answer of each): the mean
over samples of the per-token NLL of the target,

- with the projector at its initialisation (no training), for reference;
- trained, with each sample's own image tokens;
- trained, with the image tokens of another sample (a seeded derangement: one random cycle
  through all samples, so no sample keeps its own image).

real - shuffled is reported with a paired Student-t 95 % CI over samples (``common/stats.py``).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from tokensel.common.stats import mean_ci
from tokensel.datamodules.pipeline import ShardStream
from tokensel.datamodules.samples import Preprocess
from tokensel.datamodules.shards import ShardIndex
from tokensel.vlms.llava import LlavaFamily


def features_and_text(vlm, stream) -> tuple[torch.Tensor, list, list, list]:
    """All of ``stream``'s samples: the projector's input features, prompts, targets, sources."""
    feats, prompts, targets, sources = [], [], [], []
    for batch in stream:
        feats.append(vlm.image_features(batch["pixels"]).float())
        prompts += batch["prompt"]
        targets += batch["target"]
        sources += batch["source"]
    return torch.cat(feats), prompts, targets, sources


@torch.no_grad()
def per_sample_loss(vlm, feats: torch.Tensor, prompts: list, targets: list, batch_size: int,
                    desc: Optional[str] = None) -> np.ndarray:
    """Mean target-token NLL of each sample; ``desc`` names a progress bar over the batches."""
    starts = tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, leave=False, unit="batch",
                  dynamic_ncols=True)
    out = [vlm.ntp_loss(feats[i:i + batch_size], prompts[i:i + batch_size], targets[i:i + batch_size]).per_sample
           for i in starts]
    return torch.cat(out).double().numpy()


def derangement(n: int, seed: int) -> np.ndarray:
    """``perm`` with ``perm[i] != i`` for all i: a random order, each sample taking the next one's image."""
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def lr_at(step: int, recipe) -> float:
    """Linear warm-up to ``lr``, then cosine decay to 0 (LLaVA's schedule)."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


def summary(values: np.ndarray) -> dict:
    mean, half, n = mean_ci(values)
    return {"mean": mean, "ci95": half, "n": n}


def align(model, processor, recipe, log=print) -> tuple[dict, dict]:
    """Train ``model``'s projector in place (see the module docstring); ``(losses, timing)``."""
    timing = {}
    family = LlavaFamily(model, processor)
    vlm = family.ntp_head(recipe.max_text_tokens)
    vlm.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.requires_grad_(True)
    images = processor.image_processor  # the processor's size, mean and std, PIL bicubic (vlm_build.image_processor)
    size = (int(images.size["height"]), int(images.size["width"]))
    preprocess = Preprocess(size, tuple(images.image_mean), tuple(images.image_std), "bicubic")
    index = ShardIndex.load(recipe.data_root)

    began = time.perf_counter()
    val = ShardStream(recipe.data_root, index.shards("val"), train=False, batch_size=recipe.eval_batch_size,
                      preprocess=preprocess)
    feats, prompts, targets, sources = features_and_text(family, val)
    init = per_sample_loss(vlm, feats, prompts, targets, recipe.eval_batch_size)
    timing["eval_init_s"] = time.perf_counter() - began
    log(f"held-out: {len(prompts)} val samples; NTP loss with the projector at init {init.mean():.3f} "
        f"({timing['eval_init_s']:.0f}s)", flush=True)

    train = ShardStream(recipe.data_root, index.shards("train"), train=True, batch_size=recipe.batch_size,
                        preprocess=preprocess, seed=recipe.seed, samples_per_epoch=recipe.steps * recipe.batch_size,
                        shuffle_buffer=256)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=recipe.lr, weight_decay=0.0)
    began, running = time.perf_counter(), []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        for step, batch in enumerate(train):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, recipe)
            loss = vlm.ntp_loss(family.image_features(batch["pixels"]), batch["prompt"], batch["target"]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running.append(loss.item())
            if (step + 1) % recipe.log_every == 0 or step + 1 == recipe.steps:
                spent = time.perf_counter() - began
                log(f"[vlm] step {step + 1}/{recipe.steps}  loss {np.mean(running):.3f}  lr {lr_at(step, recipe):.2e}  "
                    f"{spent:.0f}s (eta {spent / (step + 1) * (recipe.steps - step - 1):.0f}s)", flush=True)
                running = []
    projector.requires_grad_(False)
    timing["train_s"] = time.perf_counter() - began

    began = time.perf_counter()
    real = per_sample_loss(vlm, feats, prompts, targets, recipe.eval_batch_size)
    perm = derangement(len(prompts), recipe.seed)
    shuffled = per_sample_loss(vlm, feats[torch.from_numpy(perm)], prompts, targets, recipe.eval_batch_size)
    timing["eval_trained_s"] = time.perf_counter() - began
    return held_out_losses(init, real, shuffled, sources), timing


def held_out_losses(init: Optional[np.ndarray], real: np.ndarray, shuffled: np.ndarray, sources: list) -> dict:
    """Per-sample losses at init (None: a model that was not trained here), with the real and with
    deranged image tokens, summarised (and per source)."""
    losses = {"n": len(real), "real": summary(real), "shuffled": summary(shuffled),
              "real_minus_shuffled": summary(real - shuffled),
              "per_source": {s: {"real": float(real[m].mean()), "shuffled": float(shuffled[m].mean()), "n": int(m.sum())}
                             | ({"init": float(init[m].mean())} if init is not None else {})
                             for s in sorted(set(sources)) for m in [np.asarray(sources) == s]}}
    if init is not None:
        losses |= {"init": summary(init), "real_minus_init": summary(real - init)}
    return losses


def format_losses(losses: dict, init_label: str = "projector at init") -> str:
    """The held-out table that ``make vlm`` (and ``make teacher``) prints."""
    def row(label: str, s: dict) -> str:
        return f"  {label:<28} {s['mean']:7.3f} ± {s['ci95']:.3f}"

    d = losses["real_minus_shuffled"]
    trained = "trained, " if "init" in losses else ""
    lines = [f"held-out NTP loss (mean target-token NLL over {losses['n']} val samples, ± 95% CI):",
             *([row(init_label, losses["init"])] if "init" in losses else []),
             row(f"{trained}real images", losses["real"]), row(f"{trained}shuffled images", losses["shuffled"]),
             f"  real - shuffled (paired t)   {d['mean']:7.3f} ± {d['ci95']:.3f}  "
             f"[{d['mean'] - d['ci95']:.3f}, {d['mean'] + d['ci95']:.3f}]"]
    for source, s in losses.get("per_source", {}).items():
        at_init = f"init {s['init']:.3f}  " if "init" in s else ""
        lines.append(f"    {source:<8} n={s['n']:<4} {at_init}real {s['real']:.3f}  shuffled {s['shuffled']:.3f}")
    return "\n".join(lines)
