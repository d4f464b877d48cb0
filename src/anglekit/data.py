"""Reading and validating training and evaluation data.

Three formats, detected from the column names (after an optional column mapping):

======================  ===============================  ==========================================
format                  columns                          meaning
======================  ===============================  ==========================================
``scored_pairs`` (A)    ``text1``, ``text2``, ``label``  a similarity score per pair (any scale)
``query_positive`` (B)  ``query``, ``positive``          positive pairs
``triplets`` (C)        ``query``, ``positive``,         positive pairs with a hard negative
                        ``negative``
======================  ===============================  ==========================================

A text field may hold one string or a list of strings; with a list, one is drawn each time the
example is used. Sources: JSON Lines (``.jsonl``/``.json``), CSV (``.csv``), TSV (``.tsv``), a
folder written by ``datasets.Dataset.save_to_disk``, or a Hugging Face hub dataset id.

Every row is checked before training. All problems found (up to ``max_errors``) are raised at
once in one :class:`DataError` naming the file, line and field of each.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DataError",
    "DataFormat",
    "Example",
    "StsPairs",
    "TrainData",
    "load_sts",
    "load_train_data",
    "parse_column_map",
    "resolve_source",
]

LOCAL_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv"}
RESOURCES = Path(__file__).parent / "resources"
BUNDLED = {  # data shipped with the package, by name
    "stsb:train": RESOURCES / "stsb" / "train.jsonl",
    "stsb:dev": RESOURCES / "stsb" / "dev.jsonl",
    "stsb:test": RESOURCES / "stsb" / "test.jsonl",
}


class DataFormat(str, Enum):
    """The three training data formats."""

    SCORED_PAIRS = "scored_pairs"
    QUERY_POSITIVE = "query_positive"
    TRIPLETS = "triplets"

    @property
    def text_fields(self) -> tuple[str, ...]:
        """Names of the text columns, in the order the model sees them."""
        return {
            DataFormat.SCORED_PAIRS: ("text1", "text2"),
            DataFormat.QUERY_POSITIVE: ("query", "positive"),
            DataFormat.TRIPLETS: ("query", "positive", "negative"),
        }[self]

    @property
    def has_label(self) -> bool:
        """Whether rows carry a ``label`` score."""
        return self is DataFormat.SCORED_PAIRS


class DataError(ValueError):
    """Invalid data; ``problems`` lists each as ``"source:line: field: what"``."""

    def __init__(self, source: str, problems: list[str], total: int) -> None:
        self.source = source
        self.problems = problems
        more = f"\n  ... and {total - len(problems)} more" if total > len(problems) else ""
        listing = "\n  ".join(problems)
        super().__init__(f"{total} problem(s) in {source}:\n  {listing}{more}")


Text = str | tuple[str, ...]


@dataclass(frozen=True)
class Example:
    """One validated row: its texts (a string or alternatives each) and its label."""

    texts: tuple[Text, ...]
    label: float | None = None


@dataclass(frozen=True)
class TrainData:
    """Validated training examples of one format."""

    format: DataFormat
    examples: list[Example]
    source: str

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True)
class StsPairs:
    """An STS evaluation set: sentence pairs with gold similarity scores."""

    text1: list[str]
    text2: list[str]
    scores: np.ndarray  # (N,) float64

    def __len__(self) -> int:
        return len(self.text1)


def parse_column_map(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """Parse ``"sentence1=text1,sentence2=text2,score=label"`` (source=target) into a dict."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return dict(spec)
    mapping = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        source, sep, target = part.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise ValueError(f"column map entry {part!r} is not of the form source=target")
        mapping[source.strip()] = target.strip()
    return mapping


