"""Shards → decoded, mixed, batched samples, split by rank and worker.

One class, :class:`ShardStream`, builds the whole reader pipeline, in the shape of open_clip's
webdataset loader: webdataset reads the tars and batches (``wds.batched``); what it has no stage
for, or no stage that gives the same seeded stream, is written here. Each DataLoader worker of each rank is one *reader*;
with ``R = world * workers`` readers:

- **Disjoint reads.** When a source has at least ``R`` shards, reader ``r`` reads shards
  ``r, r+R, ...`` of an order shuffled per epoch with a seed common to all ranks, so every epoch
  is a fresh partition. With fewer shards, every reader walks all shards but keeps only samples
  ``r, r+R, ...``: still disjoint, at the cost of reading (not decoding) the others' bytes.
- **Equal batch counts.** In training every reader cycles its share forever and stops after
  exactly ``ceil(ceil(samples_per_epoch / (batch * world)) / workers)`` batches, so every rank
  steps the same number of times even when shards are uneven (DDP would hang otherwise).
- **Mixing.** Training draws each sample's source with probability proportional to
  ``data.weights`` (default: each source's sample count, i.e. plain concatenation), from the
  reader's own RNG, so the same seed gives the same stream.
- **Validation** reads every sample exactly once across all readers, in a fixed order, with a
  partial last batch; metrics are reduced once at epoch end, so nothing is counted twice.
- **Bad samples** (corrupt image, bad json, missing member, pickled member) are skipped with a
  warning naming the shard and key, and counted: each batch carries ``n_skipped``. A shard that
  yields fewer samples than its ``index.json`` entry (truncated, or unreadable past some point)
  is warned about with both counts, and the samples it lost are counted the same way.
- **Resume mid-epoch.** :meth:`ShardStream.seek` sets the epoch of the next pass and how many of
  its batches this rank has already trained on; each reader re-creates its seeded stream and
  drops the examples of those batches before batching them, without preprocessing them (their
  images are still decoded: whether one decodes decides what follows in the stream). The
  position lives in shared memory, so the main process moves persistent DataLoader workers too
  (as open_clip's ``SharedEpoch`` does).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from tokensel.datamodules.benchmarks import BENCHMARKS
from tokensel.datamodules.samples import RESIZE_MODES, ImageSampleDecoder, Preprocess, SampleDecoder, SkipSample
from tokensel.datamodules.shards import ShardEntry, ShardFormatError, source_seed

log = logging.getLogger("tokensel.data")
MAX_SKIPS_IN_A_ROW = 1000  # past this the data is broken, not noisy: stop instead of spinning
class SkipCount:
    """The samples one reader skipped; each batch reports those skipped since the previous batch."""

    def __init__(self):
        self.total = 0
        self.reported = 0

    def tar_error(self, err: Exception) -> bool:
        """webdataset's handler for unreadable tar data: warn and read on. Not counted here: the
        rest of that shard is lost, and :meth:`ShardStream._read` counts what it lost."""
        log.warning("skipped unreadable shard data: %s", err)
        return True

    def collation(self, decoder: SampleDecoder):
        """The collation function for ``wds.batched``: the decoder's, with this batch's skips."""
        def collate(examples: list[dict]) -> dict:
            n_skipped, self.reported = self.total - self.reported, self.total
            return decoder.collate(examples, n_skipped)

        return collate


@dataclass(frozen=True)
class ReaderShare:
    """What one reader reads of one list of shards: these shard paths, keeping every
    ``stride``-th sample starting at ``offset``."""

    paths: tuple[str, ...]
    stride: int = 1
    offset: int = 0


def plan_shares(paths: list[str], reader: int, readers: int) -> ReaderShare:
    """Reader ``reader``'s disjoint share of ``paths`` (already in the agreed order)."""
    if len(paths) >= readers:
        return ReaderShare(tuple(paths[reader::readers]))
    return ReaderShare(tuple(paths), stride=readers, offset=reader)


class StreamPosition:
    """Where the next pass of a stream starts: its epoch, and the batches of it that the rank has
    already trained on. In shared memory, so DataLoader workers see what the main process sets."""

    def __init__(self, epoch: int = 0, batches: int = 0):
        self._epoch = mp.Value("q", epoch)
        self._batches = mp.Value("q", batches)

    def set(self, epoch: int, batches: int = 0) -> None:
        self._epoch.value, self._batches.value = epoch, batches

    def get(self) -> tuple[int, int]:
        return self._epoch.value, self._batches.value


