"""Tests for anglekit.data: the three formats from JSONL/CSV/TSV/datasets, and validation errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from anglekit.data import (
    DataError,
    DataFormat,
    Example,
    load_sts,
    load_train_data,
    parse_column_map,
)

SCORED = [
    {"text1": "a man plays a flute", "text2": "a man plays music", "label": 4.2},
    {"text1": "the cat sleeps", "text2": "a dog runs", "label": 0.0},
    {"text1": "kids play soccer", "text2": "children play football", "label": 5},
]
QUERY_POSITIVE = [
    {"query": "what is a flute", "positive": "a flute is a woodwind instrument"},
    {"query": "capital of france", "positive": "paris is the capital of france"},
]
TRIPLETS = [
    {"query": "what is a flute", "positive": "a woodwind", "negative": "a drum"},
    {"query": "capital of france", "positive": "paris", "negative": "berlin"},
]
GOOD = json.dumps(SCORED[0])  # a valid scored-pairs line, so format detection succeeds


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    """Rows as JSON Lines; a str row is written verbatim (for malformed lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_table(path: Path, header: list[str], rows: list[list], delimiter: str) -> Path:
    """Rows as CSV (delimiter ',') or TSV (delimiter tab) with a header line."""
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_any(folder: Path, suffix: str, rows: list[dict]) -> Path:
    """The same rows as .jsonl, .csv or .tsv."""
    path = folder / f"data{suffix}"
    if suffix == ".jsonl":
        return write_jsonl(path, rows)
    header = list(rows[0])
    table = [[r[k] for k in header] for r in rows]
    return write_table(path, header, table, "\t" if suffix == ".tsv" else ",")


# --- the three formats from every local file type ------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
@pytest.mark.parametrize(
    ("rows", "fmt"),
    [
        (SCORED, DataFormat.SCORED_PAIRS),
        (QUERY_POSITIVE, DataFormat.QUERY_POSITIVE),
        (TRIPLETS, DataFormat.TRIPLETS),
    ],
)
def test_load_formats_from_every_file_type(tmp_path, suffix, rows, fmt):
    """Each format loads from JSONL, CSV and TSV with its texts in order and float labels."""
    data = load_train_data(write_any(tmp_path, suffix, rows))
    assert data.format is fmt
    assert len(data) == len(rows)
    for ex, row in zip(data.examples, rows, strict=True):
        assert ex.texts == tuple(row[name] for name in fmt.text_fields)
        if fmt.has_label:
            assert isinstance(ex.label, float) and ex.label == float(row["label"])
        else:
            assert ex.label is None


def test_detection_prefers_triplets_and_ignores_extra_columns(tmp_path):
    """query/positive/negative is triplets, not pairs; unrelated extra columns are ignored."""
    rows = [{**r, "id": i, "source": "x"} for i, r in enumerate(TRIPLETS)]
    data = load_train_data(write_jsonl(tmp_path / "t.jsonl", rows))
    assert data.format is DataFormat.TRIPLETS
    assert data.examples[1] == Example(("capital of france", "paris", "berlin"), None)


def test_tsv_keeps_commas_and_inner_quotes(tmp_path):
    """A TSV text may hold commas and quotes; a string label like '3.5' becomes a float."""
    path = tmp_path / "d.tsv"
    path.write_text('text1\ttext2\tlabel\na, b\tshe said "hi" twice\t3.5\n', encoding="utf-8")
    (ex,) = load_train_data(path).examples
    assert ex == Example(("a, b", 'she said "hi" twice'), 3.5)


def test_jsonl_skips_blank_lines_and_casts_int_labels(tmp_path):
    """Blank lines are skipped; an int label becomes a float; line numbers stay file lines."""
    path = tmp_path / "d.jsonl"
    path.write_text(f"{GOOD}\n\n   \n" + json.dumps({**SCORED[1], "label": 3}) + "\n")
    data = load_train_data(path)
    assert [ex.label for ex in data.examples] == [4.2, 3.0]
    path.write_text(f"{GOOD}\n\n" + json.dumps({**SCORED[1], "text1": ""}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:3: field 'text1' is empty"):
        load_train_data(path)


# --- column maps and lists of texts --------------------------------------------------------------


RENAMED = [{"sentence1": r["text1"], "sentence2": r["text2"], "score": r["label"]} for r in SCORED]


@pytest.mark.parametrize(
    "column_map",
    [
        {"sentence1": "text1", "sentence2": "text2", "score": "label"},
        "sentence1=text1, sentence2=text2,score=label",
    ],
)
def test_column_map_dict_and_string(tmp_path, column_map):
    """A column map (dict or 'a=b,c=d' string) renames source columns before detection."""
    data = load_train_data(write_jsonl(tmp_path / "d.jsonl", RENAMED), column_map=column_map)
    assert data.format is DataFormat.SCORED_PAIRS
    assert data.examples[0] == Example(("a man plays a flute", "a man plays music"), 4.2)


def test_parse_column_map_rejects_malformed_entries():
    """An entry without '=' or with an empty side raises, quoting the entry."""
    assert parse_column_map(None) == {}
    assert parse_column_map("a=b,,") == {"a": "b"}
    for bad in ("a=b,c", "=text1", "a="):
        with pytest.raises(ValueError, match="not of the form source=target"):
            parse_column_map(bad)


def test_list_of_texts_fields(tmp_path):
    """A text field holding a list becomes a tuple of alternatives."""
    rows = [
        {"query": "q1", "positive": ["p1", "p1 again"], "negative": "n1"},
        {"query": ["q2", "q2'"], "positive": "p2", "negative": ["n2"]},
    ]
    data = load_train_data(write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.examples[0].texts == ("q1", ("p1", "p1 again"), "n1")
    assert data.examples[1].texts == (("q2", "q2'"), "p2", ("n2",))


# --- validation: one bad row -------------------------------------------------------------------

DROP = object()


def pair(**changes) -> dict:
    """A valid scored pair with some fields changed (or removed with DROP)."""
    row = {"text1": "a", "text2": "b", "label": 1.0, **changes}
    return {k: v for k, v in row.items() if v is not DROP}


BAD_ROWS = [
    (pair(text2=DROP), "field 'text2' is missing"),
    (pair(text2=None), "field 'text2' is missing"),
    (pair(text1=5), "field 'text1' must be a string or a list of strings, got int"),
    (pair(text2="   "), "field 'text2' is empty"),
    (pair(text1=[]), "field 'text1' is an empty list"),
    (pair(text1=["x", 3]), "field 'text1' item 1 must be a string, got int"),
    (pair(text1=["x", ""]), "field 'text1' item 1 is empty"),
    (pair(label=DROP), "field 'label' is missing"),
    (pair(label=None), "field 'label' is missing"),
    (pair(label="high"), "field 'label' must be a number, got str 'high'"),
    (pair(label="4.5"), "field 'label' must be a number, got str '4.5'"),  # JSON: no coercion
    (pair(label=True), "field 'label' must be a number, got bool True"),
    (pair(label=[1]), "field 'label' must be a number, got list"),
    ('{"text1": "a", "text2": "b", "label": NaN}', "field 'label' must be finite, got nan"),
    ('{"text1": "a", "text2": "b", "label": Infinity}', "field 'label' must be finite, got inf"),
    ('{"text1": "a", "text2": "b", "label": ', "malformed JSON"),
    ('["a", "b", 1.0]', "expected a JSON object, got list"),
    ('"just a string"', "expected a JSON object, got str"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_jsonl_bad_row_names_file_line_and_field(tmp_path, row, message):
    """One bad JSONL row (line 2) gives one problem naming the file, the line and the field."""
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, row, GOOD])
    with pytest.raises(DataError) as info:
        load_train_data(path)
    err = info.value
    assert len(err.problems) == 1
    assert err.problems[0].startswith(f"{path}:2: {message}")
    assert str(err).startswith(f"1 problem(s) in {path}:")
    assert isinstance(err, ValueError)  # callers may catch it as a ValueError


BAD_CELLS = [
    (["a", "b", "high"], "field 'label' must be a number, got 'high'"),
    (["a", "b", "nan"], "field 'label' must be finite, got nan"),
    (["a", "b", ""], "field 'label' is missing"),
    (["a", "", "1"], "field 'text2' is empty"),
    (["a", "b"], "field 'label' is missing"),  # a short row
    (["a", "b", "1", "extra", "more"], "2 more cells than header columns"),
]


@pytest.mark.parametrize("delimiter", [",", "\t"])
@pytest.mark.parametrize(("cells", "message"), BAD_CELLS)
def test_table_bad_row_names_file_line_and_field(tmp_path, delimiter, cells, message):
    """One bad CSV/TSV row (line 3, after header and a good row) names file, line and field."""
    suffix = ".tsv" if delimiter == "\t" else ".csv"
    rows = [["x", "y", "2.5"], cells, ["z", "w", "0"]]
    path = write_table(tmp_path / f"bad{suffix}", ["text1", "text2", "label"], rows, delimiter)
    with pytest.raises(DataError) as info:
        load_train_data(path)
    assert info.value.problems == [f"{path}:3: {message}"]


# --- validation: many bad rows -------------------------------------------------------------------


def test_all_bad_rows_are_reported_at_once(tmp_path):
    """Every bad row (and every bad field of a row) is listed in one DataError, in file order."""
    rows = [
        GOOD,
        {"text1": "", "text2": "b", "label": 1},  # line 2
        GOOD,
        {"text1": "a", "text2": 7, "label": "x"},  # line 4: two problems
        "{oops",  # line 5
        GOOD,
        {"text1": "a", "text2": "b", "label": False},  # line 7
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_train_data(path)
    problems = info.value.problems
    assert len(problems) == 5
    assert [p.split(": ")[0] for p in problems] == [f"{path}:{n}" for n in (2, 4, 4, 5, 7)]
    assert "field 'text2'" in problems[1] and "field 'label'" in problems[2]
    assert str(info.value).startswith(f"5 problem(s) in {path}:")
    assert "more" not in str(info.value)


def test_max_errors_caps_listing_but_counts_all(tmp_path):
    """With 30 bad rows and max_errors=4 the error lists 4 and says '... and 26 more'."""
    rows = [GOOD] + [{"text1": "a", "text2": "", "label": 1}] * 30
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_train_data(path, max_errors=4)
    assert len(info.value.problems) == 4
    assert info.value.problems[-1].startswith(f"{path}:5: ")
    message = str(info.value)
    assert message.startswith("30 problem(s)")
    assert message.endswith("... and 26 more")


def test_missing_file_raises_file_not_found(tmp_path):
    """A missing local file raises FileNotFoundError naming it and the accepted sources."""
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=rf"data not found: {missing}.*\.jsonl/\.csv/\.tsv"):
        load_train_data(missing)
    with pytest.raises(FileNotFoundError, match="data not found"):
        load_train_data(str(tmp_path / "no_such_folder"))


def test_unsupported_suffix_raises(tmp_path):
    """An existing file of an unknown type is refused with the supported suffixes listed."""
    path = tmp_path / "d.txt"
    path.write_text("text1,text2,label\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'.*\.jsonl"):
        load_train_data(path)


def test_unknown_columns_suggest_column_map(tmp_path):
    """Columns matching no format give a DataError listing them and suggesting a column map."""
    path = write_jsonl(tmp_path / "d.jsonl", RENAMED)
    with pytest.raises(DataError) as info:
        load_train_data(path)
    message = str(info.value)
    assert f"{path}:1:" in message
    assert "['score', 'sentence1', 'sentence2']" in message
    assert "column map" in message and "sentence1=text1" in message


def test_empty_file_has_no_rows(tmp_path):
    """A file without any row is an error, not an empty training set."""
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        load_train_data(path)


# --- datasets folders and bundled data -----------------------------------------------------------


def test_datasets_folder_loads(tmp_path):
    """A folder written by Dataset.save_to_disk loads, with a column map, row numbers from 1."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(RENAMED).save_to_disk(str(folder))
    data = load_train_data(folder, column_map="sentence1=text1,sentence2=text2,score=label")
    assert data.format is DataFormat.SCORED_PAIRS
    assert [ex.label for ex in data.examples] == [4.2, 0.0, 5.0]
    bad = tmp_path / "bad"
    datasets.Dataset.from_list([SCORED[0], {**SCORED[1], "text2": ""}]).save_to_disk(str(bad))
    with pytest.raises(DataError, match=rf"{bad}:2: field 'text2' is empty"):
        load_train_data(bad)


def test_datasets_dict_split_selection(tmp_path):
    """A DatasetDict folder yields the requested split; an absent split lists those present."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(TRIPLETS),
            "validation": datasets.Dataset.from_list(QUERY_POSITIVE[:1]),
        }
    ).save_to_disk(str(folder))
    assert load_train_data(folder).format is DataFormat.TRIPLETS
    val = load_train_data(folder, split="validation")
    assert val.format is DataFormat.QUERY_POSITIVE and len(val) == 1
    with pytest.raises(ValueError, match=r"splits \['train', 'validation'\], not 'test'"):
        load_train_data(folder, split="test")


@pytest.mark.parametrize(
    ("name", "rows"), [("stsb:train", 5749), ("stsb:dev", 1500), ("stsb:test", 1379)]
)
def test_bundled_stsb(name, rows):
    """The bundled STS-B splits load by name, with their full row counts and 0-5 labels."""
    data = load_train_data(name)
    assert data.format is DataFormat.SCORED_PAIRS
    assert len(data) == rows
    labels = np.array([ex.label for ex in data.examples])
    assert labels.min() >= 0.0 and labels.max() <= 5.0 and labels.std() > 1.0


# --- load_sts ------------------------------------------------------------------------------------


def test_load_sts_returns_float64_scores(tmp_path):
    """load_sts gives parallel text lists and float64 scores, also through a column map."""
    column_map = {"sentence1": "text1", "sentence2": "text2", "score": "label"}
    pairs = load_sts(write_jsonl(tmp_path / "s.jsonl", RENAMED), column_map=column_map)
    assert pairs.text1 == [r["sentence1"] for r in RENAMED]
    assert pairs.text2 == [r["sentence2"] for r in RENAMED]
    assert pairs.scores.dtype == np.float64
    np.testing.assert_array_equal(pairs.scores, [4.2, 0.0, 5.0])
    assert len(load_sts("stsb:test")) == 1379


def test_load_sts_rejects_other_formats_and_lists(tmp_path):
    """Triplet files and lists of texts are refused for evaluation."""
    with pytest.raises(DataError, match="evaluation needs text1, text2, label"):
        load_sts(write_jsonl(tmp_path / "t.jsonl", TRIPLETS))
    listed = [{"text1": ["a", "b"], "text2": "c", "label": 1.0}]
    with pytest.raises(DataError, match="single strings"):
        load_sts(write_jsonl(tmp_path / "l.jsonl", listed))
