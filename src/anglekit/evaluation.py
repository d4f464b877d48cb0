"""STS evaluation: Spearman correlation of cosine similarities with gold scores.

The seven tasks of the AnglE paper's main table are STS12-STS16, STS-B and SICK-R. Each is
scored as ``100 * spearman(cos(u_i, v_i), y_i)`` over its test pairs, the protocol of SimCSE and
AnglE. For STS12-STS16 the subsets of a year are concatenated and ONE correlation is computed on
the concatenation (the "all" setting), not the mean of per-subset correlations.

:func:`evaluate` is the one entry point: give it an ``encode`` function and either a folder
holding some of the tasks or a single STS-format file.

Folder layouts (a task whose files are absent is reported as missing, not as an error):

(a) JSON Lines, one folder per task::

        <dir>/sts12/test.jsonl   <dir>/sts13/test.jsonl   <dir>/sts14/test.jsonl
        <dir>/sts15/test.jsonl   <dir>/sts16/test.jsonl   <dir>/stsb/test.jsonl
        <dir>/sickr/test.jsonl

    Each line is ``{"text1": str, "text2": str, "label": float}``, read by
    :func:`anglekit.data.load_sts`; extra fields (e.g. ``"subset"``) are ignored.

(b) The SentEval download (``SentEval/data/downstream``)::

        <dir>/STS/STS12-en-test/STS.input.<subset>.txt   sentence1 TAB sentence2, one pair a line
        <dir>/STS/STS12-en-test/STS.gs.<subset>.txt      one gold score a line; a blank line
                                                         marks an unscored pair, which is dropped
        ... likewise STS13-en-test ... STS16-en-test
        <dir>/STS/STSBenchmark/sts-test.csv              TAB-separated: genre, file, year, id,
                                                         score, sentence1, sentence2[, extra...]
        <dir>/SICK/SICK_test_annotated.txt               TAB-separated with a header naming
                                                         sentence_A, sentence_B, relatedness_score

    Subsets are found from the ``STS.gs.*.txt`` files. ``STS.gs.ALL.txt`` (STS12's pooled gold
    file) is ignored; any other gold file without its input file (STS13's licensed ``SMT``
    subset) is skipped with a warning. Quotes are literal text (no CSV quoting).

When a task is present in both layouts, layout (a) is used. A single file given instead of a
folder is read by :func:`anglekit.data.load_sts` and reported under its file stem.

Malformed SentEval files raise :class:`anglekit.data.DataError` (a ``ValueError``) listing each
problem as ``file:line: what``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
from scipy import stats

from anglekit._enums import parse_choice
from anglekit.data import DataError, StsPairs, load_sts

__all__ = [
    "Correlation",
    "Encoder",
    "SuiteResult",
    "Task",
    "evaluate",
    "evaluate_pairs",
    "format_table",
    "load_task",
    "load_tasks",
    "pair_cosines",
    "results_to_json",
    "run_suite",
    "sts_correlations",
]

logger = logging.getLogger(__name__)

Encoder = Callable[[list[str]], np.ndarray]
"""Maps ``N`` texts to an ``(N, D)`` array of embeddings (normalised or not)."""

MISSING = "–"  # shown in tables for a task without data
MAX_PROBLEMS = 20  # problems listed per malformed file


class Task(str, Enum):
    """The STS tasks of the AnglE paper, in its column order; the value is the display name."""

    STS12 = "STS12"
    STS13 = "STS13"
    STS14 = "STS14"
    STS15 = "STS15"
    STS16 = "STS16"
    STSB = "STS-B"
    SICKR = "SICK-R"


_JSONL_DIRS = {
    Task.STS12: "sts12",
    Task.STS13: "sts13",
    Task.STS14: "sts14",
    Task.STS15: "sts15",
    Task.STS16: "sts16",
    Task.STSB: "stsb",
    Task.SICKR: "sickr",
}
_SENTEVAL_YEAR_DIRS = {
    Task.STS12: "STS12-en-test",
    Task.STS13: "STS13-en-test",
    Task.STS14: "STS14-en-test",
    Task.STS15: "STS15-en-test",
    Task.STS16: "STS16-en-test",
}
_STSB_TEST = Path("STS", "STSBenchmark", "sts-test.csv")
_SICK_TEST = Path("SICK", "SICK_test_annotated.txt")
_SICK_COLUMNS = ("sentence_A", "sentence_B", "relatedness_score")


@dataclass(frozen=True)
class Correlation:
    """Correlations of predicted with gold scores, both x100, over ``n`` pairs."""

    spearman: float
    pearson: float
    n: int


@dataclass(frozen=True)
class SuiteResult:
    """Scores of one model on several tasks.

    Attributes:
        scores: task name (a :class:`Task` value, or a file stem) -> its correlations, or
            ``None`` when the task's data was not found. Keys are plain strings; since
            :class:`Task` is a ``str`` Enum, ``scores[Task.STSB]`` and ``scores["STS-B"]`` are
            the same entry.
        cosines: task name -> the ``(N,)`` per-pair cosines behind its score, when
            :func:`run_suite` was asked to keep them (for plots); else ``None``.
    """

    scores: dict[str, Correlation | None]
    cosines: dict[str, np.ndarray] | None = field(default=None, compare=False, repr=False)

    @property
    def present(self) -> dict[str, Correlation]:
        """The tasks that were evaluated, in order."""
        return {name: c for name, c in self.scores.items() if c is not None}

    @property
    def missing(self) -> list[str]:
        """Names of the tasks whose data was not found, in order."""
        return [name for name, c in self.scores.items() if c is None]

    @property
    def avg(self) -> float | None:
        """Mean Spearman x100 over the present tasks; ``None`` when none is present."""
        present = self.present
        if not present:
            return None
        return float(np.mean([c.spearman for c in present.values()]))


def _as_task(task: Task | str) -> Task:
    return parse_choice(Task, task, "task")


def sts_correlations(
    pred: Sequence[float] | np.ndarray, gold: Sequence[float] | np.ndarray
) -> Correlation:
    """Spearman and Pearson correlation (x100) of predicted with gold scores.

    A constant ``pred`` or ``gold`` has no defined correlation: the result is NaN and a
    warning is logged (a collapsed model is a result to report, not a crash).

    Args:
        pred: ``(N,)`` predicted similarities.
        gold: ``(N,)`` gold scores.

    Returns:
        The :class:`Correlation`.

    Raises:
        ValueError: shapes differ, are not 1-D, ``N < 2``, or values are not finite.
    """
    pred = np.asarray(pred, dtype=np.float64)  # (N,)
    gold = np.asarray(gold, dtype=np.float64)  # (N,)
    if pred.ndim != 1 or pred.shape != gold.shape:
        raise ValueError(
            f"pred and gold must be 1-D of equal length, got {pred.shape} and {gold.shape}"
        )
    n = pred.shape[0]
    if n < 2:
        raise ValueError(f"a correlation needs at least 2 pairs, got {n}")
    for name, values in (("pred", pred), ("gold", gold)):
        if not np.isfinite(values).all():
            raise ValueError(f"{name} holds {int((~np.isfinite(values)).sum())} non-finite values")
    if np.ptp(pred) == 0 or np.ptp(gold) == 0:
        which = "predictions" if np.ptp(pred) == 0 else "gold scores"
        logger.warning("all %d %s are equal: correlation is undefined (NaN)", n, which)
        return Correlation(spearman=math.nan, pearson=math.nan, n=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-constant inputs; NaN speaks for itself
        spearman = float(stats.spearmanr(pred, gold)[0]) * 100
        pearson = float(stats.pearsonr(pred, gold)[0]) * 100
    return Correlation(spearman=spearman, pearson=pearson, n=n)


def pair_cosines(encode: Encoder, pairs: StsPairs) -> np.ndarray:
    """``cos(encode(text1_i), encode(text2_i))`` for each pair of an STS set.

    Each distinct text of both columns is encoded once, in one call to ``encode``. Embeddings
    are L2-normalised here, so ``encode`` need not normalise.

    Args:
        encode: maps a list of ``M`` texts to an ``(M, D)`` array.
        pairs: the sentence pairs.

    Returns:
        The ``(N,)`` float64 cosines, in the order of the pairs.

    Raises:
        ValueError: ``encode`` returned the wrong shape or non-finite values.
    """
    index = {t: i for i, t in enumerate(dict.fromkeys([*pairs.text1, *pairs.text2]))}
    texts = list(index)
    emb = np.asarray(encode(texts), dtype=np.float64)  # (M, D)
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(
            f"encode returned shape {emb.shape} for {len(texts)} texts; expected (M, D)"
        )
    if not np.isfinite(emb).all():
        raise ValueError("encode returned non-finite (NaN or inf) embeddings")
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # (M, D)
    u = emb[[index[t] for t in pairs.text1]]  # (N, D)
    v = emb[[index[t] for t in pairs.text2]]  # (N, D)
    return np.einsum("nd,nd->n", u, v)  # (N,)


def evaluate_pairs(encode: Encoder, pairs: StsPairs) -> Correlation:
    """Score one STS set: correlate :func:`pair_cosines` with the gold scores.

    Args:
        encode: maps a list of ``M`` texts to an ``(M, D)`` array.
        pairs: the sentence pairs and gold scores.

    Returns:
        The :class:`Correlation` over all pairs.

    Raises:
        ValueError: ``encode`` returned the wrong shape or non-finite values.
    """
    return sts_correlations(pair_cosines(encode, pairs), pairs.scores)


def evaluate_sizes(
    encode_layers: Callable[[list[str]], np.ndarray],
    pairs: StsPairs,
    sizes: Sequence[tuple[int, int]],
) -> dict[tuple[int, int], Correlation]:
    """Score one STS set at several (layers, dimensions) sizes from one encoding pass.

    Args:
        encode_layers: maps ``M`` texts to ``(L, M, D)`` embeddings of every depth
            (``AnglE.encode(..., all_layers=True)``).
        pairs: the sentence pairs and gold scores.
        sizes: ``(l, k)`` cells: layer ``l`` (1-based) cut to its first ``k`` dimensions.

    Returns:
        The :class:`Correlation` of each cell.
    """
    texts = list(dict.fromkeys([*pairs.text1, *pairs.text2]))
    every = np.asarray(encode_layers(texts))  # (L, M, D)
    row = {t: i for i, t in enumerate(texts)}
    return {
        (layer, dims): evaluate_pairs(
            lambda batch, layer=layer, dims=dims: every[layer - 1, [row[t] for t in batch], :dims],
            pairs,
        )
        for layer, dims in sizes
    }


# --- SentEval layout -------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, without line endings (``\\n`` or ``\\r\\n``)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(str(path), [f"{path}:{line}: not valid UTF-8 ({e.reason})"], 1) from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final line ending
    return [line.removesuffix("\r") for line in lines]


class _Problems:
    """Collects ``file:line: what`` messages and raises them together."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self.total = 0

    def add(self, line: int, message: str) -> None:
        self.total += 1
        if len(self.messages) < MAX_PROBLEMS:
            self.messages.append(f"{self.path}:{line}: {message}")

    def raise_if_any(self) -> None:
        if self.total:
            raise DataError(str(self.path), self.messages, self.total)


