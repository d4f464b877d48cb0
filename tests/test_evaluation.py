"""Tests for anglekit.evaluation: STS loading (both layouts), correlations, suite and reports."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from anglekit.data import StsPairs
from anglekit.evaluation import (
    Correlation,
    SuiteResult,
    Task,
    evaluate,
    evaluate_pairs,
    format_table,
    load_task,
    load_tasks,
    results_to_json,
    run_suite,
    sts_correlations,
)

# --- a deterministic encoder and an independent reference --------------------------------------


def bag_of_chars(texts: list[str]) -> np.ndarray:
    """Unnormalised character counts, bucketed by code point modulo 64: (N, 64)."""
    out = np.zeros((len(texts), 64))
    for i, text in enumerate(texts):
        for ch in text.lower():
            out[i, ord(ch) % 64] += 1
    return out


def reference(pairs: list[tuple[str, str, float]]) -> tuple[float, float]:
    """Spearman and Pearson x100 computed pair by pair with a Python loop."""
    cos = []
    for s1, s2, _ in pairs:
        a, b = bag_of_chars([s1])[0], bag_of_chars([s2])[0]
        cos.append(float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    gold = [score for _, _, score in pairs]
    return stats.spearmanr(cos, gold)[0] * 100, stats.pearsonr(cos, gold)[0] * 100


# --- fixture content, written in both layouts ---------------------------------------------------

WORDS = [
    *("a", "man", "woman", "dog", "cat", "is", "are", "playing", "eating", "running"),
    *("guitar", "piano", "ball", "in", "on", "the", "park", "kitchen", "street", "red"),
    *("small", "quickly", "two", "children", "bike", "river"),
]


def make_pairs(seed: int, n: int, lo: float = 0.0, hi: float = 5.0) -> list[tuple]:
    """``n`` (sentence1, sentence2, score) triples from a seeded generator."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s1 = " ".join(rng.choice(WORDS, size=rng.integers(3, 8)))
        s2 = " ".join(rng.choice(WORDS, size=rng.integers(3, 8)))
        out.append((s1.capitalize() + ".", s2.capitalize() + ".", round(rng.uniform(lo, hi), 2)))
    return out


# task -> subset -> [(s1, s2, score or None)]; None is an unscored pair (blank gold line).
CONTENT: dict[Task, dict[str, list[tuple]]] = {
    # Two subsets on different scales: the pooled correlation differs from the mean of both.
    Task.STS12: {"MSRpar": make_pairs(1, 12, 0.0, 2.0), "MSRvid": make_pairs(2, 10, 3.0, 5.0)},
    Task.STS13: {"FNWN": make_pairs(3, 9), "headlines": make_pairs(4, 8)},
    Task.STS14: {"images": make_pairs(5, 11)},
    Task.STS15: {"belief": make_pairs(6, 7), "images": make_pairs(7, 9)},
    Task.STS16: {
        "answer-answer": [*make_pairs(8, 5), ("Unscored first.", "Unscored second.", None)],
        "headlines": make_pairs(9, 6),
    },
    Task.STSB: {"test": [*make_pairs(10, 12), ('He said "hi there.', "A 'quoted' reply.", 2.4)]},
    Task.SICKR: {"test": make_pairs(11, 13, 1.0, 5.0)},
}


def scored(task: Task) -> list[tuple[str, str, float]]:
    """All scored pairs of a task, subsets concatenated in file-name order."""
    subsets = CONTENT[task]
    return [p for name in sorted(subsets) for p in subsets[name] if p[2] is not None]


