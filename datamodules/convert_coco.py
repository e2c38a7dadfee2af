"""COCO 2017 captions: one record per image, with all its captions ("Microsoft COCO Captions: Data
Collection and Evaluation Server", arXiv:1504.00325).

Raw layout (the official release)::

    SRC/annotations/captions_{split}2017.json   {"images": [{"id", "file_name", ...}],
                                                 "annotations": [{"image_id", "caption", ...}]}
    SRC/{split}2017/<file_name>
"""

from __future__ import annotations

from pathlib import Path

from tokensel.datamodules.raw_layout import Record, Skips, bad_shape, load_json, require_dir


def records(src: Path, split: str, skips: Skips) -> list[Record]:
    """Check the layout and return ``(key, image path, meta)`` per captioned image, in file order."""
    ann_path = src / "annotations" / f"captions_{split}2017.json"
    expected = "a COCO captions json with 'images' and 'annotations' lists"
    raw = load_json(ann_path, expected)
    image_dir = require_dir(src / f"{split}2017", f"the COCO {split}2017 images listed in {ann_path.name}")
    if not (isinstance(raw, dict) and isinstance(raw.get("images"), list) and isinstance(raw.get("annotations"), list)):
        raise bad_shape(ann_path, f"expected {expected}")

    captions: dict[int, list[str]] = {}
    for k, ann in enumerate(raw["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise bad_shape(ann_path, f"annotations[{k}] needs 'image_id' and a string 'caption'")
        captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())

    found = []
    for k, image in enumerate(raw["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise bad_shape(ann_path, f"images[{k}] needs 'id' and a string 'file_name'")
        if not captions.get(image["id"]):
            skips.add("no captions", f"image id {image['id']} in {ann_path}")
            continue
        meta = {
            "source": "coco",
            "captions": captions[image["id"]],
            "provenance": {"dataset": "coco2017", "file": f"{split}2017/{image['file_name']}", "id": image["id"]},
        }
        found.append((f"coco_{image['id']}", image_dir / image["file_name"], meta))
    return found