def _parse_score(text: str, line: int, problems: _Problems) -> float | None:
    try:
        value = float(text)
    except ValueError:
        problems.add(line, f"score must be a number, got {text!r}")
        return None
    if not math.isfinite(value):
        problems.add(line, f"score must be finite, got {text!r}")
        return None
    return value


def _check_sentences(s1: str, s2: str, line: int, problems: _Problems) -> bool:
    ok = True
    for name, s in (("sentence 1", s1), ("sentence 2", s2)):
        if not s.strip():
            problems.add(line, f"{name} is empty")
            ok = False
    return ok


def _read_senteval_subset(
    input_path: Path, gs_path: Path
) -> tuple[list[str], list[str], list[float]]:
    """Read one STS12-16 subset; pairs with a blank gold line are dropped, as SentEval does."""
    inputs = _read_lines(input_path)
    golds = _read_lines(gs_path)
    if len(inputs) != len(golds):
        (short, n_short), (long, n_long) = sorted(
            [(input_path, len(inputs)), (gs_path, len(golds))], key=lambda x: x[1]
        )
        message = (
            f"{long}:{n_short + 1}: line count mismatch: {long.name} has {n_long} lines but "
            f"{short.name} has {n_short}; input and gold files must pair line by line"
        )
        raise DataError(str(long), [message], 1)
    input_problems, gs_problems = _Problems(input_path), _Problems(gs_path)
    text1: list[str] = []
    text2: list[str] = []
    scores: list[float] = []
    for line, (pair, gold) in enumerate(zip(inputs, golds, strict=True), start=1):
        cells = pair.split("\t")
        if len(cells) != 2:
            input_problems.add(
                line, f"expected 2 tab-separated sentences, got {len(cells)} column(s)"
            )
            continue
        if not _check_sentences(cells[0], cells[1], line, input_problems):
            continue
        if not gold.strip():
            continue  # unscored pair
        score = _parse_score(gold.strip(), line, gs_problems)
        if score is not None:
            text1.append(cells[0])
            text2.append(cells[1])
            scores.append(score)
    input_problems.raise_if_any()
    gs_problems.raise_if_any()
    return text1, text2, scores