def write_senteval(root: Path, tasks=tuple(Task)) -> Path:
    """Write ``tasks`` in the SentEval download layout under ``root``."""
    years = {Task.STS12: "12", Task.STS13: "13", Task.STS14: "14", Task.STS15: "15"}
    years[Task.STS16] = "16"
    for task in tasks:
        if task in years:
            folder = root / "STS" / f"STS{years[task]}-en-test"
            folder.mkdir(parents=True)
            for subset, pairs in CONTENT[task].items():
                (folder / f"STS.input.{subset}.txt").write_text(
                    "".join(f"{s1}\t{s2}\n" for s1, s2, _ in pairs), encoding="utf-8"
                )
                (folder / f"STS.gs.{subset}.txt").write_text(
                    "".join("\n" if y is None else f"{y}\n" for _, _, y in pairs), encoding="utf-8"
                )
            if task is Task.STS12:  # the real release ships a pooled gold file without input
                (folder / "STS.gs.ALL.txt").write_text("1.0\n" * 22, encoding="utf-8")
            if task is Task.STS13:  # the licensed SMT subset: gold file only
                (folder / "STS.gs.SMT.txt").write_text("2.0\n3.0\n", encoding="utf-8")
        elif task is Task.STSB:
            folder = root / "STS" / "STSBenchmark"
            folder.mkdir(parents=True)
            lines = []
            for i, (s1, s2, y) in enumerate(CONTENT[task]["test"]):
                extra = "\tsource-a\tsource-b" if i % 3 == 0 else ""  # extra trailing columns
                lines.append(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{y}\t{s1}\t{s2}{extra}\n")
            (folder / "sts-test.csv").write_text("".join(lines), encoding="utf-8")
        elif task is Task.SICKR:
            folder = root / "SICK"
            folder.mkdir(parents=True)
            lines = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"]
            for i, (s1, s2, y) in enumerate(CONTENT[task]["test"]):
                lines.append(f"{i + 1}\t{s1}\t{s2}\t{y}\tNEUTRAL\n")
            (folder / "SICK_test_annotated.txt").write_text("".join(lines), encoding="utf-8")
    return root


JSONL_DIRS = {
    Task.STS12: "sts12",
    Task.STS13: "sts13",
    Task.STS14: "sts14",
    Task.STS15: "sts15",
    Task.STS16: "sts16",
    Task.STSB: "stsb",
    Task.SICKR: "sickr",
}


def write_jsonl(root: Path, tasks=tuple(Task)) -> Path:
    """Write ``tasks`` in the JSON Lines layout under ``root`` (STS12-16 with a subset field)."""
    for task in tasks:
        folder = root / JSONL_DIRS[task]
        folder.mkdir(parents=True)
        rows = []
        for subset in sorted(CONTENT[task]):
            for s1, s2, y in CONTENT[task][subset]:
                if y is not None:
                    row = {"text1": s1, "text2": s2, "label": y}
                    if task.value.startswith("STS1"):
                        row["subset"] = subset
                    rows.append(json.dumps(row) + "\n")
        (folder / "test.jsonl").write_text("".join(rows), encoding="utf-8")
    return root


# --- correlations and encoding ------------------------------------------------------------------


def test_task_values_are_paper_columns_in_order():
    """Task values are the display names in the AnglE paper's column order."""
    assert [t.value for t in Task] == [
        "STS12",
        "STS13",
        "STS14",
        "STS15",
        "STS16",
        "STS-B",
        "SICK-R",
    ]


def test_sts_correlations_match_scipy():
    """Spearman and Pearson are scipy's values x100, with n the number of pairs."""
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 50)
    pred = gold + rng.normal(0, 2, 50)
    c = sts_correlations(pred, gold)
    assert c.spearman == pytest.approx(stats.spearmanr(pred, gold)[0] * 100)
    assert c.pearson == pytest.approx(stats.pearsonr(pred, gold)[0] * 100)
    assert c.n == 50
    assert c.spearman != pytest.approx(c.pearson)  # the two are not mixed up


@pytest.mark.parametrize(
    ("pred", "gold", "match"),
    [([0.1, 0.2, 0.3], [1.0, 2.0], "equal length"), ([0.5], [1.0], "at least 2"),
     ([0.1, np.nan, 0.3], [1.0, 2.0, 3.0], "non-finite")],
)  # fmt: skip
def test_sts_correlations_reject_bad_input(pred, gold, match):
    """Mismatched lengths, a single pair and NaN predictions raise ValueError."""
    with pytest.raises(ValueError, match=match):
        sts_correlations(pred, gold)


def test_sts_correlations_constant_predictions_give_nan(caplog):
    """Constant predictions give NaN correlations and a logged warning, not a crash."""
    with caplog.at_level(logging.WARNING, logger="anglekit.evaluation"):
        c = sts_correlations([0.5, 0.5, 0.5], [1.0, 2.0, 3.0])
    assert np.isnan(c.spearman) and np.isnan(c.pearson) and c.n == 3
    assert "undefined" in caplog.text


