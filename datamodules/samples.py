"""One shard sample → one example: the part of the reader that a feature cache swaps out.

A :class:`ShardStream` (``pipeline.py``) decides *which* samples each reader reads, in which order,
and batches them; a :class:`SampleDecoder` decides what one sample becomes. Two decoders exist:

- :class:`ImageSampleDecoder` (here): an image shard's sample → the encoder's input pixels, the answer
  box in those pixels and the text; batches of them go through the frozen encoder;
- ``CacheSampleDecoder`` (``feature_cache.py``): a feature-cache shard's sample → stored features.

Both draw the text with :func:`draw_text` from the same json, one RNG draw per sample, so one
seed gives one stream whichever decoder reads it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from tokensel.datamodules.anyres import anyres_layout, anyres_views, map_box_to_views
from tokensel.datamodules.benchmarks import text_of
from tokensel.datamodules.shards import IMAGE_EXTS, REFUSED_EXTS, ShardFormatError, validate_meta

RESIZE_MODES = ("squash", "pad")
_PIL_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class Preprocess:
    """Everything a data worker needs to turn an image into the encoder's input (picklable).
    Each encoder family fills one in from its model's own config."""

    size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" | "bilinear" | "nearest"


class SkipSample(Exception):
    """A sample that cannot be used; the reason is the message."""


def preprocess_image(image: Image.Image, box: Optional[list], pre: Preprocess, resize_mode: str):
    """Resize a full image to the encoder's input and normalise it with the encoder's mean/std.

    The whole image is kept (no centre crop, so document margins survive and answer boxes map
    exactly). ``squash`` stretches to the input size; ``pad`` first pads to a square with the
    mean colour, as LLaVA-1.5's ``expand2square`` ("Improved Baselines with Visual Instruction
    Tuning", arXiv:2310.03744). Returns ``(pixels (3, H, W), box (4,))`` with the
    box in input pixels, or NaN when there is none.
    """
    w0, h0 = image.size
    dx = dy = 0.0
    if resize_mode == "pad" and w0 != h0:
        side = max(w0, h0)
        fill = tuple(int(round(255 * m)) for m in pre.mean)
        canvas = Image.new("RGB", (side, side), fill)
        dx, dy = (side - w0) / 2, (side - h0) / 2
        canvas.paste(image, (int(dx), int(dy)))
        image, w0, h0 = canvas, side, side
    H, W = pre.size
    pixels = normalise(image.resize((W, H), _PIL_RESAMPLE.get(pre.interpolation, Image.BICUBIC)), pre)
    if box is None:
        return pixels, torch.full((4,), float("nan"))
    sx, sy = W / w0, H / h0
    x0, y0, x1, y1 = box
    return pixels, torch.tensor([(x0 + dx) * sx, (y0 + dy) * sy, (x1 + dx) * sx, (y1 + dy) * sy], dtype=torch.float32)


