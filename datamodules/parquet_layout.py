"""lmms-lab's parquet releases, read from a local folder (never from the hub).

lmms-lab publishes the benchmarks that lmms-eval runs as Hugging Face datasets of parquet files
(``lmms-lab/textvqa``, ``lmms-lab/DocVQA``, ``lmms-lab/ChartQA``, ``lmms-lab/VQAv2``,
``lmms-lab/POPE``). Most users now download them in that form, e.g.
``huggingface-cli download lmms-lab/textvqa --repo-type dataset --local-dir SRC``::

    SRC/data/{split}-00000-of-00004.parquet      textvqa, ChartQA, VQAv2, POPE
    SRC/DocVQA/{split}-00000-of-00006.parquet    DocVQA (one folder per config)

A split's files are the ``{split}-*.parquet`` in ``SRC`` or in one of the benchmark's folders under
it (:attr:`ParquetLayout.folders`); their split names are lmms-lab's (``validation``, ``test``,
``train``). The image column is the ``datasets`` Image feature, a struct of ``bytes`` and
``path``: its bytes are stored as they are, like an image file of a raw release.

A benchmark's converter module declares ``PARQUET = ParquetLayout(...)``: the columns it reads and
how one row becomes a record. Every file's columns are checked before anything is written; the
rows are then read a batch at a time, so a split never has to fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from tokensel.datamodules.raw_layout import EmbeddedImage, Record, Skips
from tokensel.datamodules.shards import ShardFormatError

ROWS_PER_BATCH = 64


@dataclass(frozen=True)
class ParquetLayout:
    """How one benchmark's lmms-lab release reads.

    ``record(row, index, where, skips)`` turns a row (a dict of :attr:`columns`) into ``(key,
    meta)``, or returns None after counting the row in ``skips`` (e.g. a test row without answers);
    ``index`` counts the rows of the split from 0, ``where`` names the file and row for messages.
    """

    columns: tuple[str, ...]
    record: Callable[[dict, int, str, Skips], Optional[tuple[str, dict]]]
    folders: tuple[str, ...] = ("data",)
    image: str = "image"

    @property
    def needed(self) -> tuple[str, ...]:
        return (*self.columns, self.image)


def holds_parquet(src: Path) -> bool:
    """Whether ``src`` looks like a parquet release: ``*.parquet`` in it or one folder below."""
    return src.is_dir() and (any(src.glob("*.parquet")) or any(src.glob("*/*.parquet")))


def parquet_files(src: Path, split: str, layout: ParquetLayout) -> list[Path]:
    """The parquet files of ``split`` under ``src``, or a ``ShardFormatError`` that lists the splits there are."""
    folders = [src, *(src / name for name in layout.folders)]
    files = [path for folder in folders for path in sorted(folder.glob(f"{split}-*.parquet"))]
    if not files:
        found = sorted({p.name.split("-", 1)[0] for folder in folders for p in folder.glob("*.parquet")})
        where = " or ".join(str(folder / f"{split}-*.parquet") for folder in folders)
        raise ShardFormatError(f"no {where}; the splits there are: {', '.join(found) or 'none'}")
    return files


def check_columns(files: list[Path], layout: ParquetLayout, source: str) -> None:
    """Every file has the columns ``source`` needs, or a ``ShardFormatError`` naming the missing ones."""
    import pyarrow.parquet as pq

    for path in files:
        try:
            names = pq.read_schema(path).names
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise ShardFormatError(f"{path}: unreadable parquet ({err})") from None
        missing = [c for c in layout.needed if c not in names]
        if missing:
            raise ShardFormatError(
                f"{path}: no column {', '.join(map(repr, missing))}; {source} needs {', '.join(layout.needed)} "
                f"(this file has {', '.join(names)})"
            )


def parquet_records(src: Path, split: str, layout: ParquetLayout, source: str, skips: Skips) -> Iterator[Record]:
    """Check the split's files, then return its records lazily, in file and row order."""
    files = parquet_files(src, split, layout)
    check_columns(files, layout, source)
    return _rows(files, layout, skips)


def _rows(files: list[Path], layout: ParquetLayout, skips: Skips) -> Iterator[Record]:
    import pyarrow.parquet as pq

    index = 0
    for path in files:
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_BATCH, columns=list(layout.needed)):
            for values in batch.to_pylist():
                where = f"{path} row {row}"
                made = layout.record(values, index, where, skips)
                if made is not None:
                    cell = values[layout.image]
                    data = cell.get("bytes") if isinstance(cell, dict) else None
                    yield made[0], EmbeddedImage(data, where), made[1]
                row += 1
                index += 1


def bad_row(where: str, what: str) -> ShardFormatError:
    """The error for a row whose values are not the expected types."""
    return ShardFormatError(f"{where}: not the expected layout; {what}")


def strings(value, where: str, column: str) -> list[str]:
    """A list-of-strings cell as a list, or the error naming the row and column."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise bad_row(where, f"{column!r} should be a non-empty list of strings, not {value!r}")
    return value


def text(value, where: str, column: str) -> str:
    """A string cell, or the error naming the row and column."""
    if not isinstance(value, str):
        raise bad_row(where, f"{column!r} should be a string, not {value!r}")
    return value