def test_evaluate_pairs_encodes_each_unique_text_once():
    """evaluate_pairs calls encode once with each distinct text of both columns exactly once."""
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(list(texts))
        return bag_of_chars(texts)

    pairs = StsPairs(
        text1=["a cat", "a dog", "a cat", "two birds"],
        text2=["a dog", "the cat", "a bird", "a cat"],
        scores=np.array([1.0, 2.0, 0.5, 4.0]),
    )
    result = evaluate_pairs(encode, pairs)
    assert len(calls) == 1
    assert sorted(calls[0]) == sorted({*pairs.text1, *pairs.text2})
    expected = reference(list(zip(pairs.text1, pairs.text2, pairs.scores, strict=True)))
    assert result.spearman == pytest.approx(expected[0])
    assert result.pearson == pytest.approx(expected[1])


def test_evaluate_pairs_normalises_embeddings():
    """Rescaling each embedding (an unnormalised encoder) does not change the scores."""
    pairs_list = make_pairs(42, 20)
    pairs = StsPairs(
        text1=[p[0] for p in pairs_list],
        text2=[p[1] for p in pairs_list],
        scores=np.array([p[2] for p in pairs_list]),
    )
    rng = np.random.default_rng(1)

    def scaled(texts: list[str]) -> np.ndarray:
        return bag_of_chars(texts) * rng.uniform(0.01, 100, size=(len(texts), 1))

    plain, rescaled = evaluate_pairs(bag_of_chars, pairs), evaluate_pairs(scaled, pairs)
    assert rescaled.spearman == pytest.approx(plain.spearman)
    assert rescaled.pearson == pytest.approx(plain.pearson)
    assert plain.pearson == pytest.approx(reference(pairs_list)[1])


