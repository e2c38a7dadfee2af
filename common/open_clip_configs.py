"""tokensel's own open_clip model configs (``common/model_configs/*.json``, e.g. ``coca_tiny``, a
CPU-sized CoCa), registered with open_clip once per process so that ``open_clip:coca_tiny`` and
``selector.vlm.model=coca_tiny`` resolve like open_clip's built-in names."""

from __future__ import annotations

from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True
