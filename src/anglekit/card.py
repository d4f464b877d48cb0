"""Model cards: what a run used and measured, saved beside the weights and shown as README.md.

:class:`CardData` is the record. ``fit`` fills it (training options, loss, data, the final dev
score), ``anglekit eval --update-card`` adds the numbers it printed, and ``save_pretrained``
writes it as ``anglekit_card.json`` beside the weights, so a reloaded and re-saved model keeps
it. :func:`render_card` turns it into a Hugging Face model card: YAML front matter
(``library_name``, ``base_model``, ``license``, ``datasets``, ``model-index``) and a body with
usage, pooling and prompts, training data, loss, hyper-parameters, evaluation and citation.

Nothing is printed that the record does not hold: a model that anglekit never trained has no
training section, and an option the run did not use is not listed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anglekit._files import atomic_file
from anglekit.config import from_saved_dict, load_saved

if TYPE_CHECKING:
    from anglekit.config import AngleConfig
    from anglekit.evaluation import SuiteResult

__all__ = [
    "CARD_DATA_NAME",
    "CITATION",
    "README_NAME",
    "CardData",
    "EvalRecord",
    "read_base_license",
    "record_eval_in_folder",
    "render_card",
    "training_options",
    "write_card",
]

logger = logging.getLogger(__name__)

CARD_DATA_NAME = "anglekit_card.json"
README_NAME = "README.md"
TAGS = ["anglekit", "sentence-embeddings", "angle"]
CITATION = """@article{li2023angle,
  title={AnglE-optimized Text Embeddings},
  author={Li, Xianming and Li, Jing},
  journal={arXiv preprint arXiv:2309.12871},
  year={2023}
}"""
MEASURED_BY_EVAL = "anglekit eval"
MEASURED_BY_TRAIN = "anglekit train (final model, dev set)"

# Options that steer bookkeeping, not the trained weights; never shown on a card.
_BOOKKEEPING = {
    "model",  # shown as the starting model
    "train_data",  # shown in the data section
    "dev_data",
    "column_map",
    "pooling",  # shown in the model section, as the model's own setting
    "max_length",
    "prompt",
    "output_dir",
    "save_total_limit",
    "logging_steps",
    "resume",
    "report_to",
    "progress",
    "plots",
    "push_to_hub",
    "bf16",  # replaced by "precision"
    "fp16",
    "dataloader_workers",
}
# The hub datasets behind anglekit's task names and bundled sets (dataset "type" on the hub).
_HUB_DATASETS = {
    "STS12": "mteb/sts12-sts",
    "STS13": "mteb/sts13-sts",
    "STS14": "mteb/sts14-sts",
    "STS15": "mteb/sts15-sts",
    "STS16": "mteb/sts16-sts",
    "STS-B": "mteb/stsbenchmark-sts",
    "SICK-R": "mteb/sickr-sts",
}
_BUNDLED = {  # bundled source -> (task name, hub dataset, split)
    "stsb:train": ("STS-B", "mteb/stsbenchmark-sts", "train"),
    "stsb:dev": ("STS-B", "mteb/stsbenchmark-sts", "validation"),
    "stsb:test": ("STS-B", "mteb/stsbenchmark-sts", "test"),
}
# Loss term -> (weight field, scale field) of LossConfig.
_TERM_FIELDS = {
    "cosine": ("cosine_w", "cosine_tau"),
    "ibn": ("ibn_w", "ibn_tau"),
    "cln": ("cln_w", "ibn_tau"),
    "angle": ("angle_w", "angle_tau"),
}
_TERM_NAMES = {
    "cosine": "cosine (CoSENT: ranks pairs by cosine)",
    "ibn": "in-batch negatives (InfoNCE)",
    "cln": "contrastive (queries retrieve their positives)",
    "angle": "angle (ranks pairs by the angle of complex-split embeddings)",
}
_FORMATS = {
    "scored_pairs": "scored pairs (`text1`, `text2`, `label`)",
    "query_positive": "query/positive pairs (`query`, `positive`)",
    "triplets": "triplets (`query`, `positive`, `negative`)",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class EvalRecord:
    """One evaluation result stated on the card.

    Attributes:
        task: the name ``anglekit eval`` prints (``STS-B``, ``SICK-R``, a file stem).
        source: the data evaluated on, as given (a folder, a file, ``stsb:test``).
        spearman: Spearman x100 of cosine with gold, rounded as printed (2 decimals);
            ``None`` when undefined (NaN).
        pearson: Pearson x100, rounded likewise.
        n: number of pairs.
        measured_by: what produced the number (``anglekit eval`` or the end of training).
    """

    task: str
    source: str
    spearman: float | None
    pearson: float | None
    n: int
    measured_by: str


@dataclass
class CardData:
    """What the model card states; saved as ``anglekit_card.json`` beside the weights.

    Attributes:
        base_model: the model the weights were trained from (hub id or path).
        license: the base model's license, from its card's front matter.
        training: how the last ``fit`` ran (starting model, options used, steps, best dev
            score); ``None`` for a model anglekit never trained.
        loss: the :class:`~anglekit.losses.LossConfig` values of that run (``config``) and the
            terms that applied to its data (``terms``).
        data: the training data (source, format, size) and dev set of that run.
        eval_results: measured scores, one record per (task, source).
        repo_id: the hub repo the model was pushed to; the card's code uses it.
        embedding_dim: size of the embeddings.
        readme_sha256: hash of the README.md anglekit last wrote, to spot hand edits.
    """

    base_model: str | None = None
    license: str | None = None
    training: dict[str, Any] | None = None
    loss: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    eval_results: list[EvalRecord] = field(default_factory=list)
    repo_id: str | None = None
    embedding_dim: int | None = None
    readme_sha256: str | None = None

    def __post_init__(self) -> None:
        self.eval_results = [
            r if isinstance(r, EvalRecord) else EvalRecord(**r) for r in self.eval_results
        ]

    def record_eval(self, result: SuiteResult, source: str, measured_by: str) -> None:
        """Add (or replace, per task and source) the present tasks of an evaluation."""

        def rounded(x: float) -> float | None:
            return round(x, 2) if math.isfinite(x) else None

        for task, corr in result.present.items():
            record = EvalRecord(
                task=task,
                source=str(source),
                spearman=rounded(corr.spearman),
                pearson=rounded(corr.pearson),
                n=corr.n,
                measured_by=measured_by,
            )
            self.eval_results = [
                r for r in self.eval_results if (r.task, r.source) != (task, record.source)
            ]
            self.eval_results.append(record)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "card data") -> CardData:
        """Build from saved values; unknown keys raise."""
        return from_saved_dict(cls, values, source, "card data")

    @classmethod
    def load(cls, directory: str | Path) -> CardData | None:
        """Read ``anglekit_card.json`` from ``directory``, or ``None`` if there is none."""
        return load_saved(cls, Path(directory) / CARD_DATA_NAME)


def training_options(options: dict[str, Any], *, evaluating: bool) -> dict[str, Any]:
    """The training options that shaped the weights, from all of a run's ``TrainOptions``.

    Drops bookkeeping (output folder, logging, progress, ...), options shown elsewhere on the
    card (data, pooling), ``None`` values, and options the run ignored: ``epochs`` when
    ``max_steps`` was set, ``max_steps`` when it was not, ``eval_steps`` without a dev set and
    ``save_steps`` with one (checkpoints then follow the evaluations).

    Args:
        options: every ``TrainOptions`` field of the run, by name.
        evaluating: whether the run had a dev set.

    Returns:
        The options worth stating, plus ``precision`` (``fp32``, ``bf16`` or ``fp16``).
    """
    out = {k: v for k, v in options.items() if k not in _BOOKKEEPING and v is not None}
    out.pop("epochs" if options.get("max_steps", -1) != -1 else "max_steps", None)
    out.pop("save_steps" if evaluating else "eval_steps", None)
    out["precision"] = "bf16" if options.get("bf16") else "fp16" if options.get("fp16") else "fp32"
    return out


def read_base_license(path: str | Path) -> str | None:
    """The ``license:`` of a model's README.md front matter (local folder or hub id), if any."""
    from transformers.utils import cached_file

    file = cached_file(
        str(path),
        README_NAME,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if not file:
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        meta = metadata_load(file) or {}
    except Exception as e:  # a README with broken YAML must not stop a model from loading
        logger.warning("%s: could not read its front matter (%s); license unknown", file, e)
        return None
    license_ = meta.get("license")
    return license_ if isinstance(license_, str) else None


# --- rendering -------------------------------------------------------------------------------


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and bool(_HUB_ID.fullmatch(name)) and not Path(name).exists()


def _dataset_ref(task: str, source: str) -> tuple[str, str, str | None]:
    """``(name, type, split)`` of the hub's model-index ``dataset`` for an evaluation."""
    if source in _BUNDLED:
        name, kind, split = _BUNDLED[source]
        return name, kind, split
    if task in _HUB_DATASETS and not Path(source).is_file():
        return task, _HUB_DATASETS[task], "test"
    if _is_hub_id(source):
        return task, source, None
    return task, Path(source).name or source, None


def _front_matter(card: CardData, model_name: str) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    datasets = []
    if card.data:
        for key in ("source", "dev"):
            source = card.data.get(key)
            if source in _BUNDLED:
                datasets.append(_BUNDLED[source][1])
            elif _is_hub_id(source):
                datasets.append(source)
    results = []
    for r in card.eval_results:
        if r.spearman is None:
            continue
        name, kind, split = _dataset_ref(r.task, r.source)
        results.append(
            EvalResult(
                task_type="sentence-similarity",
                task_name="Semantic Textual Similarity",
                dataset_type=kind,
                dataset_name=name,
                dataset_split=split,
                metric_type="cos_sim_spearman",
                metric_value=r.spearman,
                metric_name="Spearman (cosine) x100",
            )
        )
    meta = ModelCardData(
        library_name="anglekit",
        base_model=card.base_model if _is_hub_id(card.base_model) else None,
        license=card.license,
        pipeline_tag="sentence-similarity",
        tags=TAGS,
        datasets=list(dict.fromkeys(datasets)) or None,
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    return meta.to_yaml()


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _code(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", "\\n") + "`"


def _model_section(card: CardData, config: AngleConfig) -> list[str]:
    pooling = config.pooling
    pooling_text = f"token at index {pooling}" if isinstance(pooling, int) else _code(pooling.value)
    rows = [["pooling", pooling_text], ["max length", f"{config.max_length} tokens"]]
    if card.embedding_dim is not None:
        rows.append(["embedding size", str(card.embedding_dim)])
    rows.append(["prompt", _code(config.prompt) if config.prompt else "none (texts as given)"])
    for name, template in sorted(config.prompts.items()):
        rows.append([f"prompt `{name}`", _code(template)])
    rows.append(["normalised by default", _fmt(config.normalize)])
    rows.append(["backbone", f"{config.backbone_kind.value}, {config.dtype} weights"])
    return ["## Model", "", *_table(["setting", "value"], rows), ""]


def _usage_section(config: AngleConfig, model_id: str) -> list[str]:
    lines = [
        "## Usage",
        "",
        "```bash",
        "pip install anglekit",
        "```",
        "",
        "```python",
        "from anglekit import AnglE",
        "",
        f"model = AnglE.from_pretrained({json.dumps(model_id)})",
        'texts = ["A man is playing a flute.", "Someone plays a flute."]',
        "embeddings = model.encode(texts, normalize=True)  # (2, D) float32",
        "print(model.similarity(texts[0], texts[1]))",
    ]
    for name in sorted(config.prompts):
        lines.append(f'vectors = model.encode(["..."], prompt_name="{name}")')
    lines += [
        "```",
        "",
        "From the command line:",
        "",
        "```bash",
        f"anglekit encode {model_id} --input texts.txt --output vectors.npy --normalize",
        "```",
        "",
    ]
    return lines


def _training_section(card: CardData) -> list[str]:
    training = card.training or {}
    steps = training.get("steps")
    start = training.get("start_model") or card.base_model
    text = "Fine-tuned with the AnglE objective"
    if start:
        text += f" from `{start}`"
    if steps is not None:
        text += f" for {steps} optimizer steps"
        if training.get("epochs") is not None:
            text += f" ({training['epochs']:.2f} epochs)"
    text += "."
    if training.get("best_step") is not None and training.get("best_dev_spearman") is not None:
        text += (
            f" The saved weights are those of step {training['best_step']}, which had the best"
            f" dev Spearman ({training['best_dev_spearman']:.2f})."
        )
    lines = ["## Training", "", text, ""]
    if card.data:
        data = card.data
        rows = [["source", _code(str(data["source"]))]]
        if data.get("format"):
            rows.append(["format", _FORMATS.get(data["format"], data["format"])])
        if data.get("examples") is not None:
            rows.append(["examples", f"{data['examples']:,}"])
        if data.get("column_map"):
            rows.append(["column map", _code(str(data["column_map"]))])
        if data.get("dev"):
            dev = _code(str(data["dev"]))
            if data.get("dev_pairs") is not None:
                dev += f" ({data['dev_pairs']:,} pairs)"
            rows.append(["dev set", dev])
        lines += ["### Data", "", *_table(["item", "value"], rows), ""]
    if card.loss:
        config = card.loss.get("config", {})
        terms = card.loss.get("terms", [])
        rows = []
        for term in terms:
            weight, scale = _TERM_FIELDS.get(term, (None, None))
            rows.append(
                [
                    _TERM_NAMES.get(term, term),
                    _fmt(config.get(weight, "?")),
                    _fmt(config.get(scale, "?")),
                ]
            )
        lines += ["### Loss", "", *_table(["term", "weight", "scale (tau)"], rows), ""]
        if "ibn" in terms and config.get("ibn_threshold") is not None:  # None: no labels
            lines += [
                f"In-batch negatives count labels >= {_fmt(config['ibn_threshold'])} as positives.",
                "",
            ]
        if card.loss.get("size"):  # anglekit.espresso options: ESE or Matryoshka
            options = ", ".join(f"`{k}={v}`" for k, v in card.loss["size"].items())
            lines += [f"Trained to work at fewer layers or dimensions: {options}.", ""]
        fmt = (card.data or {}).get("format")
        if fmt:
            kind = _FORMATS.get(fmt, fmt).split(" (")[0]
            lines += [f"Terms not listed had weight 0 or do not apply to {kind}.", ""]
    options = training.get("options")
    if options:
        rows = [[f"`{k}`", _fmt(v)] for k, v in options.items()]
        lines += ["### Hyper-parameters", "", *_table(["option", "value"], rows), ""]
    return lines


def _eval_section(card: CardData) -> list[str]:
    rows = []
    for r in card.eval_results:
        rows.append(
            [
                r.task,
                _code(r.source),
                "nan" if r.spearman is None else f"{r.spearman:.2f}",
                "nan" if r.pearson is None else f"{r.pearson:.2f}",
                str(r.n),
                r.measured_by,
            ]
        )
    header = ["task", "data", "Spearman", "Pearson", "pairs", "measured by"]
    return [
        "## Evaluation",
        "",
        "Correlation x100 of the cosine similarity of the two texts with the gold score.",
        "",
        *_table(header, rows),
        "",
    ]


def render_card(card: CardData, config: AngleConfig, model_id: str) -> str:
    """The model card (README.md) for ``card`` and the model's ``config``.

    Args:
        card: what was used and measured.
        config: the model's anglekit settings (pooling, prompts, ...).
        model_id: the folder or hub repo id the usage example loads.

    Returns:
        The card text: YAML front matter between ``---`` lines, then Markdown.
    """
    parts = [p for p in Path(model_id).parts if p not in ("/", ".", "..")] or [model_id]
    model_name = parts[-1]
    if model_name == "model" and len(parts) > 1:  # <output_dir>/model: name it by the run
        model_name = f"{parts[-2]}-model"
    if card.repo_id:
        model_name = card.repo_id.rsplit("/", 1)[-1]
    base = card.base_model
    if card.training is not None:
        intro = "An [AnglE](https://arxiv.org/abs/2309.12871) sentence-embedding model"
        intro += f" fine-tuned from `{base}`" if base else ""
        intro += " with anglekit."
    else:
        intro = "A sentence-embedding model"
        intro += f" built on `{base}`" if base else ""
        intro += " and packaged with anglekit; anglekit did not fine-tune it."
    lines = ["---", _front_matter(card, model_name).rstrip("\n"), "---", ""]
    lines += [f"# {model_name}", "", intro, ""]
    lines += _usage_section(config, model_id)
    lines += _model_section(card, config)
    if card.training is not None:
        lines += _training_section(card)
    if card.eval_results:
        lines += _eval_section(card)
    lines += [
        "## Framework",
        "",
        f"- anglekit {config.version or 'unknown'}",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)


# --- writing ---------------------------------------------------------------------------------


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_card(
    directory: str | Path, card: CardData, config: AngleConfig, *, model_id: str
) -> CardData:
    """Write ``anglekit_card.json`` and the rendered ``README.md`` into a model folder.

    A README.md that was edited by hand since anglekit wrote it (or that anglekit never
    wrote) is kept, with a warning; the card data is updated either way.

    Args:
        directory: the model folder.
        card: the card data; its ``readme_sha256`` identifies the README anglekit wrote.
        config: the model's anglekit settings.
        model_id: the folder or repo id the usage example loads.

    Returns:
        The card data as saved (with the hash of the README it wrote).
    """
    folder = Path(directory)
    readme = folder / README_NAME
    text = render_card(card, config, model_id)
    if readme.is_file() and _sha256(readme.read_text(encoding="utf-8")) != card.readme_sha256:
        logger.warning(
            "%s was not written by anglekit or was edited since; leaving it as it is "
            "(the card data in %s is updated)",
            readme,
            CARD_DATA_NAME,
        )
    else:
        _write_text_atomic(readme, text)
        card = replace(card, readme_sha256=_sha256(text))
    _write_text_atomic(
        folder / CARD_DATA_NAME, json.dumps(card.to_dict(), indent=2, sort_keys=True) + "\n"
    )
    return card


def record_eval_in_folder(
    directory: str | Path,
    card: CardData,
    result: SuiteResult,
    source: str,
    *,
    measured_by: str = MEASURED_BY_EVAL,
) -> CardData:
    """Add an evaluation to the card of a saved model folder and rewrite its card.

    Args:
        directory: a model folder saved by anglekit (it holds ``anglekit_config.json``).
        card: the folder's card data (as loaded with the model).
        result: the evaluation, as ``anglekit eval`` printed it.
        source: the data evaluated on, as given.
        measured_by: what produced the numbers.

    Returns:
        The card data as saved.

    Raises:
        ValueError: the folder has no ``anglekit_config.json``.
    """
    from anglekit.config import CONFIG_NAME, AngleConfig

    config = AngleConfig.load(directory)
    if config is None:
        raise ValueError(
            f"{directory} has no {CONFIG_NAME}: only model folders saved by anglekit have a card"
        )
    card = replace(card, eval_results=list(card.eval_results))
    card.record_eval(result, source, measured_by)
    return write_card(directory, card, config, model_id=card.repo_id or str(directory))