def test_evaluate_pairs_rejects_wrong_embedding_shape():
    """An encoder returning one row too few raises ValueError naming the shape."""
    pairs = StsPairs(["a", "b"], ["c", "d"], np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(3, 64\) for 4 texts"):
        evaluate_pairs(lambda texts: bag_of_chars(texts)[:-1], pairs)


# --- loading the SentEval layout ----------------------------------------------------------------


def test_senteval_layout_scores_match_reference(tmp_path):
    """Every task read from the SentEval layout scores as the pair-by-pair reference does."""
    result = evaluate(bag_of_chars, write_senteval(tmp_path))
    assert list(result.scores) == [t.value for t in Task]
    assert result.missing == []
    for task in Task:
        spearman, pearson = reference(scored(task))
        c = result.scores[task]
        assert c.n == len(scored(task)), task
        assert c.spearman == pytest.approx(spearman), task
        assert c.pearson == pytest.approx(pearson), task


def test_sts16_blank_gold_line_drops_the_pair(tmp_path):
    """A blank line in an STS16 gold file drops that pair; the pairs after it stay aligned."""
    pairs = load_task(write_senteval(tmp_path, [Task.STS16]), Task.STS16)
    assert "Unscored first." not in pairs.text1
    assert len(pairs.text1) == 11  # 5 + 1 unscored + 6 in the files
    expected = scored(Task.STS16)
    assert pairs.text1 == [p[0] for p in expected]
    assert pairs.text2 == [p[1] for p in expected]
    np.testing.assert_array_equal(pairs.scores, [p[2] for p in expected])


def test_sts12_pooled_gold_and_sts13_unpaired_gold_are_skipped(tmp_path, caplog):
    """STS12's STS.gs.ALL.txt and STS13's input-less SMT gold file add no pairs."""
    root = write_senteval(tmp_path, [Task.STS12, Task.STS13])
    with caplog.at_level(logging.WARNING, logger="anglekit.evaluation"):
        assert len(load_task(root, Task.STS12).scores) == 22
        assert len(load_task(root, Task.STS13).scores) == 17
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "STS.gs.SMT.txt" in warnings[0]  # ALL is expected: no warning


def test_stsb_csv_keeps_quotes_and_ignores_extra_columns(tmp_path):
    """sts-test.csv: quotes are literal text, trailing extra columns are ignored."""
    pairs = load_task(write_senteval(tmp_path, [Task.STSB]), "STS-B")
    assert pairs.text1[-1] == 'He said "hi there.'
    assert pairs.text2[-1] == "A 'quoted' reply."
    assert pairs.text2[0] == CONTENT[Task.STSB]["test"][0][1]  # a row with extra columns
    np.testing.assert_array_equal(pairs.scores, [p[2] for p in CONTENT[Task.STSB]["test"]])


def test_sick_columns_found_by_header(tmp_path):
    """SICK_test_annotated.txt is read by its header, skipping it, with relatedness as gold."""
    root = tmp_path / "SICK"
    root.mkdir()
    (root / "SICK_test_annotated.txt").write_text(
        "relatedness_score\tpair_ID\tentailment_judgment\tsentence_B\tsentence_A\n"
        "4.5\t1\tENTAILMENT\tA dog runs.\tA dog is running.\n"
        "1.2\t2\tNEUTRAL\tA cat sleeps.\tA man cooks.\n",
        encoding="utf-8",
    )
    pairs = load_task(tmp_path, Task.SICKR)
    assert pairs.text1 == ["A dog is running.", "A man cooks."]
    assert pairs.text2 == ["A dog runs.", "A cat sleeps."]
    np.testing.assert_array_equal(pairs.scores, [4.5, 1.2])


def test_sts12_is_one_correlation_over_all_subsets(tmp_path):
    """STS12 equals the correlation over the concatenated subsets, not their mean."""
    c = evaluate(bag_of_chars, write_senteval(tmp_path, [Task.STS12]), tasks=[Task.STS12])
    pooled = reference(scored(Task.STS12))[0]
    per_subset = [reference(p)[0] for p in CONTENT[Task.STS12].values()]
    assert c.scores["STS12"].spearman == pytest.approx(pooled)
    assert abs(pooled - np.mean(per_subset)) > 1.0  # the fixture tells the two settings apart


def test_both_layouts_give_the_same_scores(tmp_path):
    """The JSON Lines and SentEval layouts of the same content give identical results."""
    senteval = evaluate(bag_of_chars, write_senteval(tmp_path / "senteval"))
    jsonl = evaluate(bag_of_chars, write_jsonl(tmp_path / "jsonl"))
    assert jsonl.missing == [] and senteval.missing == []
    for task in Task:
        assert jsonl.scores[task] == pytest.approx(senteval.scores[task]), task


def test_jsonl_layout_preferred_when_both_exist(tmp_path):
    """With both layouts present for a task, the JSON Lines file is read."""
    write_senteval(tmp_path, [Task.STSB])
    folder = tmp_path / "stsb"
    folder.mkdir()
    (folder / "test.jsonl").write_text(
        '{"text1": "one", "text2": "two", "label": 1}\n'
        '{"text1": "three", "text2": "four", "label": 2}\n',
        encoding="utf-8",
    )
    assert load_task(tmp_path, Task.STSB).text1 == ["one", "three"]


def _replace_line(path: Path, line: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[line - 1] = text
    path.write_text("\n".join(lines), encoding="utf-8")


def _drop_last_line(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:-1]), encoding="utf-8")