def _load_senteval_year(folder: Path) -> StsPairs:
    """Concatenate all subsets of an ``STS1x-en-test`` folder."""
    gs_files = sorted(folder.glob("STS.gs.*.txt"))
    text1: list[str] = []
    text2: list[str] = []
    scores: list[float] = []
    used = []
    for gs_path in gs_files:
        subset = gs_path.name[len("STS.gs.") : -len(".txt")]
        input_path = folder / f"STS.input.{subset}.txt"
        if subset.upper() == "ALL":
            logger.debug("%s: ignoring pooled gold file %s", folder, gs_path.name)
            continue
        if not input_path.is_file():
            logger.warning(
                "%s: skipping subset %r: %s has no %s",
                folder,
                subset,
                gs_path.name,
                input_path.name,
            )
            continue
        t1, t2, s = _read_senteval_subset(input_path, gs_path)
        text1 += t1
        text2 += t2
        scores += s
        used.append(subset)
    if not used:
        raise DataError(
            str(folder),
            [f"{folder}: no STS.gs.<subset>.txt with a matching STS.input.<subset>.txt found"],
            1,
        )
    if not scores:
        raise DataError(str(folder), [f"{folder}: no scored pairs in subsets {used}"], 1)
    logger.debug("%s: subsets %s", folder, ", ".join(used))
    return StsPairs(text1=text1, text2=text2, scores=np.array(scores, dtype=np.float64))


