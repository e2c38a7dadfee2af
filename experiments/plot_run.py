"""Plot a run's TensorBoard scalars to a PNG:
``python -m tokensel.experiments.plot_run RUN_DIR [OUT.png] [--tags loss,feat_recon]``.

One panel per tag (``train/`` and ``val/`` of the same name share a panel). Handy for READMEs and
for a quick look without starting TensorBoard.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from tokensel.common.cli import ArgumentParser, run_main
from tokensel.common.errors import UsageError
from tokensel.experiments.report import new_figure, read_scalars, save_figure

DEFAULT_TAGS = ("loss", "feat_recon", "img_recon", "keep_ratio")


def plot_run(run_dir: str | Path, out: str | Path, names: tuple[str, ...] = DEFAULT_TAGS) -> Path:
    """Write ``out`` (see the module docstring); a folder without those scalars raises UsageError."""
    scalars = read_scalars(run_dir)
    names = tuple(n for n in names if f"train/{n}" in scalars or f"val/{n}" in scalars)
    if not names:
        raise UsageError(f"no train/ or val/ scalars under {run_dir}")
    fig, axes = new_figure(1, len(names), width=3.2, height=2.6)
    for ax, name in zip(axes[0], names):
        for stage, style in (("train", "-"), ("val", "o-")):
            points = scalars.get(f"{stage}/{name}", [])
            if points:
                ax.plot(*zip(*points), style, label=stage, markersize=3, linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return save_figure(fig, Path(out))


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m tokensel.experiments.plot_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a TensorBoard run folder (e.g. runs/gumbel_ae/version_0)")
    parser.add_argument("out", nargs="?", default=None, help="the PNG to write (default: RUN_DIR/scalars.png)")
    parser.add_argument("--tags", default=",".join(DEFAULT_TAGS),
                        help="comma list of scalar names without train/ or val/ (default: %(default)s)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run folder {str(run_dir)!r} does not exist")
    names = tuple(t for t in args.tags.split(",") if t)
    out = plot_run(run_dir, args.out or run_dir / "scalars.png", names)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
