"""The PIL renderers of the synthetic corpus (coco and vqav2 scenes, docvqa pages) and what every renderer
shares: the per-sample RNG, the named colours, provenance and pixel boxes.

Each ``make_<source>(seed, split, index)`` returns one :data:`Sample`, drawn from its own RNG, so
a sample's bytes depend only on (seed, split, source, index). Changing anything here changes the
corpus: bump :data:`GENERATOR_VERSION` when it does.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tokensel.datamodules.shards import encode_image, source_seed

GENERATOR = "tokensel.synthetic"
GENERATOR_VERSION = 2  # bump when the generated images or text change
SPLIT_IDS = {"train": 0, "val": 1}

Sample = tuple[str, bytes, str, dict]  # key, image bytes, image ext, meta

# Named colours, shared by the scenes and the charts (the order is part of the corpus: keep it).
COLOURS = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (130, 60, 170), "pink": (240, 130, 180), "brown": (130, 80, 40),
    "black": (20, 20, 20), "white": (245, 245, 245), "gray": (128, 128, 128), "cyan": (40, 200, 210),
}
COUNT_WORDS = ["zero", "one", "two", "three", "four"]


def sample_rng(seed: int, split: str, source: str, index: int) -> np.random.Generator:
    """The RNG of one sample: independent of every other sample and of the worker running it."""
    return np.random.default_rng([seed, SPLIT_IDS[split], source_seed(source), index])


def pick(rng: np.random.Generator, items):
    """One element of a sequence, chosen by ``rng``."""
    return items[int(rng.integers(len(items)))]


def provenance(seed: int, index: int) -> dict:
    """Where a generated sample came from: enough to regenerate it."""
    return {"generator": GENERATOR, "seed": seed, "index": index}


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


def draw_scene(rng: np.random.Generator, n_objects: tuple[int, int], radius: tuple[float, float],
               distinct: bool = False) -> tuple[Image.Image, list[dict], str]:
    """``(image, objects, background colour)``: ``n_objects[0]`` to ``n_objects[1]`` flat shapes of
    circumradius ``radius`` (fractions of the side) drawn in order on a plain or gradient
    background. With ``distinct``, no two shapes share a shape or a colour."""
    names = list(COLOURS)
    bg = pick(rng, names)
    image = background(rng, COLOURS[bg], COCO_SIZE)
    draw = ImageDraw.Draw(image)
    objects: list[dict] = []
    for _ in range(int(rng.integers(n_objects[0], n_objects[1] + 1))):
        r = float(rng.uniform(*radius) * COCO_SIZE)
        taken = objects if distinct else []
        obj = {
            "shape": pick(rng, [s for s in SHAPES if s not in {o["shape"] for o in taken}]),
            "colour": pick(rng, [c for c in names if c != bg and c not in {o["colour"] for o in taken}]),
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
    return image, objects, bg


def make_coco(seed: int, split: str, index: int) -> Sample:
    """One scene of 1-4 shapes, JPEG, with captions."""
    rng = sample_rng(seed, split, "coco", index)
    image, objects, bg = draw_scene(rng, (1, 4), (0.07, 0.22))
    meta = {
        "source": "coco",
        "captions": scene_captions(rng, objects, bg),
        "width": COCO_SIZE,
        "height": COCO_SIZE,
        "provenance": provenance(seed, index),
    }
    return f"coco_{split}_{index:06d}", encode_image(image, "jpg"), "jpg", meta


# ---------------------------------------------------------------------------------------------
# vqav2 stand-in: a scene question answered by one shape's colour, its box the evidence

SCENE_QUESTIONS = ("What colour is the {shape}?", "What is the colour of the {shape}?", "Which colour is the {shape}?")


def make_vqav2(seed: int, split: str, index: int) -> Sample:
    """One scene of 2-4 shapes of distinct shapes and colours, JPEG, asking the colour of the
    last-drawn (so unoccluded) one; its ``answer_box`` is that shape's box. Unlike the printed
    answers of docvqa and chartqa, the evidence is a few large patches of one colour, which a
    ViT's patch tokens at 224 px can read."""
    rng = sample_rng(seed, split, "vqav2", index)
    image, objects, _ = draw_scene(rng, (2, 4), (0.07, 0.16), distinct=True)
    target = objects[-1]
    r = target["r"]
    box = (target["cx"] - r, target["cy"] - r, target["cx"] + r, target["cy"] + r)
    meta = {
        "source": "vqav2",
        "question": pick(rng, SCENE_QUESTIONS).format(shape=target["shape"]),
        "answers": [target["colour"]],
        "answer_box": pixel_box(box, COCO_SIZE, COCO_SIZE),
        "width": COCO_SIZE,
        "height": COCO_SIZE,
        "provenance": provenance(seed, index),
    }
    return f"vqav2_{split}_{index:06d}", encode_image(image, "jpg"), "jpg", meta


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