def _load_senteval_stsb(path: Path) -> StsPairs:
    """Read ``sts-test.csv``: genre, file, year, id, score, sentence1, sentence2[, extra...]."""
    problems = _Problems(path)
    text1: list[str] = []
    text2: list[str] = []
    scores: list[float] = []
    for line, row in enumerate(_read_lines(path), start=1):
        # A plain split is csv.reader(delimiter="\t", quoting=csv.QUOTE_NONE): quotes are text.
        cells = row.split("\t")
        if len(cells) < 7:
            problems.add(line, f"expected at least 7 tab-separated columns, got {len(cells)}")
            continue
        score = _parse_score(cells[4].strip(), line, problems)
        if _check_sentences(cells[5], cells[6], line, problems) and score is not None:
            text1.append(cells[5])
            text2.append(cells[6])
            scores.append(score)
    if not problems.total and not scores:
        problems.add(1, "no pairs")
    problems.raise_if_any()
    return StsPairs(text1=text1, text2=text2, scores=np.array(scores, dtype=np.float64))


def _load_senteval_sick(path: Path) -> StsPairs:
    """Read ``SICK_test_annotated.txt``, locating columns by its header."""
    problems = _Problems(path)
    lines = _read_lines(path)
    header = lines[0].split("\t") if lines else []
    absent = [c for c in _SICK_COLUMNS if c not in header]
    if absent:
        problems.add(1, f"header lacks column(s) {absent}; expected {'/'.join(_SICK_COLUMNS)}")
        problems.raise_if_any()
    i1, i2, iy = (header.index(c) for c in _SICK_COLUMNS)
    text1: list[str] = []
    text2: list[str] = []
    scores: list[float] = []
    for line, row in enumerate(lines[1:], start=2):
        cells = row.split("\t")
        if len(cells) != len(header):
            problems.add(line, f"expected {len(header)} tab-separated columns, got {len(cells)}")
            continue
        score = _parse_score(cells[iy].strip(), line, problems)
        if _check_sentences(cells[i1], cells[i2], line, problems) and score is not None:
            text1.append(cells[i1])
            text2.append(cells[i2])
            scores.append(score)
    if not problems.total and not scores:
        problems.add(2, "no pairs after the header")
    problems.raise_if_any()
    return StsPairs(text1=text1, text2=text2, scores=np.array(scores, dtype=np.float64))


# --- loading ---------------------------------------------------------------------------------


