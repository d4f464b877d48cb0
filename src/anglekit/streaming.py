"""Training data that never has to fit in memory: a streaming (iterable) dataset.

:class:`StreamingDataset` reads a JSON Lines, CSV or TSV file of any size row by row. Each
row is validated as it is read (a bad row stops training with a :class:`~anglekit.data.DataError`
naming the file, line and field), tokenised in blocks, and passed through a shuffle buffer.

Sharding: the rows are dealt round-robin to ``devices x workers`` shards; shard
``rank * workers + worker`` reads every row but parses and tokenises only its own, so each
device and each data-loading worker sees a disjoint slice. Order: shard ``s`` in pass ``p``
shuffles with a generator seeded by ``(seed, p, s)``, so a seed fixes the whole stream, and a
resumed run that skips the batches already trained on lands on exactly the next batch.

The stream repeats the file forever (pass after pass, each reshuffled); the number of steps
comes from ``max_steps``. Memory holds one shuffle buffer and one tokenisation block,
whatever the file size.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from anglekit.data import (
    LOCAL_SUFFIXES,
    DataError,
    DataFormat,
    Example,
    _read_local,
    check_row,
    detect_format,
    parse_column_map,
    resolve_source,
)

__all__ = ["StreamingDataset"]

logger = logging.getLogger(__name__)


class StreamingDataset(IterableDataset):
    """Tokenised training items streamed from a file, sharded per device and worker.

    Items have the layout of :class:`~anglekit.batching.TokenizedDataset` (``texts``, ``ids``,
    ``label``), so :class:`~anglekit.batching.AngleCollator` batches them.

    Args:
        source: a ``.jsonl``/``.json``/``.csv``/``.tsv`` file or a bundled set name.
        tokenize: texts to token id lists (``AnglE.tokenize``).
        column_map: renames source columns (as :func:`~anglekit.data.load_train_data`).
        seed: fixes the shuffle order and the choice among alternative texts.
        shuffle_buffer: examples held for shuffling (1 keeps the file order).
        tokenize_block: examples tokenised in one call.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``source`` is not a file type that can be streamed.
        DataError: the first row does not fit any data format.
    """

    def __init__(
        self,
        source: str | Path,
        tokenize: Callable[[list[str]], list[list[int]]],
        *,
        column_map: str | Mapping[str, str] | None = None,
        seed: int = 0,
        shuffle_buffer: int = 10_000,
        tokenize_block: int = 1024,
    ) -> None:
        path = Path(resolve_source(source))
        if path.is_dir() or path.suffix.lower() not in LOCAL_SUFFIXES:
            raise ValueError(
                f"{path}: streaming reads {sorted(LOCAL_SUFFIXES)} files, not folders or "
                f"{path.suffix or 'other'!r} files"
            )
        if not path.is_file():
            raise FileNotFoundError(f"data not found: {source} (streaming needs a local file)")
        if shuffle_buffer < 1 or tokenize_block < 1:
            raise ValueError("shuffle_buffer and tokenize_block must be >= 1")
        self.path = path
        self.source = str(path)
        self.tokenize = tokenize
        self.mapping = parse_column_map(column_map)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.tokenize_block = tokenize_block
        self.from_text = path.suffix.lower() in (".csv", ".tsv")
        self.format = self._detect_format()
        self.devices: tuple[int, int] | None = None  # (rank, world size), set by the trainer

    def _detect_format(self) -> DataFormat:
        for where, row in _read_local(self.path):
            if isinstance(row, str):
                raise DataError(self.source, [f"{self.source}:{where}: {row}"], 1)
            try:
                return detect_format(self.mapping.get(k, k) for k in row)
            except ValueError as e:
                raise DataError(self.source, [f"{self.source}:{where}: {e}"], 1) from None
        raise DataError(self.source, [f"{self.source}: no rows"], 1)

    def shard(self) -> tuple[int, int]:
        """``(index, count)`` of the shard this process and data-loading worker read."""
        import torch.distributed as dist

        rank, world = 0, 1
        if self.devices is not None:  # recorded in the main process, before workers start
            rank, world = self.devices
        elif dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def examples(self, shard: tuple[int, int] = (0, 1)) -> Iterator[Example]:
        """One pass over this shard's rows, validated, in file order."""
        for where, row in _read_local(self.path, shard):
            if isinstance(row, str):
                raise DataError(self.source, [f"{self.source}:{where}: {row}"], 1)
            example, errors = check_row(
                {self.mapping.get(k, k): v for k, v in row.items()}, self.format, self.from_text
            )
            if errors:
                problems = [f"{self.source}:{where}: {e}" for e in errors]
                raise DataError(self.source, problems, len(problems))
            yield example

    def _tokenized(self, examples: list[Example], rng: random.Random) -> list[dict[str, Any]]:
        chosen = [[t if isinstance(t, str) else rng.choice(t) for t in ex.texts] for ex in examples]
        ids = iter(self.tokenize([t for texts in chosen for t in texts]))
        return [
            {"texts": texts, "ids": [next(ids) for _ in texts], "label": ex.label}
            for texts, ex in zip(chosen, examples, strict=True)
        ]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard = self.shard()
        for epoch in range(1 << 62):
            rng = random.Random(f"{self.seed}:{epoch}:{shard[0]}/{shard[1]}")
            buffer: list[dict[str, Any]] = []
            block: list[Example] = []
            seen = 0
            for example in self.examples(shard):
                seen += 1
                block.append(example)
                if len(block) < self.tokenize_block:
                    continue
                for item in self._tokenized(block, rng):
                    yield from self._shuffle_in(buffer, item, rng)
                block = []
            for item in self._tokenized(block, rng) if block else []:
                yield from self._shuffle_in(buffer, item, rng)
            rng.shuffle(buffer)
            yield from buffer
            if not seen:
                raise DataError(self.source, [f"{self.source}: no rows for shard {shard}"], 1)
            logger.debug("shard %s finished pass %d over %s", shard, epoch, self.source)

    def _shuffle_in(
        self, buffer: list[dict[str, Any]], item: dict[str, Any], rng: random.Random
    ) -> Iterator[dict[str, Any]]:
        """Add ``item`` to the buffer; once it is full, yield a random resident in its place."""
        if len(buffer) < self.shuffle_buffer:
            buffer.append(item)
            return
        i = rng.randrange(len(buffer))
        yield buffer[i]
        buffer[i] = item