def detect_format(columns: Iterable[str]) -> DataFormat:
    """The format whose columns are all present; triplets win over query/positive pairs."""
    cols = set(columns)
    for fmt in (DataFormat.SCORED_PAIRS, DataFormat.TRIPLETS, DataFormat.QUERY_POSITIVE):
        needed = set(fmt.text_fields) | ({"label"} if fmt.has_label else set())
        if needed <= cols:
            return fmt
    raise ValueError(
        f"cannot tell the data format from columns {sorted(cols)}: expected text1, text2, label "
        "(scored pairs), query, positive (pairs) or query, positive, negative (triplets); "
        "rename columns with a column map, e.g. sentence1=text1,sentence2=text2,score=label"
    )


def _read_local(
    path: Path, shard: tuple[int, int] | None = None
) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Yield ``(line number, row or error message)`` for a JSON Lines, CSV or TSV file.

    With ``shard = (index, count)`` only rows whose position ``i`` (counting non-empty rows
    from 0) has ``i % count == index`` are yielded; JSON Lines skip the others unparsed.
    """
    index, count = shard or (0, 1)
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: tolerate a byte-order mark
        if suffix in (".csv", ".tsv"):
            if suffix == ".tsv":  # tabs separate fields; quotes are text
                reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.DictReader(f)
            if reader.fieldnames is None:
                return
            for i, row in enumerate(reader):
                if i % count != index:
                    continue
                if None in row:
                    yield reader.line_num, f"{len(row[None])} more cells than header columns"
                    continue
                yield reader.line_num, row  # a short row's absent cells are None
            return
        position = -1
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            position += 1
            if position % count != index:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield line_no, f"malformed JSON ({e.msg} at column {e.colno})"
                continue
            if not isinstance(row, dict):
                yield line_no, f"expected a JSON object, got {type(row).__name__}"
                continue
            yield line_no, row


def _read_datasets(source: str, split: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Yield ``(row number, row)`` from a ``save_to_disk`` folder or a hub dataset."""
    import datasets

    if Path(source).is_dir():
        ds = datasets.load_from_disk(source)
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:
            raise FileNotFoundError(
                f"data not found: {source} is no local file or folder, and loading it as a hub "
                f"dataset failed: {e}"
            ) from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{source} has splits {sorted(ds)}, not {split!r}")
        ds = ds[split]
    yield from enumerate(ds, start=1)


def resolve_source(source: str | Path) -> str | Path:
    """The file behind a bundled data name (``stsb:train``, ``stsb:dev``, ``stsb:test``)."""
    return BUNDLED.get(str(source), source)


