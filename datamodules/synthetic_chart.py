"""The matplotlib renderer of the synthetic corpus: chartqa bar and line charts."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tokensel.datamodules.shards import encode_image
from tokensel.datamodules.synthetic_render import COLOURS, Sample, pick, pixel_box, provenance, sample_rng


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
