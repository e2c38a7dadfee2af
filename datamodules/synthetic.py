"""The default stand-in corpus: small, deterministic, generated, in the shard format.

``make data`` runs ``python -m tokensel.datamodules.synthetic --out data/default``. It writes a
train and a held-out ``val`` split for all three sources through :class:`ShardWriter`, so the
shards obey the same schema and ``index.json`` as converted real data:

- **coco** stands in for COCO captions: 224x224 JPEG scenes of 1-4 flat shapes (circles,
  squares, triangles, stars, ...) of named colours on a plain or gradient background, each
  with 3-5 templated captions ("a red circle and a blue square on a green background").
  It is *not* a natural-image corpus: no textures, occlusion, or open vocabulary.
- **docvqa** stands in for DocVQA: 320x416 PNG pages with a title, form fields
  ("Invoice No: INV-4821", "Total: $1,234.50"), filler text and sometimes a table of items,
  with a question whose answer is printed on the page and its pixel ``answer_box``.
  It is *not* scanned paper: no noise, skew, handwriting, or multi-column layouts.
- **chartqa** stands in for ChartQA: 320x240 PNG bar or line charts (matplotlib) of 3-7
  labelled categories with the values printed, a question about one plotted value or the
  largest category, and the pixel ``answer_box`` of the printed answer. It is *not* real
  charts: no legends, stacked series, or questions that need arithmetic.

Every sample is generated from its own RNG seeded by (seed, split, source, index), so the
same seed gives the same samples whatever the number of worker processes, and the same
shard contents. The generation parameters are stored in ``<out>/synthetic.json``; the CLI
skips the work when the corpus on disk already matches them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tokensel.datamodules.shards import (
    SOURCES,
    ShardFormatError,
    ShardIndex,
    ShardWriter,
    encode_image,
)

GENERATOR = "tokensel.synthetic"
GENERATOR_VERSION = 1  # bump when the generated images or text change
PARAMS_NAME = "synthetic.json"
SPLIT_IDS = {"train": 0, "val": 1}
DEFAULT_TRAIN = {"coco": 768, "docvqa": 256, "chartqa": 256}
DEFAULT_VAL = {"coco": 64, "docvqa": 64, "chartqa": 64}
DEFAULT_SHARD_SAMPLES = 128

Sample = tuple[str, bytes, str, dict]  # key, image bytes, image ext, meta

# Named colours, shared by the scenes and the charts.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (130, 60, 170),
    "pink": (240, 130, 180),
    "brown": (130, 80, 40),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "cyan": (40, 200, 210),
}
COUNT_WORDS = ["zero", "one", "two", "three", "four"]


def sample_rng(seed: int, split: str, source: str, index: int) -> np.random.Generator:
    """The RNG of one sample: independent of every other sample and of the worker running it."""
    return np.random.default_rng([seed, SPLIT_IDS[split], SOURCES.index(source), index])


def pick(rng: np.random.Generator, items):
    """One element of a sequence, chosen by ``rng``."""
    return items[int(rng.integers(len(items)))]


def provenance(seed: int, index: int) -> dict:
    """Where a generated sample came from: enough to regenerate it."""
    return {"generator": GENERATOR, "seed": seed, "index": index}


# ---------------------------------------------------------------------------------------------
# coco stand-in: shapes on a background, with templated captions


COCO_SIZE = 224
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
PLURALS = {shape: shape + "s" for shape in SHAPES}


def shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape of circumradius ``r`` rotated by ``angle`` radians."""
    if shape == "star":
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        thetas = [angle - np.pi / 2 + k * np.pi / 5 for k in range(10)]
    else:
        sides = {"square": 4, "triangle": 3, "diamond": 4, "hexagon": 6}[shape]
        offset = {"square": np.pi / 4, "diamond": 0.0, "triangle": -np.pi / 2, "hexagon": 0.0}[shape]
        radii = [r] * sides
        thetas = [angle + offset + k * 2 * np.pi / sides for k in range(sides)]
    return [(cx + rad * np.cos(t), cy + rad * np.sin(t)) for rad, t in zip(radii, thetas, strict=True)]