def _rows(source: str | Path, split: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() not in LOCAL_SUFFIXES:
            raise ValueError(
                f"{path}: unsupported file type {path.suffix!r}; use one of "
                f"{sorted(LOCAL_SUFFIXES)} or a datasets folder"
            )
        return _read_local(path)
    if path.is_dir():
        return _read_datasets(str(source), split)
    if path.suffix.lower() in LOCAL_SUFFIXES or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(
            f"data not found: {source} (expected a .jsonl/.csv/.tsv file, a folder written by "
            "datasets' save_to_disk, or a hub dataset id)"
        )
    return _read_datasets(str(source), split)  # a hub dataset id


def _check_text(value: Any) -> tuple[Text | None, str | None]:
    """Return the validated text (or tuple of texts) or an error message."""
    if isinstance(value, str):
        return (value, None) if value.strip() else (None, "is empty")
    if isinstance(value, list | tuple):
        if not value:
            return None, "is an empty list"
        for i, item in enumerate(value):
            if not isinstance(item, str):
                return None, f"item {i} must be a string, got {type(item).__name__}"
            if not item.strip():
                return None, f"item {i} is empty"
        return tuple(value), None
    return None, f"must be a string or a list of strings, got {type(value).__name__}"


def _check_label(value: Any, from_text: bool) -> tuple[float | None, str | None]:
    if from_text and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None, f"must be a number, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, f"must be a number, got {type(value).__name__} {value!r}"
    try:
        value = float(value)
    except OverflowError:
        return None, f"is too large for a float: {value}"
    if not math.isfinite(value):
        return None, f"must be finite, got {value}"
    return float(value), None


def check_row(
    row: Mapping[str, Any], fmt: DataFormat, from_text: bool
) -> tuple[Example | None, list[str]]:
    """Validate one row (columns already mapped) of format ``fmt``.

    Args:
        row: the row's fields.
        fmt: the data format.
        from_text: labels may be numeric strings (CSV/TSV cells).

    Returns:
        The example, or ``None`` and the problems found, each ``"field 'name' what"``.
    """
    texts, problems = [], []
    for name in fmt.text_fields:
        if name not in row or row[name] is None:
            problems.append(f"field {name!r} is missing")
            continue
        text, error = _check_text(row[name])
        if error:
            problems.append(f"field {name!r} {error}")
        texts.append(text)
    label = None
    if fmt.has_label:
        if "label" not in row or row["label"] in (None, ""):
            problems.append("field 'label' is missing")
        else:
            label, error = _check_label(row["label"], from_text)
            if error:
                problems.append(f"field 'label' {error}")
    return (None, problems) if problems else (Example(tuple(texts), label), [])


def load_train_data(
    source: str | Path,
    *,
    column_map: str | Mapping[str, str] | None = None,
    split: str = "train",
    max_errors: int = 20,
) -> TrainData:
    """Read and validate training data of any of the three formats.

    Args:
        source: a ``.jsonl``/``.csv``/``.tsv`` file, a ``save_to_disk`` folder, a hub id, or
            a bundled set (``stsb:train``, ``stsb:dev``, ``stsb:test``).
        column_map: renames source columns, ``{"sentence1": "text1", ...}`` or
            ``"sentence1=text1,..."``.
        split: the split to read from a dataset with several.
        max_errors: how many problems to list in the error (all are counted).

    Returns:
        The validated examples.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        DataError: one or more rows are invalid, or there are none.
    """
    mapping = parse_column_map(column_map)
    source = resolve_source(source)
    from_text = Path(source).suffix.lower() in (".csv", ".tsv")
    fmt: DataFormat | None = None
    examples: list[Example] = []
    problems: list[str] = []
    total = 0

    def problem(where: int, message: str) -> None:
        nonlocal total
        total += 1
        if len(problems) < max_errors:
            problems.append(f"{source}:{where}: {message}")

    for where, row in _rows(source, split):
        if isinstance(row, str):
            problem(where, row)
            continue
        row = {mapping.get(k, k): v for k, v in row.items()}
        if fmt is None:
            try:
                fmt = detect_format(row)
            except ValueError as e:
                raise DataError(str(source), [f"{source}:{where}: {e}"], 1) from None
        example, errors = check_row(row, fmt, from_text)
        for error in errors:
            problem(where, error)
        if example is not None:
            examples.append(example)
    if total:
        raise DataError(str(source), problems, total)
    if fmt is None:
        raise DataError(str(source), [f"{source}: no rows"], 1)
    return TrainData(fmt, examples, str(source))


def load_sts(path: str | Path, *, column_map: str | Mapping[str, str] | None = None) -> StsPairs:
    """Read an STS-format file (``text1``, ``text2``, ``label``) for evaluation.

    Raises:
        DataError: invalid rows, a list of texts, or a file of another format.
    """
    path = resolve_source(path)
    data = load_train_data(path, column_map=column_map, split="test")
    if data.format is not DataFormat.SCORED_PAIRS:
        raise DataError(str(path), [f"{path}: evaluation needs text1, text2, label columns"], 1)
    if any(not isinstance(t, str) for ex in data.examples for t in ex.texts):
        raise DataError(str(path), [f"{path}: evaluation texts must be single strings"], 1)
    return StsPairs(
        text1=[ex.texts[0] for ex in data.examples],  # type: ignore[misc]
        text2=[ex.texts[1] for ex in data.examples],  # type: ignore[misc]
        scores=np.array([ex.label for ex in data.examples], dtype=np.float64),
    )
