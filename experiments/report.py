"""Report writers shared by ``make eval``, ``make sweep`` and ``make collapse``: tables (CSV and
markdown) of metric triples, PNG plots in one matplotlib style, and one TensorBoard scalar reader.

A *metric triple* is ``(mean, spread, n)`` (``common/stats.py``); ``n == 0`` means "no sample
could be scored" and is always written as ``n/a`` (an empty CSV cell), never as 0.

Plots are ``matplotlib.figure.Figure`` objects on an Agg canvas (:func:`new_figure`: no pyplot
global state) saved by :func:`save_figure` without a "Software" stamp, so the same data give
byte-identical PNGs.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

__all__ = [
    "is_metric_triple", "format_triple", "write_table", "markdown_table", "failed_runs_section",
    "new_figure", "save_figure", "safe_name", "plot_metrics", "read_scalars",
]

# ----------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------

_KEY_COLUMNS = ("selector", "budget", "keep_ratio", "k")


def is_metric_triple(value) -> bool:
    """A ``(mean, spread, n)`` triple as produced by ``stats.mean_ci`` or ``stats.mean_std``."""
    return (
        isinstance(value, (tuple, list))
        and len(value) == 3
        and all(isinstance(v, (int, float, np.floating, np.integer)) for v in value)
        and float(value[2]).is_integer()
    )


def _fmt(x) -> str:
    """Numbers with 3 decimals (``.3g`` for magnitudes < 1e-3 or >= 1e6); ``n/a`` for nan."""
    if x is None:
        return "n/a"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return "n/a"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e6):
            return f"{x:.3g}"
        return f"{x:.3f}"
    return str(x)


def format_triple(value: Sequence) -> str:
    """``mean ± half`` ; ``n/a`` when ``n == 0``; ``mean (n=1)`` when there is no CI."""
    mean, half, n = value
    if int(n) == 0:
        return "n/a"
    if half is None or math.isnan(float(half)):
        return f"{_fmt(mean)} (n={int(n)})"
    return f"{_fmt(mean)} ± {_fmt(half)}"


def _columns(rows: Sequence[Mapping], key_columns: Sequence[str] = _KEY_COLUMNS) -> list[str]:
    cols: list[str] = [c for c in key_columns if any(c in r for r in rows)]
    for r in rows:
        for c in r:
            if c not in cols:
                cols.append(c)
    return cols


def _metric_columns(rows: Sequence[Mapping], cols: Iterable[str]) -> list[str]:
    return [c for c in cols if any(is_metric_triple(r.get(c)) for r in rows)]


def _csv_value(x) -> str:
    if x is None:
        return ""
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return "" if math.isnan(x) else repr(x)
    return str(x)


def write_table(
    rows: list[dict], out_dir: Path, name: str, confidence: float = 0.95, title: Optional[str] = None,
    spread: str = "ci", key_columns: Sequence[str] = _KEY_COLUMNS, markdown: bool = True,
) -> tuple[Path, Optional[Path]]:
    """Write ``<out_dir>/<name>.csv`` and (unless ``markdown=False``) ``<out_dir>/<name>.md``
    (:func:`markdown_table`); return both paths.

    Row schema: ``{"selector", "budget", "keep_ratio", "k", "<metric>": (mean, half, n), ...,
    "<scalar>": value}``. Columns are the union over rows (key columns first, then first-seen
    order); a row missing a column leaves it empty / ``n/a``.

    CSV: every plain column as is, and every metric as three columns ``<metric>_mean``,
    ``<metric>_ci`` (the half-width) and ``<metric>_n``; undefined values (n = 0, nan) are empty
    cells, never 0. ``spread="std"`` reads the triples as ``(mean, sample std, n)`` over seeds
    instead (CSV ``<metric>_std``). ``key_columns`` come first, in that order.
    """
    _check_spread(spread)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows, key_columns)
    metrics = set(_metric_columns(rows, cols))

    csv_cols: list[str] = []
    for c in cols:
        csv_cols += [f"{c}_mean", f"{c}_{spread}", f"{c}_n"] if c in metrics else [c]
    csv_path = out_dir / f"{name}.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(csv_cols)
        for r in rows:
            line = []
            for c in cols:
                v = r.get(c)
                if c in metrics:
                    if is_metric_triple(v):
                        mean, half, n = v
                        n = int(n)
                        line += [_csv_value(float(mean)) if n else "", _csv_value(float(half)) if n else "", str(n)]
                    else:
                        line += ["", "", "0"]
                else:
                    line.append(_csv_value(v))
            w.writerow(line)
    if not markdown:
        return csv_path, None
    md_path = out_dir / f"{name}.md"
    md_path.write_text(markdown_table(rows, confidence, title, spread, key_columns))
    return csv_path, md_path


def _check_spread(spread: str) -> None:
    if spread not in ("ci", "std"):
        raise ValueError(f"spread={spread!r}: expected 'ci' or 'std'")


def markdown_table(
    rows: list[dict], confidence: float = 0.95, title: Optional[str] = None, spread: str = "ci",
    key_columns: Sequence[str] = _KEY_COLUMNS, legend: bool = True,
) -> str:
    """The rows of :func:`write_table` as markdown: one cell per metric reading
    ``mean ± half_width`` (3 decimals), ``n/a`` when n = 0 and ``mean (n=1)`` when there is no
    CI. The ``legend`` line states that ± is the ``confidence`` CI (Student t) and the sample
    counts of every metric; with ``spread="std"``, that ± is the sample std over n seeds, and a
    single seed's cell is the bare mean.
    """
    _check_spread(spread)
    cols = _columns(rows, key_columns)
    metrics = set(_metric_columns(rows, cols))
    counts = []
    for c in cols:
        if c not in metrics:
            continue
        ns = [int(r[c][2]) if is_metric_triple(r.get(c)) else 0 for r in rows]
        lo, hi = (min(ns), max(ns)) if ns else (0, 0)
        counts.append(f"{c} n={lo}" if lo == hi else f"{c} n={lo}–{hi}")
    lines = []
    if title:
        lines += [f"# {title}", ""]
    if legend and spread == "std":
        lines += ["Metric cells are mean ± sample standard deviation over n seeds (a bare number: a single "
                  "seed; n/a: no run could be scored). Seeds per cell: " + ("; ".join(counts) or "none") + ".", ""]
    elif legend:
        lines += [f"Metric cells are mean ± half-width of the {confidence * 100:g} % confidence interval (Student t) "
                  f"over n samples (n/a: no sample could be scored). Samples per cell: "
                  + ("; ".join(counts) if counts else "none") + ".", ""]
    lines.append("| " + " | ".join(cols) + " |")
    text_cols = {c for c in cols if c not in metrics and any(isinstance(r.get(c), str) for r in rows)}
    lines.append("|" + "|".join("---" if c in text_cols else "---:" for c in cols) + "|")
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if c in metrics:
                if spread == "std" and is_metric_triple(v) and int(v[2]) == 1:
                    cells.append(_fmt(v[0]))  # one seed: no spread to show
                else:
                    cells.append(format_triple(v) if is_metric_triple(v) else "n/a")
            else:
                cells.append("" if v is None else _fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def failed_runs_section(failed: list[dict]) -> list[str]:
    """Markdown lines listing failed sweep runs with their stage and error (none: no lines)."""
    if not failed:
        return []
    return ["", "## Failed runs", ""] + [f"- `{f['run_id']}` ({f.get('stage', '?')}): {f.get('error', '')}"
                                         for f in failed]


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 5.5, height: float = 4.0, dpi: int = 100):
    """A ``Figure`` on an Agg canvas with an ``nrows x ncols`` grid of panels, each ``width x height``
    inches; returns ``(figure, axes)`` with ``axes`` a 2-D array, as ``plt.subplots(squeeze=False)``."""
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save_figure(fig, path: Path, rect: Optional[tuple] = None) -> Path:
    """Lay out and write ``fig`` as a PNG at its own dpi, creating the folder; returns ``path``.
    ``rect``: the part of the figure the panels fill (the rest holds e.g. a legend)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=rect)
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def safe_name(name: str) -> str:
    """A file-name-safe version of a metric or axis name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "metric"


def plot_metrics(rows: list[dict], out_dir: Path, dpi: int = 100, confidence: float = 0.95) -> list[Path]:
    """One PNG per metric column (``<out_dir>/<metric>.png``): the metric against the keep ratio,
    one line per selector (points sorted by keep ratio), with the CI half-widths as error bars
    (``confidence`` only labels the title). When every selector has a single budget, one bar per
    selector instead (points on one x would hide each other).
    Cells with n = 0 are left out; a metric with no data at all still gets a PNG saying so.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows)
    selectors: list[str] = []
    for r in rows:
        s = str(r.get("selector", ""))
        if s not in selectors:
            selectors.append(s)
    paths = []
    for metric in _metric_columns(rows, cols):
        fig, axes = new_figure(dpi=dpi)
        ax = axes[0, 0]
        points = {sel: sorted(_points(rows, sel, metric)) for sel in selectors}
        points = {sel: pts for sel, pts in points.items() if pts}
        if points and max(len(pts) for pts in points.values()) == 1:
            # one budget per selector: lines would stack on one x, so one bar each
            labels = [f"{sel}\n{pts[0][0]:.3g}" for sel, pts in points.items()]
            ax.bar(range(len(points)), [pts[0][1] for pts in points.values()],
                   yerr=[pts[0][2] for pts in points.values()], capsize=4, color="tab:blue", alpha=0.8)
            ax.set_xticks(range(len(points)), labels, fontsize=8)
            ax.set_xlabel("selector (keep ratio)")
            ax.set_title(f"{metric} (± {confidence * 100:g} % CI)")
        else:
            for sel, pts in points.items():
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", markersize=4, capsize=3, linewidth=1.2, label=sel)
            ax.set_xlabel("keep ratio")
            ax.set_title(f"{metric} vs keep ratio (± {confidence * 100:g} % CI)")
            if points:
                ax.legend(fontsize=8)
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "n/a (no samples)", ha="center", va="center", transform=ax.transAxes)
        paths.append(save_figure(fig, out_dir / f"{safe_name(metric)}.png"))
    return paths


def _points(rows: list[dict], selector: str, metric: str) -> list[tuple[float, float, float]]:
    """``(keep ratio, mean, CI half-width)`` of one selector's cells with samples."""
    pts = []
    for r in rows:
        v = r.get(metric)
        if str(r.get("selector", "")) != selector or not is_metric_triple(v) or int(v[2]) == 0:
            continue
        x = r.get("keep_ratio")
        if x is None or not math.isfinite(float(v[0])):
            continue
        half = float(v[1])
        pts.append((float(x), float(v[0]), half if math.isfinite(half) else 0.0))
    return pts


# ----------------------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------------------


def read_scalars(run_dir: str | Path, tags: Optional[Iterable[str]] = None) -> dict[str, list[tuple[int, float]]]:
    """The scalars of one TensorBoard run folder: tag -> [(step, value)] in step order; only
    ``tags`` (those present) if given, else every scalar tag."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    present = acc.Tags()["scalars"]
    wanted = present if tags is None else [t for t in tags if t in present]
    return {t: sorted((e.step, e.value) for e in acc.Scalars(t)) for t in wanted}