def normalise(image: Image.Image, pre: Preprocess) -> torch.Tensor:
    """An RGB image already at the input size → (3, H, W) float32 with the encoder's mean/std."""
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(pre.mean, dtype=np.float32)) / np.asarray(pre.std, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def preprocess_views(image: Image.Image, box: Optional[list], pre: Preprocess, pinpoints) -> tuple:
    """LLaVA-NeXT's anyres views of a full image (``anyres.py``): the base view, then the crops of
    the best-fit grid in raster order, each at the encoder's (square) input size. Returns
    ``(pixels (V, 3, S, S), boxes (V, 4))``, the box in each view's pixels, NaN where it is absent."""
    size = pre.size[0]
    layout = anyres_layout((image.height, image.width), pinpoints, size)
    views = anyres_views(image, layout, size, _PIL_RESAMPLE.get(pre.interpolation, Image.BICUBIC))
    pixels = torch.stack([normalise(v, pre) for v in views])
    boxes = map_box_to_views(box if box is not None else [float("nan")] * 4, (image.height, image.width), layout, size)
    return pixels, torch.from_numpy(boxes)


def parse_sample(sample: dict) -> tuple[Image.Image, dict]:
    """One raw tar sample → ``(RGB image, its json meta)``, or ``SkipSample``. Only jpg/png/json
    are ever decoded; a pickled member is refused."""
    refused = sorted(k for k in sample if k.rsplit(".", 1)[-1] in REFUSED_EXTS)
    if refused:
        raise SkipSample(f"refusing to unpickle member(s) {', '.join(refused)}")
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise SkipSample("missing image member (.jpg or .png)")
    if "json" not in sample:
        raise SkipSample("missing .json member")
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as err:
        raise SkipSample(f"bad json ({err})") from None
    try:
        validate_meta(meta)
    except ShardFormatError as err:
        raise SkipSample(str(err)) from None
    try:
        image = Image.open(io.BytesIO(sample[ext]))
        image.load()
        image = image.convert("RGB")
    except Exception as err:  # PIL raises many types for corrupt data
        raise SkipSample(f"corrupt image ({type(err).__name__}: {err})") from None
    return image, meta


def draw_text(meta: dict, rng: Optional[np.random.Generator]) -> tuple[str, str]:
    """``(prompt, target)`` of one sample, by its benchmark's kind (``benchmarks.text_of``): a
    caption sample gives an empty prompt and one caption as target; a question sample gives the
    question as prompt and an answer as target. With ``rng`` (training) the caption/answer is drawn
    at random (one draw per sample), else the first is used."""
    prompt, options = text_of(meta)
    return prompt, options[int(rng.integers(len(options)))] if rng is not None else options[0]


def decode_sample(sample: dict, pre: Preprocess, resize_mode: str, rng: Optional[np.random.Generator],
                  pixels: bool = True, pinpoints=None) -> dict:
    """One raw tar sample → one example (:func:`parse_sample`, :func:`draw_text`, then the
    encoder's preprocessing: one view, or with ``pinpoints`` the anyres views). With
    ``pixels=False`` the sample is checked and its text drawn, but the example keeps the raw
    sample instead of pixels (:func:`with_pixels`).
    """
    image, meta = parse_sample(sample)
    prompt, target = draw_text(meta, rng)
    example = {"prompt": prompt, "target": target, "source": meta["source"], "key": sample["__key__"]}
    if not pixels:
        return {**example, "raw": sample}
    return _add_pixels(example, image, meta, pre, resize_mode, pinpoints)


def _add_pixels(example: dict, image: Image.Image, meta: dict, pre: Preprocess, resize_mode: str, pinpoints) -> dict:
    if pinpoints is None:
        example["pixels"], example["box"] = preprocess_image(image, meta.get("answer_box"), pre, resize_mode)
    else:
        example["pixels"], example["box"] = preprocess_views(image, meta.get("answer_box"), pre, pinpoints)
    return example


def with_pixels(example: dict, pre: Preprocess, resize_mode: str, pinpoints=None) -> dict:
    """An example of ``decode_sample(..., pixels=False)`` with its pixels (others unchanged)."""
    if "raw" in example:
        image, meta = parse_sample(example.pop("raw"))
        _add_pixels(example, image, meta, pre, resize_mode, pinpoints)
    return example


def collate(examples: list[dict], n_skipped: int, tensors: tuple[str, ...] = ("pixels", "box"),
            multi: bool = False) -> dict:
    """Examples → one batch dict. Single-view examples stack; ``multi``-view ones (the decoder
    knows: their tensors have a leading view axis) are flattened, one row per view in
    sample-major order, with the text repeated, ``keys`` ``<key>/v<j>``, and ``view_of`` /
    ``view_index`` saying whose view each row is."""
    views = [e[tensors[0]].shape[0] if multi else 1 for e in examples]
    join = torch.cat if multi else torch.stack
    batch = {("boxes" if t == "box" else t): join([e[t] for e in examples]) for t in tensors}

    def per_row(values: list) -> list:
        return [v for v, n in zip(values, views) for _ in range(n)]

    batch.update(prompt=per_row([e["prompt"] for e in examples]), target=per_row([e["target"] for e in examples]),
                 source=per_row([e["source"] for e in examples]), n_skipped=n_skipped)
    if multi:
        batch["keys"] = [f"{e['key']}/v{j}" for e, n in zip(examples, views) for j in range(n)]
        batch["view_of"] = torch.tensor([i for i, n in enumerate(views) for _ in range(n)])
        batch["view_index"] = torch.tensor([j for n in views for j in range(n)])
    else:
        batch["keys"] = [e["key"] for e in examples]
    return batch


class SampleDecoder:
    """What a :class:`ShardStream` does with each sample it reads (picklable: it runs in workers).

    - :meth:`decode` checks the sample and draws its text (raising :class:`SkipSample` for an
      unusable one); with ``full=False`` it may defer expensive work to :meth:`complete`, which a
      resumed stream skips for the examples it fast-forwards past;
    - :meth:`collate` makes one batch dict of examples, with the batch's skip count.
    """

    def decode(self, sample: dict, rng: Optional[np.random.Generator], full: bool = True) -> dict:
        raise NotImplementedError

    def complete(self, example: dict) -> dict:
        return example

    def collate(self, examples: list[dict], n_skipped: int) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class ImageSampleDecoder(SampleDecoder):
    """Image shards → encoder input (``pixels`` (3, H, W), ``box`` in those pixels; with
    ``pinpoints``, (V, 3, S, S) and (V, 4): the anyres views) and text."""

    preprocess: Preprocess
    resize_mode: str = "squash"
    pinpoints: Optional[tuple] = None  # anyres views (LLaVA-NeXT); None: one view

    def decode(self, sample: dict, rng: Optional[np.random.Generator], full: bool = True) -> dict:
        return decode_sample(sample, self.preprocess, self.resize_mode, rng, pixels=full, pinpoints=self.pinpoints)

    def complete(self, example: dict) -> dict:
        return with_pixels(example, self.preprocess, self.resize_mode, self.pinpoints)

    def collate(self, examples: list[dict], n_skipped: int) -> dict:
        return collate(examples, n_skipped, multi=self.pinpoints is not None)
