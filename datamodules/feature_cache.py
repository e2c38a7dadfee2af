"""Encode once, train many: the feature cache of one split (the Gumbel paper, arXiv:2503.16660,
Sec. 4, trains on stored encoder features; every run here re-encoded every batch before).

**Layout.** A cache is a folder of webdataset shards that mirror the image shards one for one
(same relative paths, sample order and keys) plus ``features.json``. Each sample has two members:

- ``<key>.json``: the image sample's own json, byte for byte (every caption or answer option,
  the source, the answer box), so training still draws one option per epoch;
- ``<key>.features.safetensors``: ``features`` (N, C), ``image`` (3, S, S) (the reconstruction
  target at ``data.recon_size``), ``box`` (4,) in encoder-input pixels (NaN: none; the answer-token
  mask is made from it exactly as online) and, when configured, ``cls_attention`` (N,). Features
  and image are stored at ``data.feature_cache_precision`` (fp16 by default), the rest in fp32.

Nothing is pickled: safetensors holds tensors only, and the reader still refuses pickled members.
A sample the build could not use (a corrupt image, bad json) stays in place as a tombstone,
``<key>.skipped.txt`` with the reason, so every run that reads the cache skips and counts it where an
online run would; the shard's index entry keeps the image shard's count, so samples lost to a
truncated image shard are counted as lost too.

**Fingerprint.** ``features.json`` records what the features depend on (:func:`fingerprint`): the
encoder (name, weights: the file's sha256, the wheel's sha256 and converter version, a hub tag, or
the random-init seed; layer, norm, image size, precision), the preprocessing (resize mode,
``recon_size``, CLS-attention layer, storage precision, :data:`FEATURE_CODE_VERSION`) and the data
(the split's index entries with each shard's size and modification time on disk). The folder is
named by its hash, so a changed field means another folder: a cache that does not match is never
read. In
``data.feature_cache=required`` mode a missing match is refused with one line naming the fields by
which the nearest cache of the split differs.

**Building** (``auto`` mode, before training starts; not during the first epoch, so every epoch of
every run reads the same stored stream). Ranks split the shards (shard ``i`` goes to rank
``i % world``); each writes its shards through :func:`~tokensel.common.cache.atomic_write` and a
part list; rank 0 writes ``features.json`` last. Until that file exists the cache does not exist.
Two runs building the same cache at once write identical files by atomic renames, so neither can
corrupt the other. A corrupt or truncated cache shard is skipped and counted by the reader like
a corrupt image shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import tarfile_samples

from tokensel.common.cache import atomic_write, cache_root, file_sha256
from tokensel.common.errors import ConfigError
from tokensel.common.hub import is_packaged, looks_like_path
from tokensel.common.precision import DTYPES
from tokensel.datamodules.batch import FeatureDims
from tokensel.datamodules.config import DataConfig, EncoderConfig
from tokensel.datamodules.samples import SampleDecoder, SkipSample, collate, draw_text
from tokensel.datamodules.shards import REFUSED_EXTS, ShardEntry, ShardFormatError, validate_meta
from tokensel.vlms import HF_LIBRARIES

log = logging.getLogger("tokensel.data")
CACHE_FORMAT = "tokensel-features/1"
CACHE_INDEX = "features.json"
MEMBER = "features.safetensors"
SKIPPED = "skipped.txt"  # a sample the build could not use: only its key and the reason
# Bump when an encoder family's output or preprocess_image changes: older caches then stop matching.
FEATURE_CODE_VERSION = 1


class FeatureCacheError(ConfigError):
    """No usable feature cache where one is required, or one that cannot be written."""


# ---- the fingerprint ---------------------------------------------------------------------------
def weights_identity(encoder: EncoderConfig) -> str:
    """What the encoder's weights are, without building it: a sha256, a tag or the init seed."""
    pretrained = encoder.pretrained
    library, _, model = encoder.name.partition(":")
    if library in HF_LIBRARIES and Path(model).is_dir():  # the weights come with the folder
        files = sorted(p for p in Path(model).iterdir() if p.suffix in (".safetensors", ".bin"))
        return "folder:" + ",".join(f"{p.name}={file_sha256(p)[:16]}" for p in files)
    if not pretrained:
        return f"random(init_seed={encoder.init_seed})"
    if is_packaged(pretrained):
        from tokensel.datamodules.encoders.packaged import CONVERTER_VERSION, locate, packaged_source

        _, sha = locate(packaged_source(pretrained, encoder.name))
        return f"{pretrained} sha256={sha} converter={CONVERTER_VERSION}"
    if looks_like_path(pretrained):
        if not Path(pretrained).is_file():
            raise FeatureCacheError(f"encoder.pretrained={pretrained!r}: no such weights file")
        return f"sha256={file_sha256(Path(pretrained))}"
    return f"tag={pretrained}"