def background(rng: np.random.Generator, rgb: tuple[int, int, int], size: int) -> Image.Image:
    """A plain background, or a linear gradient from ``rgb`` to a lighter or darker shade."""
    base = np.array(rgb, dtype=np.float32)
    if rng.random() < 0.5:
        return Image.new("RGB", (size, size), rgb)
    other = base * 0.55 if rng.random() < 0.5 else base + (255 - base) * 0.55
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ramp = t[:, None, None] if rng.random() < 0.5 else t[None, :, None]  # vertical or horizontal
    pixels = base + (other - base) * ramp
    pixels = np.broadcast_to(pixels, (size, size, 3))
    return Image.fromarray(np.ascontiguousarray(pixels).round().astype(np.uint8))


def describe_objects(objects: list[dict], with_colour: bool = True) -> str:
    """'a red circle and two blue squares': objects grouped by (colour, shape) in drawing order."""
    groups: dict[tuple[str, str], int] = {}
    for obj in objects:
        key = (obj["colour"] if with_colour else "", obj["shape"])
        groups[key] = groups.get(key, 0) + 1
    parts = []
    for (colour, shape), n in groups.items():
        noun = shape if n == 1 else PLURALS[shape]
        words = ([COUNT_WORDS[n]] if n > 1 else []) + ([colour] if colour else []) + [noun]
        phrase = " ".join(words)
        parts.append(phrase if n > 1 else with_article(phrase))
    return join_and(parts)


def with_article(phrase: str) -> str:
    """'a red circle', 'an orange star'."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def join_and(parts: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def where(obj: dict, size: int) -> str:
    """A coarse position word for one object."""
    dx, dy = obj["cx"] - size / 2, obj["cy"] - size / 2
    if max(abs(dx), abs(dy)) < size / 8:
        return "in the middle"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def scene_captions(rng: np.random.Generator, objects: list[dict], bg: str) -> list[str]:
    """3-5 templated captions of one scene, in a random order."""
    n = len(objects)
    count = COUNT_WORDS[n] + (" shape" if n == 1 else " shapes")
    biggest = max(objects, key=lambda o: o["r"])
    size_word = "large" if biggest["r"] > COCO_SIZE * 0.16 else "small"
    left_to_right = sorted(objects, key=lambda o: o["cx"])
    placed = join_and([f"{describe_objects([o])} {where(o, COCO_SIZE)}" for o in left_to_right])
    on_bg = "on " + with_article(f"{bg} background")
    candidates = [
        f"{describe_objects(objects)} {on_bg}",
        f"{with_article(bg)} background with {placed}",
        f"{count} {on_bg}: {describe_objects(objects, with_colour=False)}",
        f"a picture of {describe_objects(objects)}",
        f"the largest shape is {describe_objects([biggest])}" if n > 1
        else f"a {size_word} {biggest['colour']} {biggest['shape']} {on_bg}",
        f"a simple drawing of {count} in front of {with_article(bg)} backdrop",
    ]
    order = rng.permutation(len(candidates))[: int(rng.integers(3, 6))]
    return [candidates[k] for k in order]


def make_coco(seed: int, split: str, index: int) -> Sample:
    """One scene of 1-4 shapes, JPEG, with captions."""
    rng = sample_rng(seed, split, "coco", index)
    names = list(COLOURS)
    bg = pick(rng, names)
    image = background(rng, COLOURS[bg], COCO_SIZE)
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        r = float(rng.uniform(0.07, 0.22) * COCO_SIZE)
        obj = {
            "shape": pick(rng, SHAPES),
            "colour": pick(rng, [c for c in names if c != bg]),
            "r": r,
            "cx": float(rng.uniform(r, COCO_SIZE - r)),
            "cy": float(rng.uniform(r, COCO_SIZE - r)),
        }
        fill = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse([obj["cx"] - r, obj["cy"] - r, obj["cx"] + r, obj["cy"] + r], fill=fill)
        else:
            angle = float(rng.uniform(-0.3, 0.3))
            draw.polygon(shape_points(obj["shape"], obj["cx"], obj["cy"], r, angle), fill=fill)
        objects.append(obj)
    meta = {
        "source": "coco",
        "captions": scene_captions(rng, objects, bg),
        "width": COCO_SIZE,
        "height": COCO_SIZE,
        "provenance": provenance(seed, index),
    }
    return f"coco_{split}_{index:06d}", encode_image(image, "jpg"), "jpg", meta


# ---------------------------------------------------------------------------------------------
# docvqa stand-in: a form-like page with a question answered by one printed value


DOC_W, DOC_H = 320, 416
WORDS = (
    "account balance office report summary payment service delivery customer order quarter "
    "annual review budget total approved pending notice contract section policy meeting "
    "schedule program product market sales research project department company regional "
    "shipment invoice record request support manager agreement update status"
).split()
NAMES = ("John Smith", "Maria Garcia", "Wei Chen", "Aisha Khan", "Peter Novak", "Laura Rossi",
         "David Brown", "Emma Wilson", "Kenji Sato", "Olga Ivanova")
CITIES = ("Boston", "Denver", "Chicago", "Seattle", "Atlanta", "Dallas", "Portland", "Phoenix")
COMPANIES = ("Acme Corp.", "Globex Inc.", "Initech LLC", "Umbrella Ltd.", "Stark Supply Co.",
             "Wayne Foods", "Tyrell Systems", "Hooli Logistics")
TITLES = ("INVOICE", "PURCHASE ORDER", "RECEIPT", "SHIPPING NOTICE", "STATEMENT", "MEMORANDUM")
ITEMS = ("Paper A4", "Toner", "Stapler", "Folders", "Pens (box)", "Envelopes", "Labels", "Binders")


def money(rng: np.random.Generator, low: float, high: float) -> str:
    return f"${rng.uniform(low, high):,.2f}"


def doc_date(rng: np.random.Generator) -> str:
    return f"{int(rng.integers(1, 13)):02d}/{int(rng.integers(1, 29)):02d}/{int(rng.integers(1995, 2024))}"


# (label printed on the page, question, value generator)
DOC_FIELDS = (
    ("Invoice No:", "What is the invoice number?", lambda r: f"INV-{int(r.integers(1000, 10000))}"),
    ("Order No:", "What is the order number?", lambda r: f"PO-{int(r.integers(10000, 100000))}"),
    ("Date:", "What is the date on the document?", doc_date),
    ("Due Date:", "When is the payment due?", doc_date),
    ("Customer:", "Who is the customer?", lambda r: pick(r, NAMES)),
    ("Contact:", "Who is the contact person?", lambda r: pick(r, NAMES)),
    ("Ship To:", "Which city is it shipped to?", lambda r: pick(r, CITIES)),
    ("Phone:", "What is the phone number?",
     lambda r: f"({int(r.integers(200, 1000))}) {int(r.integers(200, 1000))}-{int(r.integers(0, 10000)):04d}"),
    ("Account:", "What is the account number?", lambda r: f"{int(r.integers(10**7, 10**8))}"),
    ("Reference:", "What is the reference code?",
     lambda r: "REF-" + "".join(pick(r, "ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3)) + str(int(r.integers(10, 100)))),
    ("Subtotal:", "What is the subtotal?", lambda r: money(r, 10, 5000)),
    ("Tax:", "How much is the tax?", lambda r: money(r, 1, 400)),
    ("Total:", "What is the total amount?", lambda r: money(r, 10, 9000)),
)


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (Pillow >= 10.1)."""
    return ImageFont.load_default(size=size)