def load_task(data_dir: str | os.PathLike[str], task: Task | str) -> StsPairs | None:
    """Read one task's test pairs from a folder in either layout (see the module docstring).

    Args:
        data_dir: the folder holding the tasks.
        task: the task, as a :class:`Task` or its value (``"STS-B"``).

    Returns:
        The pairs, or ``None`` when the folder holds no files for the task.

    Raises:
        NotADirectoryError: ``data_dir`` is not a folder.
        ValueError: unknown task, or the task's files are malformed (a
            :class:`~anglekit.data.DataError` naming file and line).
    """
    task = _as_task(task)
    root = Path(data_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"evaluation data folder not found: {root}")
    jsonl = root / _JSONL_DIRS[task] / "test.jsonl"
    if jsonl.is_file():
        pairs, source = load_sts(jsonl), jsonl
    elif task in _SENTEVAL_YEAR_DIRS and (root / "STS" / _SENTEVAL_YEAR_DIRS[task]).is_dir():
        source = root / "STS" / _SENTEVAL_YEAR_DIRS[task]
        pairs = _load_senteval_year(source)
    elif task is Task.STSB and (root / _STSB_TEST).is_file():
        source = root / _STSB_TEST
        pairs = _load_senteval_stsb(source)
    elif task is Task.SICKR and (root / _SICK_TEST).is_file():
        source = root / _SICK_TEST
        pairs = _load_senteval_sick(source)
    else:
        return None
    logger.debug("%s: %d pairs from %s", task.value, len(pairs.scores), source)
    return pairs


BUNDLED_TASKS = {"stsb:test": Task.STSB}  # test sets shipped with the package


def load_tasks(
    source: str | os.PathLike[str], tasks: Iterable[Task | str] | None = None
) -> dict[str, StsPairs | None]:
    """Read the evaluation sets of a folder (suite) or a single STS-format file.

    Args:
        source: a folder in either layout of the module docstring, one ``.jsonl``/``.csv``/
            ``.tsv`` file with ``text1``, ``text2``, ``label``, or the bundled ``stsb:test``.
        tasks: with a folder, the tasks to read (default: all seven); not allowed with a file.

    Returns:
        For a folder, ``{task value: pairs or None}`` for the requested tasks in paper order;
        for a file, ``{file stem: pairs}``.

    Raises:
        FileNotFoundError: ``source`` does not exist, or a folder holds none of the tasks.
        ValueError: ``tasks`` given with a file, an unknown task, or malformed data.
    """
    if str(source) in BUNDLED_TASKS:
        return {BUNDLED_TASKS[str(source)].value: load_sts(str(source))}
    path = Path(source)
    if path.is_file():
        if tasks is not None:
            raise ValueError(f"tasks can only be chosen for a folder; {path} is a single file")
        return {path.stem: load_sts(path)}
    if not path.is_dir():
        raise FileNotFoundError(f"evaluation data not found: {path} (expected a folder or a file)")
    wanted = set(Task) if tasks is None else {_as_task(t) for t in tasks}
    found = {t.value: load_task(path, t) for t in Task if t in wanted}
    if all(pairs is None for pairs in found.values()):
        expected = ", ".join(f"{_JSONL_DIRS[t]}/test.jsonl" for t in Task if t in wanted)
        raise FileNotFoundError(
            f"no evaluation data in {path} for {', '.join(found)}: expected {expected}, or the "
            "SentEval layout (STS/STS12-en-test/..., STS/STSBenchmark/sts-test.csv, "
            "SICK/SICK_test_annotated.txt)"
        )
    return found


# --- running and reporting -------------------------------------------------------------------


def run_suite(
    encode: Encoder,
    datasets: Mapping[str, StsPairs | None],
    *,
    keep_cosines: bool = False,
    show_progress: bool | None = None,
) -> SuiteResult:
    """Evaluate ``encode`` on each set; ``None`` sets are kept as missing.

    Args:
        encode: maps a list of texts to an ``(N, D)`` array.
        datasets: name -> pairs (or ``None``), as returned by :func:`load_tasks`.
        keep_cosines: also return each task's per-pair cosines (``SuiteResult.cosines``).
        show_progress: a progress bar over the tasks; by default only on a terminal.

    Returns:
        The :class:`SuiteResult`, keyed like ``datasets``.
    """
    scores: dict[str, Correlation | None] = {}
    cosines: dict[str, np.ndarray] = {}
    items: Iterable[tuple[str, StsPairs | None]] = list(datasets.items())
    show = sys.stderr.isatty() if show_progress is None else show_progress
    if show and len(datasets) > 1:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="eval", unit="task")
    for key, pairs in items:
        name = key.value if isinstance(key, Task) else str(key)
        if pairs is None:
            logger.info("%-6s  missing (no data)", name)
            scores[name] = None
            continue
        cos = pair_cosines(encode, pairs)
        result = sts_correlations(cos, pairs.scores)
        if keep_cosines:
            cosines[name] = cos
        logger.info(
            "%-6s  spearman %6.2f  pearson %6.2f  (n=%d)",
            name,
            result.spearman,
            result.pearson,
            result.n,
        )
        scores[name] = result
    return SuiteResult(scores=scores, cosines=cosines if keep_cosines else None)