def fingerprint(data: DataConfig, encoder: EncoderConfig, root: Path, split: str,
                entries: list[ShardEntry]) -> dict[str, str]:
    """Everything one split's cached features depend on, as strings (see the module docstring)."""
    stats = [(root / e.path).stat() for e in entries]
    # size and modification time, as make does: a rewritten shard of the same size is another shard
    shards = [[e.path, e.source, e.count, e.bytes, st.st_size, st.st_mtime_ns] for e, st in zip(entries, stats)]
    return {
        "format": CACHE_FORMAT,
        "code_version": str(FEATURE_CODE_VERSION),
        "encoder.name": encoder.name,
        "encoder.weights": weights_identity(encoder),
        "encoder.layer": str(encoder.layer),
        "encoder.norm": str(encoder.norm),
        "encoder.image_size": str(encoder.image_size),
        "encoder.precision": str(encoder.precision),
        "data.resize_mode": data.resize_mode,
        "data.recon_size": str(data.recon_size),
        "data.cls_attention_layer": str(data.cls_attention_layer),
        "data.views": data.views if data.views == "base" else f"{data.views}:{json.dumps([list(p) for p in data.view_pinpoints])}",
        "data.feature_cache_precision": str(data.feature_cache_precision),
        "data.split": split,
        "data.shards": hashlib.sha256(json.dumps(shards).encode()).hexdigest(),
    }