def make_docvqa(seed: int, split: str, index: int) -> Sample:
    """One page with a title, fields, filler text and maybe an item table; PNG."""
    rng = sample_rng(seed, split, "docvqa", index)
    paper = tuple(int(v) for v in rng.integers(238, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 60, size=3))
    image = Image.new("RGB", (DOC_W, DOC_H), paper)
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(12, 17))
    body, head = font(size), font(size + 6)
    margin = int(rng.integers(14, 30))
    line = size + int(rng.integers(4, 9))
    y = margin
    # candidates: (question, answer, bbox of the printed answer)
    qa: list[tuple[str, str, tuple[int, int, int, int]]] = []

    title = pick(rng, TITLES)
    title_x = (DOC_W - draw.textlength(title, font=head)) / 2 if rng.random() < 0.5 else margin
    draw.text((title_x, y), title, font=head, fill=ink)
    y += size + 6 + line
    company = pick(rng, COMPANIES)
    draw.text((margin, y), company, font=body, fill=ink)
    y += line + int(rng.integers(2, 10))

    # form fields: "Label: value", either inline or with the values in one column
    n_fields = int(rng.integers(3, 7))
    fields = [DOC_FIELDS[k] for k in rng.permutation(len(DOC_FIELDS))[:n_fields]]
    column = rng.random() < 0.5
    value_x = margin + max(draw.textlength(label, font=body) for label, _, _ in fields) + 8
    for label, question, value_fn in fields:
        value = value_fn(rng)
        draw.text((margin, y), label, font=body, fill=ink)
        x = value_x if column else margin + draw.textlength(label + " ", font=body)
        draw.text((x, y), value, font=body, fill=ink)
        qa.append((question, value, draw.textbbox((x, y), value, font=body)))
        y += line

    # filler text, wrapped to the page width
    y += int(rng.integers(4, 12))
    for _ in range(int(rng.integers(1, 4))):
        words = [pick(rng, WORDS) for _ in range(int(rng.integers(5, 12)))]
        words[0], words[-1] = words[0].capitalize(), words[-1] + "."
        for text in wrap(draw, words, body, DOC_W - 2 * margin):
            if y + line >= DOC_H - margin:
                break
            draw.text((margin, y), text, font=body, fill=ink)
            y += line

    # a small item table, if there is room
    rows = int(rng.integers(0, 4))
    if rows and y + (rows + 2) * line < DOC_H - margin:
        y += line // 2
        price_x = DOC_W - margin - draw.textlength("$0,000.00", font=body)
        draw.text((margin, y), "Item", font=body, fill=ink)
        draw.text((price_x, y), "Price", font=body, fill=ink)
        y += line
        draw.line([(margin, y - 3), (DOC_W - margin, y - 3)], fill=ink, width=1)
        for k in rng.permutation(len(ITEMS))[:rows]:
            item, price = ITEMS[k], money(rng, 1, 500)
            draw.text((margin, y), item, font=body, fill=ink)
            draw.text((price_x, y), price, font=body, fill=ink)
            qa.append((f"What is the price of {item}?", price, draw.textbbox((price_x, y), price, font=body)))
            y += line

    question, answer, box = pick(rng, qa)
    meta = {
        "source": "docvqa",
        "question": question,
        "answers": [answer],
        "answer_box": pixel_box(box, DOC_W, DOC_H),
        "width": DOC_W,
        "height": DOC_H,
        "provenance": provenance(seed, index),
    }
    return f"docvqa_{split}_{index:06d}", encode_image(image, "png"), "png", meta


