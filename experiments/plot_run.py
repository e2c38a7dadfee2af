"""Plot a run's TensorBoard scalars to a PNG:
``python -m tokensel.experiments.plot_run RUN_DIR [OUT.png] [--tags loss,feat_recon]``.

One panel per tag (``train/`` and ``val/`` of the same name share a panel). Handy for READMEs and
for a quick look without starting TensorBoard.
"""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_TAGS = ("loss", "feat_recon", "img_recon", "keep_ratio")


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def plot_run(run_dir: str | Path, out: str | Path, names: tuple[str, ...] = DEFAULT_TAGS) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scalars = read_scalars(run_dir)
    names = tuple(n for n in names if f"train/{n}" in scalars or f"val/{n}" in scalars)
    if not names:
        raise SystemExit(f"error: no train/ or val/ scalars under {run_dir}")
    fig = Figure(figsize=(3.2 * len(names), 2.6), dpi=100)
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        for stage, style in (("train", "-"), ("val", "o-")):
            points = scalars.get(f"{stage}/{name}", [])
            if points:
                ax.plot(*zip(*points), style, label=stage, markersize=3, linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata={"Software": None})
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(" ".join(__doc__.strip().splitlines()[:2]))
        return 0 if args else 2
    names = DEFAULT_TAGS
    for arg in [a for a in args if a.startswith("--tags")]:
        args.remove(arg)
        names = tuple(arg.partition("=")[2].split(","))
    run_dir = Path(args[0])
    if not run_dir.is_dir():
        print(f"error: run folder {str(run_dir)!r} does not exist", file=sys.stderr)
        return 2
    out = plot_run(run_dir, args[1] if len(args) > 1 else run_dir / "scalars.png", names)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