def fingerprint_id(fp: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def cache_base(data: DataConfig) -> Path:
    return Path(data.feature_cache_dir).expanduser() if data.feature_cache_dir else cache_root() / "features"


def cache_folder(base: Path, fp: dict[str, str]) -> Path:
    model = fp["encoder.name"].partition(":")[2].replace("/", "_").replace(":", "_")[-40:]
    return base / f"{fp['data.split']}-{model}-{fingerprint_id(fp)}"


# ---- an existing cache -----------------------------------------------------------------------
@dataclass
class FeatureCache:
    """One built cache: its folder, shards, fingerprint and feature geometry."""

    folder: Path
    entries: list[ShardEntry]
    fingerprint: dict[str, str]
    dims: FeatureDims
    input_size: tuple[int, int]
    precision: str
    cls_attention: bool
    views: bool = False  # anyres: each sample stores (V, ...) tensors, one row per view

    @classmethod
    def open(cls, folder: Path) -> Optional["FeatureCache"]:
        """The cache in ``folder``, or None when it is absent, unfinished or unreadable."""
        try:
            raw = json.loads((Path(folder) / CACHE_INDEX).read_text())
            cache = cls(Path(folder), [ShardEntry(**e) for e in raw["shards"]], dict(raw["fingerprint"]),
                        FeatureDims.from_dict(raw["dims"]), tuple(raw["input_size"]), str(raw["precision"]),
                        bool(raw["cls_attention"]), bool(raw.get("views", False)))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return cache if cache.fingerprint.get("format") == CACHE_FORMAT else None

    def decoder(self) -> "CacheSampleDecoder":
        return CacheSampleDecoder(self.dims.num_tokens, self.dims.dim, self.dims.image_size, self.cls_attention, self.views)


def find_cache(base: Path, fp: dict[str, str]) -> Optional[FeatureCache]:
    cache = FeatureCache.open(cache_folder(base, fp))
    return cache if cache is not None and cache.fingerprint == fp else None


def mismatch_message(base: Path, fp: dict[str, str]) -> str:
    """One line: why no cache under ``base`` serves ``fp`` (the nearest one's differing fields)."""
    split = fp["data.split"]
    where = f"data.feature_cache=required: no feature cache of split {split!r} matches under {base}"
    caches = [c for c in (FeatureCache.open(p) for p in sorted(base.glob(f"{split}-*"))) if c is not None]
    if not caches:
        return f"{where} (none built yet); build it with data.feature_cache=auto"

    def differing(cache: FeatureCache) -> list[str]:
        return [k for k in fp if cache.fingerprint.get(k) != fp[k]]

    nearest = min(caches, key=lambda c: len(differing(c)))
    diffs = ", ".join(f"{k} ({_short(nearest.fingerprint.get(k))} there, {_short(fp[k])} here)"
                      for k in differing(nearest))
    return f"{where}; the nearest, {nearest.folder.name}, differs in {diffs}; rebuild with data.feature_cache=auto"


def _short(value: Optional[str]) -> str:
    value = "none" if value is None else value
    return value if len(value) <= 40 else value[:37] + "..."


# ---- reading ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheSampleDecoder(SampleDecoder):
    """A cache shard's sample → stored tensors and text (drawn as :class:`ImageSampleDecoder` draws it)."""

    num_tokens: int
    dim: int
    image_size: int
    cls_attention: bool
    views: bool = False

    def decode(self, sample: dict, rng: Optional[np.random.Generator], full: bool = True) -> dict:
        from safetensors.torch import load

        if SKIPPED in sample:
            raise SkipSample(f"skipped when the feature cache was built: {sample[SKIPPED].decode(errors='replace')}")
        refused = sorted(k for k in sample if k.rsplit(".", 1)[-1] in REFUSED_EXTS)
        if refused:
            raise SkipSample(f"refusing to unpickle member(s) {', '.join(refused)}")
        if "json" not in sample or MEMBER not in sample:
            raise SkipSample(f"missing .json or .{MEMBER} member")
        try:
            meta = validate_meta(json.loads(sample["json"]))
            tensors = load(sample[MEMBER])
        except ShardFormatError as err:
            raise SkipSample(str(err)) from None
        except Exception as err:  # safetensors raises its own types for corrupt bytes
            raise SkipSample(f"corrupt cached features ({type(err).__name__}: {err})") from None
        shapes = {"features": (self.num_tokens, self.dim), "image": (3, self.image_size, self.image_size), "box": (4,)}
        if self.cls_attention:
            shapes["cls_attention"] = (self.num_tokens,)
        views = tensors["features"].shape[0] if self.views and "features" in tensors else None
        for name, shape in shapes.items():
            shape = shape if views is None else (views, *shape)
            if name not in tensors or tuple(tensors[name].shape) != shape:
                raise SkipSample(f"cached {name} is missing or not {shape}")
        prompt, target = draw_text(meta, rng)
        return {"prompt": prompt, "target": target, "source": meta["source"], "key": sample["__key__"],
                **{name: tensors[name] for name in shapes}}

    def collate(self, examples: list[dict], n_skipped: int) -> dict:
        names = ("features", "image", "box") + (("cls_attention",) if self.cls_attention else ())
        return collate(examples, n_skipped, names, multi=self.views)


# ---- building --------------------------------------------------------------------------------
def bytes_per_sample(dims: FeatureDims, precision: str, cls_attention: bool) -> int:
    width = torch.empty((), dtype=DTYPES[precision]).element_size()
    values = dims.num_tokens * dims.dim + 3 * dims.image_size ** 2
    return values * width + 16 + (4 * dims.num_tokens if cls_attention else 0) + 1024  # + json and tar headers


def build_cache(base: Path, fp: dict[str, str], online, *, batch_size: int, device: torch.device,
                rank: int = 0, world: int = 1, barrier: Callable[[], None] = lambda: None,
                progress: bool = True) -> FeatureCache:
    """Encode this rank's share of the split with ``online`` (an :class:`OnlineFeatures`) and write
    the cache; returns it once every rank is done (see the module docstring)."""
    folder = cache_folder(base, fp)
    precision = fp["data.feature_cache_precision"]
    cls_attention = online.cls_attention_layer is not None
    total = sum(e.count for e in online.entries)
    if rank == 0:
        need = bytes_per_sample(online.dims, precision, cls_attention) * total
        try:
            folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(folder).free
        except OSError as err:
            raise FeatureCacheError(f"data.feature_cache_dir: cannot write {folder} ({err.strerror or err})") from None
        if need > free * 0.95:
            raise FeatureCacheError(f"data.feature_cache: the {fp['data.split']} cache needs about {need / 2**30:.1f} GiB, "
                                    f"{free / 2**30:.1f} GiB free under {base}; set data.feature_cache_dir "
                                    "elsewhere or data.feature_cache=off")
    barrier()
    folder.mkdir(parents=True, exist_ok=True)
    mine = online.entries[rank::world]
    started = time.perf_counter()
    bar = _progress(sum(e.count for e in mine), f"feature cache {fp['data.split']} (rank {rank})"
                    if world > 1 else f"feature cache {fp['data.split']}", progress)
    written = [_write_shard(folder, entry, online, batch_size, device, precision, bar) for entry in mine]
    bar.close()
    atomic_write(folder / "parts" / f"rank{rank}-of{world}.json",
                 lambda tmp: tmp.write_text(json.dumps([asdict(e) for e in written])))
    barrier()
    if rank == 0:
        entries = []
        for r in range(world):
            entries += [ShardEntry(**e) for e in json.loads((folder / "parts" / f"rank{r}-of{world}.json").read_text())]
        record = {"fingerprint": fp, "dims": online.dims.as_dict(), "input_size": list(online.input_size),
                  "precision": precision, "cls_attention": cls_attention,
                  "views": online.decoder.pinpoints is not None,
                  "shards": [asdict(e) for e in sorted(entries, key=lambda e: e.path)],
                  "built_s": round(time.perf_counter() - started, 1)}
        atomic_write(folder / CACHE_INDEX, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
        print(f"feature cache: wrote {sum(e.count for e in entries)} {fp['data.split']} samples in "
              f"{record['built_s']}s -> {folder}", flush=True)
    barrier()
    cache = FeatureCache.open(folder)
    if cache is None or cache.fingerprint != fp:
        raise FeatureCacheError(f"{folder}: the feature cache was not completed (another build replaced it?)")
    return cache


def _write_shard(folder: Path, entry: ShardEntry, online, batch_size: int, device: torch.device,
                 precision: str, bar) -> ShardEntry:
    """Encode one image shard into its cache shard; skipped samples are warned about, not written."""
    from safetensors.torch import save

    dtype = DTYPES[precision]
    source_path = online.root / entry.path
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with wds.TarWriter(str(tmp), mtime=0) as tar:
            pending: list[tuple[dict, dict]] = []

            def flush():
                nonlocal count
                if not pending:
                    return
                views = online.decoder.pinpoints is not None  # then each example holds (V, ...) views
                pixels = (torch.cat if views else torch.stack)([ex["pixels"] for _, ex in pending]).to(device)
                out = online.encode(pixels)
                start = 0
                for sample, ex in pending:
                    rows = slice(start, start + ex["pixels"].shape[0]) if views else start
                    start = rows.stop if views else start + 1
                    tensors = {"features": out["features"][rows].to(dtype), "image": out["image"][rows].to(dtype),
                               "box": ex["box"].float()}
                    if out["cls_attention"] is not None:
                        tensors["cls_attention"] = out["cls_attention"][rows].float()
                    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
                    tar.write({"__key__": sample["__key__"], "json": sample["json"], MEMBER: save(tensors)})
                count += len(pending)
                bar.update(len(pending))
                pending.clear()

            for sample in tarfile_samples([{"url": str(source_path)}], handler=_warn_and_continue):
                try:
                    pending.append((sample, online.decoder.decode(sample, None)))
                except SkipSample as why:
                    log.warning("feature cache: skipped sample %s in %s: %s", sample.get("__key__"), source_path, why)
                    flush()  # the tombstone keeps its place: every run that reads the cache skips and counts it
                    tar.write({"__key__": sample["__key__"], SKIPPED: str(why).encode()})
                    count += 1
                if len(pending) >= batch_size:
                    flush()
            flush()

    target = folder / entry.path
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, write)
    if count < entry.count:
        log.warning("feature cache: %s yielded %d of its %d samples; readers count the rest as lost",
                    source_path, count, entry.count)
    # the image index's count: a reader then counts what this shard lost, as it does online
    return ShardEntry(entry.path, entry.source, entry.count, target.stat().st_size)


def _warn_and_continue(err: Exception) -> bool:
    log.warning("feature cache: skipped unreadable shard data: %s", err)
    return True


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, leave=False)