def evaluate(
    encode: Encoder,
    source: str | os.PathLike[str],
    tasks: Iterable[Task | str] | None = None,
) -> SuiteResult:
    """Evaluate ``encode`` on a folder of tasks or on a single STS-format file.

    Example:
        >>> result = evaluate(model.encode, "data/")  # doctest: +SKIP
        >>> print(format_table([("my-model", result)]))  # doctest: +SKIP

    Args:
        encode: maps a list of texts to an ``(N, D)`` array.
        source: a folder (see the module docstring) or one ``.jsonl``/``.csv``/``.tsv`` file.
        tasks: with a folder, the tasks to run (default: all seven).

    Returns:
        The :class:`SuiteResult`.
    """
    return run_suite(encode, load_tasks(source, tasks))


def _columns(rows: Sequence[tuple[str, SuiteResult]]) -> list[str]:
    """Task columns in paper order, then any other names (file stems) in first-seen order."""
    names = dict.fromkeys(name for _, result in rows for name in result.scores)
    order = {t.value: i for i, t in enumerate(Task)}
    return sorted(names, key=lambda n: order.get(n, len(order)))  # stable for the others


def format_table(rows: Sequence[tuple[str, SuiteResult]]) -> str:
    """Render results like the AnglE paper's table: Spearman x100 per task, then the average.

    Columns are the tasks that occur in any row (all seven for a folder, the file stem for a
    single file) plus ``Avg``; a task without data shows ``–``. When any is missing a footer
    names them, since ``Avg`` then averages the present tasks only.

    Args:
        rows: ``(model name, result)`` pairs, one table row each.

    Returns:
        The table as text, without a trailing newline.

    Raises:
        ValueError: ``rows`` is empty.
    """
    if not rows:
        raise ValueError("format_table needs at least one (model, result) row")
    columns = _columns(rows)
    header = ["Model", *columns, "Avg"]
    body = []
    for model, result in rows:
        cells = []
        for name in columns:
            c = result.scores.get(name)
            cells.append(MISSING if c is None else f"{c.spearman:.2f}")
        avg = result.avg
        body.append([model, *cells, MISSING if avg is None else f"{avg:.2f}"])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(max(w, 6)) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    lines = [render(header)]
    lines.append("-" * len(lines[0]))
    lines += [render(r) for r in body]
    missing = [n for n in columns if any(res.scores.get(n) is None for _, res in rows)]
    if missing:
        lines.append(
            f"{MISSING} no data: {', '.join(missing)} (Avg is over the present tasks only)"
        )
    return "\n".join(lines)


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def results_to_json(rows: Sequence[tuple[str, SuiteResult]]) -> dict:
    """A JSON-ready summary of results; NaN correlations become ``null``.

    Returns:
        ``{"metric": "spearman_x100", "rows": [{"model", "scores", "pearson", "n", "missing",
        "avg"}]}``: ``scores``/``pearson``/``n`` map each present task to its Spearman x100,
        Pearson x100 and pair count; ``missing`` lists the tasks without data; ``avg`` is the
        mean Spearman over the present tasks (``null`` if none).
    """
    out = []
    for model, result in rows:
        present = result.present
        out.append(
            {
                "model": model,
                "scores": {k: _finite_or_none(c.spearman) for k, c in present.items()},
                "pearson": {k: _finite_or_none(c.pearson) for k, c in present.items()},
                "n": {k: c.n for k, c in present.items()},
                "missing": result.missing,
                "avg": _finite_or_none(result.avg),
            }
        )
    return {"metric": "spearman_x100", "rows": out}