def share_count(entries: list[ShardEntry], reader: int, readers: int) -> int:
    """Samples that ``plan_shares`` gives a reader, from the index counts (no I/O)."""
    if len(entries) >= readers:
        return sum(e.count for e in entries[reader::readers])
    total = sum(e.count for e in entries)
    return len(range(reader, total, readers))


class ShardStream(IterableDataset):
    """The reader pipeline of one split for one rank (see the module docstring).

    Build it in the datamodule's ``setup()``, where the rank and world size are known, and wrap
    it in ``DataLoader(stream, batch_size=None, num_workers=W, persistent_workers=W > 0)``. A
    training pass reads epoch ``epoch`` until :meth:`seek` names another.
    """

    def __init__(self, root: str | Path, entries: list[ShardEntry], *, train: bool, batch_size: int,
                 preprocess: Optional[Preprocess] = None, resize_mode: str = "squash",
                 decoder: Optional[SampleDecoder] = None, rank: int = 0, world: int = 1,
                 num_workers: int = 0, seed: int = 0, epoch: int = 0, weights: Optional[dict] = None,
                 samples_per_epoch: Optional[int] = None, shuffle_buffer: int = 1000):
        if not entries:
            raise ShardFormatError(f"{root}: no shards to read")
        if resize_mode not in RESIZE_MODES:
            raise ShardFormatError(f"data.resize_mode={resize_mode!r}: expected one of {', '.join(RESIZE_MODES)}")
        if (decoder is None) == (preprocess is None):
            raise TypeError("ShardStream needs exactly one of preprocess= (image shards) or decoder=")
        self.root = Path(root)
        self.entries = sorted(entries, key=lambda e: e.path)
        self.train = train
        self.batch_size = batch_size
        self.decoder = decoder if decoder is not None else ImageSampleDecoder(preprocess, resize_mode)
        self.rank, self.world = rank, world
        self.workers = max(1, num_workers)
        self.seed = seed
        self.position = StreamPosition(epoch)
        self.shuffle_buffer = shuffle_buffer
        self.counts = {str(self.root / e.path): e.count for e in self.entries}
        self.by_source = {s: [e for e in self.entries if e.source == s] for s in BENCHMARKS}
        self.by_source = {s: es for s, es in self.by_source.items() if es}
        counts = {s: sum(e.count for e in es) for s, es in self.by_source.items()}
        weights = dict(weights) if weights else counts
        unknown = sorted(set(weights) - set(BENCHMARKS))
        if unknown:
            raise ShardFormatError(
                f"data.weights: unknown source(s) {', '.join(unknown)}; expected {', '.join(BENCHMARKS)}")
        missing = sorted(s for s, w in weights.items() if w > 0 and s not in self.by_source)
        if missing:
            raise ShardFormatError(f"data.weights: source(s) {', '.join(missing)} have no shards under {self.root}")
        self.weights = {s: float(w) for s, w in weights.items() if w > 0}
        if train and not self.weights:
            raise ShardFormatError("data.weights: every source has weight 0")
        self.samples_per_epoch = samples_per_epoch or sum(counts.values())

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def readers(self) -> int:
        return self.world * self.workers

    def _reader(self, worker: int) -> int:
        return self.rank * self.workers + worker

    def batches_per_worker(self, worker: int = 0) -> int:
        if self.train:
            per_rank = math.ceil(self.samples_per_epoch / (self.batch_size * self.world))
            return math.ceil(per_rank / self.workers)
        return math.ceil(share_count(self.entries, self._reader(worker), self.readers) / self.batch_size)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the progress bar's total)."""
        return sum(self.batches_per_worker(w) for w in range(self.workers))

    # ---- iteration ---------------------------------------------------------------------------
    def seek(self, epoch: int, batches: int = 0) -> None:
        """Make the next pass read training epoch ``epoch``, without the first ``batches`` batches
        of this rank (trained on before a resume). Call it before ``iter(DataLoader)``; a pass
        without one reads the same epoch as the last. Validation ignores it."""
        self.position.set(epoch, batches)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"ShardStream built for {self.workers} workers, DataLoader has {info.num_workers}")
        skipped = SkipCount()
        if not self.train:
            reader = self._reader(worker)
            share = plan_shares([str(self.root / e.path) for e in self.entries], reader, self.readers)
            examples = self._decoded(self._read(share, skipped), None, skipped)
            return wds.batched(self.batch_size, collation_fn=skipped.collation(self.decoder), partial=True)(examples)
        epoch, done = self.position.get()
        # The DataLoader takes batch i from worker i % W. After ``done`` batches the next one is
        # role ``done % W``'s, so worker w plays role (w + done) % W and skips that role's share.
        role = (worker + done) % self.workers
        drop = len(range(role, done, self.workers)) * self.batch_size
        reader = self._reader(role)
        rng = np.random.default_rng([self.seed, epoch, reader])
        lazy = drop + max(self.shuffle_buffer, 1) - 1 if drop else 0  # may still be in the buffer
        examples = self._decoded(self._mixed_samples(reader, epoch, rng, skipped), rng, skipped, lazy)
        examples = self._fast_forward(self._shuffled(examples, rng), drop, skipped)
        batches = wds.batched(self.batch_size, collation_fn=skipped.collation(self.decoder), partial=False)(examples)
        # the epoch length, as wds's with_epoch
        return islice(batches, max(self.batches_per_worker(role) - drop // self.batch_size, 0))

    def _read(self, share: ReaderShare, skipped: SkipCount) -> Iterator[dict]:
        """The share's samples. Positions follow the index counts, so a shard that ends early
        (truncated, unreadable) leaves the others' assignment unchanged; what it lost of this
        share is warned about and counted as skipped."""
        position = 0
        for path in share.paths:
            start, read = position, 0
            for sample in tarfile_samples([{"url": path}], handler=skipped.tar_error):
                if position % share.stride == share.offset:
                    yield sample
                position += 1
                read += 1
            expected = self.counts.get(path, read)
            if read < expected:
                first = start + read
                lost = len(range(first + (share.offset - first) % share.stride, start + expected, share.stride))
                skipped.total += lost
                log.warning("shard %s yielded %d of the %d samples index.json lists; %d of them lost here",
                            path, read, expected, lost)
            position = start + max(read, expected)

    def _cycle(self, source: str, reader: int, epoch: int, skipped: SkipCount) -> Iterator[dict]:
        """One source's share for this reader, repeated forever; reshuffled on every pass."""
        paths = [str(self.root / e.path) for e in self.by_source[source]]
        for repeat in range(1 << 62):
            order = np.random.default_rng([self.seed, epoch, repeat, source_seed(source)]).permutation(len(paths))
            share = plan_shares([paths[i] for i in order], reader, self.readers)
            yielded = False
            for sample in self._read(share, skipped):
                yielded = True
                yield sample
            if not yielded:
                raise ShardFormatError(f"{self.root}: reader {reader} found no readable {source} samples in {share.paths}")

    def _mixed_samples(self, reader: int, epoch: int, rng: np.random.Generator, skipped: SkipCount) -> Iterator[dict]:
        # Not webdataset's RandomMix: its random_samples draws from the global ``random`` module,
        # which cannot be seeded per reader, so the same seed would not give the same stream.
        sources = sorted(self.weights)
        streams = [self._cycle(s, reader, epoch, skipped) for s in sources]
        probs = np.asarray([self.weights[s] for s in sources])
        probs = probs / probs.sum()
        while True:
            yield next(streams[int(rng.choice(len(streams), p=probs))])

    def _decoded(self, samples: Iterator[dict], rng: Optional[np.random.Generator], skipped: SkipCount,
                 lazy: int = 0) -> Iterator[dict]:
        """Decoded examples; the first ``lazy`` may defer their expensive part (``full=False``)."""
        in_a_row = 0
        position = 0
        for sample in samples:
            try:
                example = self.decoder.decode(sample, rng, full=position >= lazy)
            except SkipSample as why:
                skipped.total += 1
                in_a_row += 1
                log.warning("skipped sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), why)
                if in_a_row >= MAX_SKIPS_IN_A_ROW:
                    raise ShardFormatError(f"{self.root}: {in_a_row} unusable samples in a row; last: {why}") from None
                continue
            in_a_row = 0
            position += 1
            yield example

    def _fast_forward(self, examples: Iterator[dict], drop: int, skipped: SkipCount) -> Iterator[dict]:
        """Drop the first ``drop`` examples: trained on, and their skips reported, before a resume."""
        for position, example in enumerate(examples):
            if position < drop:
                if position == drop - 1:
                    skipped.reported = skipped.total
                continue
            yield self.decoder.complete(example)

    def _shuffled(self, examples: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        # Not wds.shuffle: its buffer algorithm (and its random.Random) gives another order for the
        # same seed, which would change every seeded run this project has measured.
        if self.shuffle_buffer <= 1:
            yield from examples
            return
        buffer: list[dict] = []
        for example in examples:
            buffer.append(example)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))
        rng.shuffle(buffer)
        yield from buffer