STS12_DIR = Path("STS", "STS12-en-test")
MALFORMED = {
    "input with 3 columns": (
        Task.STS12,
        lambda r: _replace_line(r / STS12_DIR / "STS.input.MSRpar.txt", 2, "a\tb\tc"),
        "STS.input.MSRpar.txt:2:",
    ),
    "input with 1 column": (
        Task.STS12,
        lambda r: _replace_line(r / STS12_DIR / "STS.input.MSRvid.txt", 4, "only one"),
        "STS.input.MSRvid.txt:4:",
    ),
    "non-numeric gold": (
        Task.STS12,
        lambda r: _replace_line(r / STS12_DIR / "STS.gs.MSRpar.txt", 3, "high"),
        "STS.gs.MSRpar.txt:3:",
    ),
    "gold file one line short": (
        Task.STS12,
        lambda r: _drop_last_line(r / STS12_DIR / "STS.gs.MSRpar.txt"),
        "STS.input.MSRpar.txt:12:",
    ),
    "invalid UTF-8": (
        Task.STS12,
        lambda r: (r / STS12_DIR / "STS.input.MSRpar.txt").write_bytes(b"a\tb\nc\xff\td\n" * 6),
        "STS.input.MSRpar.txt:2:",
    ),
    "sts-test.csv short row": (
        Task.STSB,
        lambda r: _replace_line(r / "STS" / "STSBenchmark" / "sts-test.csv", 5, "x\ty\tz"),
        "sts-test.csv:5:",
    ),
    "sts-test.csv non-numeric score": (
        Task.STSB,
        lambda r: _replace_line(
            r / "STS" / "STSBenchmark" / "sts-test.csv", 1, "g\tf\ty\t1\tfive\ts one\ts two"
        ),
        "sts-test.csv:1:",
    ),
    "SICK bad relatedness": (
        Task.SICKR,
        lambda r: _replace_line(r / "SICK" / "SICK_test_annotated.txt", 3, "2\tA\tB\t?\tNEUTRAL"),
        "SICK_test_annotated.txt:3:",
    ),
    "SICK header without relatedness": (
        Task.SICKR,
        lambda r: _replace_line(
            r / "SICK" / "SICK_test_annotated.txt", 1, "pair_ID\tsentence_A\tsentence_B\ta\tb"
        ),
        "SICK_test_annotated.txt:1:",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_senteval_files_name_file_and_line(tmp_path, case):
    """Each malformed SentEval file raises ValueError naming the file and the bad line."""
    task, corrupt, where = MALFORMED[case]
    write_senteval(tmp_path, [task])
    corrupt(tmp_path)
    with pytest.raises(ValueError) as err:
        load_task(tmp_path, task)
    assert where in str(err.value)


def test_year_folder_without_gold_files_raises(tmp_path):
    """An STS year folder with no usable STS.gs/STS.input pair is an error, not 'missing'."""
    folder = tmp_path / "STS" / "STS16-en-test"
    folder.mkdir(parents=True)
    (folder / "STS2016.gs.headlines.txt").write_text("1.0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="STS16-en-test"):
        load_task(tmp_path, Task.STS16)


# --- suites, single files and reports -----------------------------------------------------------


def test_missing_tasks_are_reported_not_dropped(tmp_path):
    """Absent tasks stay in the result as missing; Avg is the mean over the present ones."""
    result = evaluate(bag_of_chars, write_senteval(tmp_path, [Task.STSB, Task.SICKR]))
    assert list(result.scores) == [t.value for t in Task]
    assert result.missing == ["STS12", "STS13", "STS14", "STS15", "STS16"]
    assert list(result.present) == ["STS-B", "SICK-R"]
    expected = np.mean([reference(scored(Task.STSB))[0], reference(scored(Task.SICKR))[0]])
    assert result.avg == pytest.approx(expected)


def test_run_suite_logs_one_line_per_task(caplog):
    """run_suite logs one line per task, present or missing."""
    pairs = StsPairs(["a cat", "a dog"], ["the cat", "a bird"], np.array([4.0, 1.0]))
    with caplog.at_level(logging.INFO, logger="anglekit.evaluation"):
        run_suite(bag_of_chars, {"STS-B": pairs, "STS12": None})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("STS-B") and "n=2" in lines[0]
    assert lines[1].startswith("STS12") and "missing" in lines[1]


def test_format_table_marks_missing_and_averages_present(tmp_path):
    """Missing tasks show '–', Avg averages the present ones and a footer names the missing."""
    result = evaluate(bag_of_chars, write_senteval(tmp_path, [Task.STSB, Task.SICKR]))
    table = format_table([("bag-of-chars", result)])
    header, rule, row, footer = table.split("\n")
    assert header.split() == ["Model", *[t.value for t in Task], "Avg"]
    assert set(rule) == {"-"}
    cells = row.split()
    assert cells[0] == "bag-of-chars"
    assert cells[1:6] == ["–"] * 5
    assert cells[6] == f"{result.scores['STS-B'].spearman:.2f}"
    assert cells[7] == f"{result.scores['SICK-R'].spearman:.2f}"
    assert cells[8] == f"{result.avg:.2f}"
    assert "STS12, STS13, STS14, STS15, STS16" in footer
    assert "STS-B" not in footer
    assert len({len(header), len(row)}) == 1  # columns are aligned


def test_format_table_single_file_shows_only_its_column(tmp_path):
    """A single-file result shows its one column (the file stem) and Avg, with no footer."""
    path = write_jsonl(tmp_path, [Task.STSB]) / "stsb" / "test.jsonl"
    result = evaluate(bag_of_chars, path)
    table = format_table([("m", result)])
    lines = table.split("\n")
    assert lines[0].split() == ["Model", "test", "Avg"]
    assert len(lines) == 3
    assert lines[2].split()[1] == f"{reference(scored(Task.STSB))[0]:.2f}"


def test_format_table_rows_with_different_tasks():
    """A task absent from one row shows '–' there; the Avg of each row uses its own tasks."""
    a = SuiteResult({"STS-B": Correlation(80.0, 79.0, 10), "SICK-R": Correlation(70.0, 71.0, 10)})
    b = SuiteResult({"STS12": Correlation(60.0, 61.0, 10), "STS-B": Correlation(90.0, 88.0, 10)})
    lines = format_table([("a", a), ("b", b)]).split("\n")
    assert lines[0].split() == ["Model", "STS12", "STS-B", "SICK-R", "Avg"]
    assert lines[2].split() == ["a", "–", "80.00", "70.00", "75.00"]
    assert lines[3].split() == ["b", "60.00", "90.00", "–", "75.00"]
    assert "STS12, SICK-R" in lines[4]


def test_format_table_rejects_no_rows():
    """An empty row list raises ValueError."""
    with pytest.raises(ValueError, match="at least one"):
        format_table([])


def test_results_to_json_shape(tmp_path):
    """results_to_json gives metric, per-model scores/pearson/n/missing/avg, and dumps as JSON."""
    result = evaluate(bag_of_chars, write_senteval(tmp_path, [Task.STSB]))
    empty = SuiteResult({"STS12": None})
    out = json.loads(json.dumps(results_to_json([("m1", result), ("m2", empty)])))
    assert out["metric"] == "spearman_x100"
    first, second = out["rows"]
    assert first["model"] == "m1"
    assert first["scores"] == {"STS-B": pytest.approx(result.scores["STS-B"].spearman)}
    assert first["pearson"] == {"STS-B": pytest.approx(result.scores["STS-B"].pearson)}
    assert first["n"] == {"STS-B": 13}
    assert first["missing"] == ["STS12", "STS13", "STS14", "STS15", "STS16", "SICK-R"]
    assert first["avg"] == pytest.approx(result.scores["STS-B"].spearman)
    assert second == {
        "model": "m2",
        "scores": {},
        "pearson": {},
        "n": {},
        "missing": ["STS12"],
        "avg": None,
    }


def test_results_to_json_nan_becomes_null():
    """NaN correlations (constant predictions) are written as null, keeping the JSON valid."""
    result = SuiteResult({"STS-B": Correlation(float("nan"), float("nan"), 3)})
    row = results_to_json([("m", result)])["rows"][0]
    assert row["scores"] == {"STS-B": None} and row["avg"] is None
    json.dumps(results_to_json([("m", result)]), allow_nan=False)


def test_load_tasks_single_file_keyed_by_stem(tmp_path):
    """A single STS file gives one entry keyed by its stem; choosing tasks for it raises."""
    path = write_jsonl(tmp_path, [Task.SICKR]) / "sickr" / "test.jsonl"
    loaded = load_tasks(path)
    assert list(loaded) == ["test"]
    assert loaded["test"].text1 == [p[0] for p in scored(Task.SICKR)]
    with pytest.raises(ValueError, match="single file"):
        load_tasks(path, tasks=[Task.SICKR])


def test_load_tasks_subset_in_paper_order(tmp_path):
    """Requested tasks come back in paper order, given as enum members or values."""
    root = write_jsonl(tmp_path, [Task.STSB, Task.STS13])
    assert list(load_tasks(root, ["SICK-R", Task.STS13, "STS-B"])) == ["STS13", "STS-B", "SICK-R"]


def test_load_tasks_unknown_task_lists_valid_ones(tmp_path):
    """An unknown task name raises ValueError listing the valid names."""
    with pytest.raises(ValueError, match="unknown task .*valid: STS12, .*SICK-R"):
        load_tasks(tmp_path, ["STS17"])


def test_load_tasks_folder_without_any_task_raises(tmp_path):
    """A folder holding none of the tasks, or a missing path, raises FileNotFoundError."""
    with pytest.raises(FileNotFoundError, match="stsb/test.jsonl"):
        load_tasks(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tasks(tmp_path / "nope")


def test_suite_result_avg_none_when_nothing_present():
    """SuiteResult.avg is None, not 0 or NaN, when no task has data."""
    result = SuiteResult({"STS12": None, "STS-B": None})
    assert result.avg is None
    assert result.missing == ["STS12", "STS-B"]
