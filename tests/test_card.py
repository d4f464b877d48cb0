"""Model cards: written by save_pretrained and fit, kept on reload, updated by eval."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from anglekit import AnglE, fit
from anglekit.card import CARD_DATA_NAME, CITATION, CardData, training_options
from anglekit.cli import main

from .conftest import WORDS, write_jsonl


def split_card(text: str) -> tuple[dict, str]:
    """The parsed YAML front matter and the Markdown body of a model card."""
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.DOTALL)
    assert match, "the card has no YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    """A tiny model trained for 2 steps with a dev set, and its data file."""
    tmp = tmp_path_factory.mktemp("card-run")
    rows = [
        {"text1": WORDS[i], "text2": WORDS[(i + 1) % len(WORDS)], "label": float(i % 6)}
        for i in range(len(WORDS))
    ]
    data = write_jsonl(tmp / "pairs.jsonl", rows)
    result = fit(
        str(tiny_bert),
        str(data),
        dev_data=str(data),
        output_dir=str(tmp / "run"),
        max_steps=2,
        eval_steps=1,
        batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        progress=False,
        plots=False,
        ibn_threshold=4.0,
    )
    return result, data


def test_untrained_model_card_has_no_training_section(tiny_bert, tmp_path):
    """A model anglekit never trained gets a valid card without training or evaluation."""
    angle = AnglE.from_pretrained(str(tiny_bert), pooling="mean", device="cpu")
    angle.save_pretrained(tmp_path / "m")
    meta, body = split_card((tmp_path / "m" / "README.md").read_text())
    assert meta["library_name"] == "anglekit"
    assert meta["pipeline_tag"] == "sentence-similarity"
    assert meta["tags"] == ["anglekit", "sentence-embeddings", "angle"]
    assert "base_model" not in meta  # a local path is not a hub id
    assert "model-index" not in meta and "license" not in meta
    assert "## Training" not in body and "## Evaluation" not in body
    assert "| pooling | `mean` |" in body
    assert f'AnglE.from_pretrained("{tmp_path / "m"}")' in body
    assert CITATION in body


def test_license_and_hub_base_model_in_front_matter(tiny_bert, tmp_path):
    """The base model's license comes from its README front matter; a hub id is base_model."""
    base = shutil.copytree(tiny_bert, tmp_path / "base")
    (base / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# base\n")
    angle = AnglE.from_pretrained(str(base), device="cpu")
    assert angle.card_data.license == "mit"
    angle.card_data.base_model = "someone/tiny-bert"
    angle.save_pretrained(tmp_path / "m")
    meta, body = split_card((tmp_path / "m" / "README.md").read_text())
    assert meta["license"] == "mit" and meta["base_model"] == "someone/tiny-bert"
    assert "built on `someone/tiny-bert`" in body


def test_trained_card_states_what_the_run_used(trained):
    """fit's card lists the options, loss and data it used, and none it ignored."""
    result, data = trained
    card = CardData.load(result.model_dir)
    options = card.training["options"]
    assert options["max_steps"] == 2 and options["learning_rate"] == 1e-3
    assert "epochs" not in options and "save_steps" not in options  # ignored by this run
    assert "output_dir" not in options and "plots" not in options
    assert card.training["steps"] == 2 and card.training["best_step"] in (1, 2)
    assert card.loss["terms"] == ["cosine", "ibn", "angle"]  # cln does not apply to pairs
    assert card.loss["config"]["ibn_threshold"] == 4.0
    assert card.data == {
        "source": str(data),
        "format": "scored_pairs",
        "examples": 12,
        "dev": str(data),
        "dev_pairs": 12,
    }
    [record] = card.eval_results
    assert record.spearman == pytest.approx(card.training["best_dev_spearman"], abs=0.006)

    meta, body = split_card((result.model_dir / "README.md").read_text())
    assert "## Training" in body and "| `learning_rate` | 0.001 |" in body
    assert "| in-batch negatives (InfoNCE) | 1 | 20 |" in body and "contrastive" not in body
    assert "labels >= 4 as positives" in body
    [entry] = meta["model-index"][0]["results"]
    assert entry["task"]["type"] == "sentence-similarity"
    assert entry["metrics"] == [
        {"type": "cos_sim_spearman", "value": record.spearman, "name": "Spearman (cosine) x100"}
    ]
    assert entry["dataset"] == {"name": "pairs", "type": "pairs.jsonl"}


def test_eval_update_card_states_printed_numbers(trained, tmp_path, capsys):
    """eval --update-card puts exactly the printed Spearman into the card, kept on re-save."""
    result, data = trained
    model_dir = shutil.copytree(result.model_dir, tmp_path / "model")
    capsys.readouterr()
    assert main(["-q", "eval", str(model_dir), "--data", str(data), "--update-card"]) == 0
    table = capsys.readouterr().out
    printed = table.splitlines()[2].split()[1]  # row of the model, column "pairs"
    meta, body = split_card((model_dir / "README.md").read_text())
    values = [m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]]
    assert f"{values[-1]:.2f}" == printed
    assert f"| pairs | `{data}` | {printed} |" in body and "| anglekit eval |" in body

    again = AnglE.from_pretrained(str(model_dir), device="cpu")
    again.save_pretrained(tmp_path / "resaved")
    resaved = (tmp_path / "resaved" / "README.md").read_text()
    assert "## Training" in resaved and f"| {printed} |" in resaved


def test_update_card_refuses_foreign_folder_and_keeps_edited_readme(tiny_bert, tmp_path, capsys):
    """--update-card refuses a non-anglekit folder and never overwrites a hand-edited README."""
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [{"text1": "a cat", "text2": "a dog", "label": float(i)} for i in range(3)]
        + [{"text1": "the sun", "text2": "rain falls", "label": 0.5}],
    )
    assert main(["-q", "eval", str(tiny_bert), "--data", str(data), "--update-card"]) == 1
    assert "anglekit_config.json" in capsys.readouterr().err
    assert not (tiny_bert / "README.md").exists()

    AnglE.from_pretrained(str(tiny_bert), device="cpu").save_pretrained(tmp_path / "m")
    readme = tmp_path / "m" / "README.md"
    readme.write_text("# my own card\n")
    assert main(["-q", "eval", str(tmp_path / "m"), "--data", str(data), "--update-card"]) == 0
    assert readme.read_text() == "# my own card\n"
    saved = json.loads((tmp_path / "m" / CARD_DATA_NAME).read_text())
    assert [r["task"] for r in saved["eval_results"]] == ["d"]


def test_training_options_drop_what_the_run_ignored():
    """Epochs are dropped when max_steps rules, eval_steps without a dev set; bf16 -> precision."""
    opts = {"epochs": 1.0, "max_steps": -1, "eval_steps": 50, "save_steps": 500, "bf16": True}
    assert training_options(opts, evaluating=False) == {
        "epochs": 1.0,
        "save_steps": 500,
        "precision": "bf16",
    }
    opts.update(max_steps=10, bf16=False)
    assert training_options(opts, evaluating=True) == {
        "max_steps": 10,
        "eval_steps": 50,
        "precision": "fp32",
    }


def test_card_data_rejects_unknown_keys():
    """A card file with an unknown key is refused, naming the key."""
    with pytest.raises(ValueError, match="colour"):
        CardData.from_dict({"colour": "blue"})