def wrap(draw: ImageDraw.ImageDraw, words: list[str], font_: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """Greedily break words into lines no wider than ``width`` (a too-long word gets its own line)."""
    lines = [words[0]]
    for word in words[1:]:
        candidate = lines[-1] + " " + word
        if draw.textlength(candidate, font=font_) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def pixel_box(box, width: int, height: int) -> list[int]:
    """Round a float box outwards to whole pixels and clip it to the image."""
    x0, y0, x1, y1 = box
    return [
        max(0, int(np.floor(x0))),
        max(0, int(np.floor(y0))),
        min(width, int(np.ceil(x1))),
        min(height, int(np.ceil(y1))),
    ]


# ---------------------------------------------------------------------------------------------
# chartqa stand-in: a bar or line chart with printed values


CHART_W, CHART_H, CHART_DPI = 320, 240, 100
CATEGORY_SETS = (
    ("Apples", "Pears", "Plums", "Grapes", "Melons", "Kiwis", "Limes"),
    ("France", "Japan", "Brazil", "Canada", "India", "Kenya", "Spain"),
    ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"),
    ("2015", "2016", "2017", "2018", "2019", "2020", "2021"),
    ("North", "South", "East", "West", "Central", "Coast", "Islands"),
)
CHART_TOPICS = ("Sales", "Visitors", "Revenue", "Exports", "Downloads", "Orders", "Rainfall")
CHART_COLOURS = ("red", "green", "blue", "orange", "purple", "brown", "gray", "cyan")


def make_chartqa(seed: int, split: str, index: int) -> Sample:
    """One bar or line chart with printed values and a question about one of them; PNG."""
    import matplotlib.style

    # matplotlib's own defaults, whatever the user's matplotlibrc or the caller's rcParams say
    with matplotlib.style.context("default"):
        return draw_chart(seed, split, index)


def draw_chart(seed: int, split: str, index: int) -> Sample:
    """The body of :func:`make_chartqa`, run under matplotlib's default style."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rng = sample_rng(seed, split, "chartqa", index)
    n = int(rng.integers(3, 8))
    names = pick(rng, CATEGORY_SETS)
    start = int(rng.integers(0, len(names) - n + 1))
    categories = list(names[start : start + n])
    decimals = int(rng.random() < 0.3)
    scale = 10**decimals
    # distinct values, so "the highest" is never a tie
    values = rng.choice(np.arange(scale, 100 * scale), size=n, replace=False) / scale
    labels = [f"{v:.{decimals}f}" for v in values]
    kind = "bar" if rng.random() < 0.6 else "line"
    colour = np.array(COLOURS[pick(rng, CHART_COLOURS)]) / 255
    topic = pick(rng, CHART_TOPICS)

    # The Agg canvas is attached explicitly, so no global backend (pyplot) state is touched.
    fig = Figure(figsize=(CHART_W / CHART_DPI, CHART_H / CHART_DPI), dpi=CHART_DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.86, bottom=0.2 if n > 5 else 0.14)
    ax = fig.add_subplot()
    x = np.arange(n)
    if kind == "bar":
        ax.bar(x, values, color=colour, width=0.6)
    else:
        ax.plot(x, values, color=colour, marker="o", markersize=3)
    texts = [
        ax.text(xi, v + values.max() * 0.03, label, ha="center", va="bottom", fontsize=7)
        for xi, v, label in zip(x, values, labels, strict=True)
    ]
    ax.set_ylim(0, values.max() * 1.22)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xticks(x, categories, fontsize=7, rotation=30 if n > 5 else 0)
    ax.tick_params(axis="y", labelsize=7)
    axis_name = "year" if names[0] == "2015" else "category"
    ax.set_title(f"{topic} by {axis_name}", fontsize=9)
    fig.canvas.draw()

    # Question about one printed value, or about the largest category (answered by its tick label).
    if rng.random() < 0.8:
        k = int(rng.integers(n))
        question = pick(rng, (f"What is the value of {categories[k]}?",
                              f"What value is shown for {categories[k]}?",
                              f"What is the {topic.lower()} value for {categories[k]}?"))
        answer, artist = labels[k], texts[k]
    else:
        k = int(np.argmax(values))
        question = f"Which {axis_name} has the highest {topic.lower()}?"
        answer, artist = categories[k], ax.get_xticklabels()[k]
    renderer = fig.canvas.get_renderer()
    ext = artist.get_window_extent(renderer)
    box = (ext.x0, CHART_H - ext.y1, ext.x1, CHART_H - ext.y0)  # display y points up; image y down

    width, height = fig.canvas.get_width_height()
    assert (width, height) == (CHART_W, CHART_H), (width, height)
    image = Image.frombuffer("RGBA", (width, height), fig.canvas.buffer_rgba()).convert("RGB")
    meta = {
        "source": "chartqa",
        "question": question,
        "answers": [answer],
        "answer_box": pixel_box(box, CHART_W, CHART_H),
        "width": CHART_W,
        "height": CHART_H,
        "provenance": provenance(seed, index),
    }
    return f"chartqa_{split}_{index:06d}", encode_image(image, "png"), "png", meta


MAKERS = {"coco": make_coco, "docvqa": make_docvqa, "chartqa": make_chartqa}


def make_sample(task: tuple[str, int, str, int]) -> Sample:
    """Generate one sample from (source, seed, split, index); the unit of work for the pool."""
    source, seed, split, index = task
    return MAKERS[source](seed, split, index)


# ---------------------------------------------------------------------------------------------
# the corpus


def corpus_params(seed: int, train: Mapping[str, int], val: Mapping[str, int], max_samples_per_shard: int) -> dict:
    """Everything that determines the corpus bytes; stored in ``synthetic.json``."""
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": seed,
        "splits": {
            "train": {s: int(train.get(s, 0)) for s in SOURCES},
            "val": {s: int(val.get(s, 0)) for s in SOURCES},
        },
        "max_samples_per_shard": max_samples_per_shard,
    }


def read_params(out: str | os.PathLike) -> dict | None:
    """The stored parameters of a complete corpus under ``out``, or None if there is none."""
    out = Path(out)
    try:
        params = json.loads((out / PARAMS_NAME).read_text())
        index = ShardIndex.load(out)
        for split, counts in params["splits"].items():
            wanted = {source: n for source, n in counts.items() if n}
            if wanted and (index.counts(split) != wanted or not index.shards(split)):
                return None
    except (OSError, ValueError, KeyError, TypeError):  # ShardFormatError is a ValueError
        return None
    return params


def generate_corpus(
    out: str | os.PathLike,
    seed: int = 0,
    train: Mapping[str, int] | None = None,
    val: Mapping[str, int] | None = None,
    max_samples_per_shard: int = DEFAULT_SHARD_SAMPLES,
    workers: int | None = None,
) -> ShardIndex:
    """Generate the corpus under ``out`` and return its index.

    ``train`` and ``val`` map a source to its sample count (None: the defaults; a source left
    out of a given mapping gets no samples). ``workers`` is the number of processes (None: up
    to 2; 1 or 0: in this process); the output does not depend on it. Only the train and val
    shards of the three sources are replaced, other entries of an existing index are kept.
    """
    train = DEFAULT_TRAIN if train is None else train
    val = DEFAULT_VAL if val is None else val
    for name, counts in (("train", train), ("val", val)):
        unknown = set(counts) - set(SOURCES)
        if unknown or any(int(n) < 0 for n in counts.values()):
            raise ShardFormatError(f"{name} counts {dict(counts)!r}: expected non-negative counts for {SOURCES}")
    if max_samples_per_shard <= 0:
        raise ShardFormatError(f"max_samples_per_shard={max_samples_per_shard} must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = corpus_params(seed, train, val, max_samples_per_shard)
    (out / PARAMS_NAME).unlink(missing_ok=True)  # an interrupted run must not look complete

    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        for split, counts in params["splits"].items():
            for source, count in counts.items():
                tasks = [(source, seed, split, i) for i in range(count)]
                samples = pool.imap(make_sample, tasks, chunksize=8) if pool else map(make_sample, tasks)
                # ShardWriter replaces this (split, source)'s old shards even when count is 0.
                with ShardWriter(out, split, source, max_samples=max_samples_per_shard) as writer:
                    for key, image, ext, meta in samples:
                        writer.write(key, image, ext, meta)
    finally:
        if pool is not None:
            pool.terminate()  # every result is consumed by now, unless we are here on an error
            pool.join()

    (out / PARAMS_NAME).write_text(json.dumps(params, indent=1) + "\n")
    return ShardIndex.load(out)


def ensure_default_corpus(out: str | os.PathLike) -> Path:
    """Return ``out``, generating the default corpus there first if no complete corpus exists.

    A complete corpus already under ``out`` is used as it is, whatever its parameters. Call it
    from one process only (e.g. in ``prepare_data``): concurrent calls would race.
    """
    out = Path(out)
    if read_params(out) is None:
        generate_corpus(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokensel.datamodules.synthetic",
        description="Generate the deterministic stand-in corpus (coco, docvqa, chartqa) as shards.",
    )
    parser.add_argument("--out", required=True, help="dataset root to write (index.json, train/, val/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-coco", type=int, default=DEFAULT_TRAIN["coco"])
    parser.add_argument("--train-docvqa", type=int, default=DEFAULT_TRAIN["docvqa"])
    parser.add_argument("--train-chartqa", type=int, default=DEFAULT_TRAIN["chartqa"])
    parser.add_argument("--val-per-source", type=int, default=DEFAULT_VAL["coco"])
    parser.add_argument("--shard-samples", type=int, default=DEFAULT_SHARD_SAMPLES, help="samples per shard")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: up to 2)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the corpus is up to date")
    args = parser.parse_args(argv)

    train = {"coco": args.train_coco, "docvqa": args.train_docvqa, "chartqa": args.train_chartqa}
    val = {s: args.val_per_source for s in SOURCES}
    params = corpus_params(args.seed, train, val, args.shard_samples)
    if not args.force and read_params(args.out) == params:
        print(f"{args.out}: corpus already generated with these parameters (use --force to regenerate)")
        return 0

    start = time.perf_counter()
    try:
        index = generate_corpus(args.out, args.seed, train, val, args.shard_samples, args.workers)
    except ShardFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split in params["splits"]:
        counts = index.counts(split)
        detail = ", ".join(f"{s} {counts.get(s, 0)}" for s in SOURCES)
        shards = len(index.splits.get(split, []))
        print(f"{split}: {sum(counts.values())} samples ({detail}) in {shards} shard(s) -> {Path(args.out) / split}")
    print(f"generated in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
