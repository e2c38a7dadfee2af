"""Export a trained selector to share: ``tokensel export CKPT FOLDER`` (``make export CKPT=... OUT=...``).

    python -m tokensel.experiments.export CKPT FOLDER [--push-to-hub ORG/NAME] [--private]

Writes ``FOLDER/model.safetensors`` (the selector network's weights, no optimiser state) and
``FOLDER/config.json`` (objective, its config, feature dims, the encoder it was trained on, the
run config) and a model card ``README.md``. Load it anywhere without Lightning::

    from tokensel.selectors.catalog import load_selector
    selector = load_selector("FOLDER")            # or a hub id: "org/name"

``make eval CKPTS=FOLDER``, ``make eval-vlm CKPTS=FOLDER`` and the lmms-eval plugin's
``selector=FOLDER`` take the folder as they take a ``.ckpt``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from tokensel.common.cli import ArgumentParser, run_main
from tokensel.common.errors import CheckpointError, UsageError
from tokensel.selectors.catalog import load_selector


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="tokensel export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a training checkpoint (.ckpt) or an exported folder")
    parser.add_argument("folder", help="the folder to write (created; existing files are replaced)")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", default=None,
                        help="also upload the folder to this hub repo (needs a network and `hf auth login`)")
    parser.add_argument("--private", action="store_true", help="create the hub repo as private")
    args = parser.parse_args(argv)
    out = Path(args.folder)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    net = load_selector(args.checkpoint)
    net.save_pretrained(out)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"exported {net.config.name} ({net.dims.num_tokens} tokens x {net.dims.dim}) to {out}/ "
          f"({size / 1e6:.1f} MB: {', '.join(sorted(p.name for p in out.iterdir()))})")
    if args.push_to_hub:
        try:
            url = net.push_to_hub(args.push_to_hub, private=args.private or None)
        except Exception as err:  # the hub's errors (offline, no token, no rights), said in one line
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise CheckpointError(f"--push-to-hub {args.push_to_hub}: {type(err).__name__}: {first} ({out}/ is "
                                  f"written; upload it later with `hf upload {args.push_to_hub} {out}`)") from None
        print(f"pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
