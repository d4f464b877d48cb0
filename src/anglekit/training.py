"""Training with the AnglE objective on the ``transformers`` Trainer.

:class:`TrainOptions` is the one definition of every training option: :func:`fit` takes them
as keyword arguments and ``anglekit train`` turns them into flags. The Trainer (and accelerate
under it) supplies the loop, mixed precision, gradient accumulation, checkpoints, resume,
logging integrations and multi-device runs under ``torchrun`` / ``accelerate launch``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from anglekit._files import atomic_file
from anglekit.batching import AngleCollator, TokenizedDataset
from anglekit.card import MEASURED_BY_TRAIN, CardData, training_options
from anglekit.data import TrainData, load_sts, load_train_data
from anglekit.espresso import EspressoConfig, EspressoLoss
from anglekit.losses import AngleLoss, LossConfig
from anglekit.model import DEFAULT_MODEL, AnglE

__all__ = ["TrainOptions", "TrainResult", "fit"]

logger = logging.getLogger(__name__)

FINAL_MODEL_DIR = "model"
SUMMARY_FILE = "train_summary.json"


def fast_bf16() -> bool:
    """Whether this machine runs bf16 matrix products natively (a recent GPU, or a CPU with
    AVX-512 BF16 / AMX), where bf16 mixed precision trains several times faster than fp32
    at no measured cost in STS-B Spearman (``bench/README.md``)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.cpu._is_avx512_bf16_supported())


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainOptions:
    """Every option of ``fit`` / ``anglekit train`` except the loss settings (:class:`LossConfig`).

    The defaults fine-tune all-MiniLM-L6-v2 on the bundled STS-B train set and keep the
    checkpoint with the best STS-B dev Spearman.
    """

    model: str = _opt(DEFAULT_MODEL, "model folder or hub id to fine-tune")
    train_data: str = _opt("stsb:train", "training data: .jsonl/.csv/.tsv, datasets folder, hub id")
    dev_data: str | None = _opt("stsb:dev", "STS-format dev set evaluated every --eval-steps")
    output_dir: str = _opt("runs/anglekit", "checkpoints go here; the final model in <dir>/model")
    column_map: str | None = _opt(None, "rename columns, e.g. sentence1=text1,sentence2=text2")
    pooling: str | None = _opt(None, "pooling (cls, mean, max, last, ...); default: the model's")
    max_length: int | None = _opt(None, "truncate texts to this many tokens; default: the model's")
    prompt: str | None = _opt(None, "prompt template with {text}, or A, B, C from Prompts")
    epochs: float = _opt(1.0, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int = _opt(-1, "optimizer steps; -1 trains for --epochs")
    batch_size: int = _opt(32, "examples per device per step")
    learning_rate: float = _opt(2e-5, "peak learning rate")
    warmup_steps: int = _opt(0, "linear warm-up steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    gradient_accumulation_steps: int = _opt(1, "batches accumulated per optimizer step")
    seed: int = _opt(42, "random seed")
    bf16: bool | None = _opt(
        None, "bf16 mixed precision; unset: on where the hardware runs bf16 fast, unless --fp16"
    )
    fp16: bool = _opt(False, "fp16 mixed precision (GPU)")
    gradient_checkpointing: bool = _opt(False, "recompute activations to save memory")
    eval_steps: int = _opt(50, "evaluate on --dev-data and save a checkpoint every N steps")
    save_steps: int = _opt(500, "checkpoint every N steps when there is no dev set")
    save_total_limit: int = _opt(2, "checkpoints kept (the best one always is)")
    logging_steps: int = _opt(10, "log the loss every N steps")
    resume: bool = _opt(False, "continue from the last checkpoint in --output-dir")
    report_to: str = _opt("none", "tensorboard, wandb, ... or none")
    drop_duplicates: bool = _opt(True, "drop examples whose text already appears in the batch")
    group_by_length: bool = _opt(True, "batch texts of similar length together (less padding)")
    progress: bool = _opt(True, "show a progress bar on a terminal")
    plots: bool = _opt(True, "loss and dev Spearman curves in <output-dir>/plots (matplotlib)")
    push_to_hub: str | None = _opt(None, "upload the final model to this hub repo (user/name)")

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "batch_size",
            "gradient_accumulation_steps",
            "eval_steps",
            "save_steps",
            "logging_steps",
            "save_total_limit",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"max_steps must be -1 or >= 1, got {self.max_steps}")
        if self.max_steps == -1 and not self.epochs > 0:
            problems.append(f"epochs must be > 0, got {self.epochs}")
        if self.bf16 and self.fp16:
            problems.append("choose bf16 or fp16, not both")
        if problems:
            raise ValueError("invalid training options: " + "; ".join(problems))


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    model_dir: Path
    steps: int
    train_seconds: float
    train_examples_per_s: float
    best_dev_spearman: float | None
    best_step: int | None


OPTION_GROUPS = (TrainOptions, LossConfig, EspressoConfig)


def split_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """Split keyword arguments by :data:`OPTION_GROUPS`; unknown names raise."""
    names = [{f.name for f in fields(group)} for group in OPTION_GROUPS]
    unknown = sorted(set(kwargs).difference(*names))
    if unknown:
        valid = sorted(set().union(*names))
        raise TypeError(f"unknown training option(s) {unknown}; valid: {valid}")
    return tuple({k: v for k, v in kwargs.items() if k in group} for group in names)


def _make_trainer_classes():
    """Build the Trainer subclass and callback lazily, so the import stays light."""
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class AngleTrainer(Trainer):
        """A Trainer whose loss is the AnglE objective and whose metric is dev Spearman."""

        def __init__(
            self,
            *args: Any,
            angle_loss: AngleLoss | EspressoLoss,
            texts_per_example: int,
            lengths: list[int] | None,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.angle_loss = angle_loss
            self.texts_per_example = texts_per_example
            self.lengths = lengths
            self.eval_seconds = 0.0
            self.dev_scores: dict[int, Any] = {}  # step -> Correlation of that evaluation

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels", None)
            layerwise = getattr(self.angle_loss, "layerwise", False)
            emb = model(**inputs, all_layers=layerwise)  # (N*K, D), or (L, N*K, D) layerwise
            emb = emb.unflatten(-2, (-1, self.texts_per_example))  # ([L,] N, K, D)
            loss = self.angle_loss(emb, labels)
            return (loss, emb) if return_outputs else loss

        def _get_train_sampler(self, train_dataset=None):
            if self.lengths is None:
                return super()._get_train_sampler(train_dataset)
            generator = torch.Generator().manual_seed(self.args.seed)
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths=self.lengths,
                generator=generator,
            )

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            from anglekit.evaluation import evaluate_pairs

            start = time.perf_counter()
            model: AnglE = self.accelerator.unwrap_model(self.model)
            corr = evaluate_pairs(_dev_encoder(model), eval_dataset or self.eval_dataset)
            self.dev_scores[self.state.global_step] = corr
            metrics = {
                f"{metric_key_prefix}_spearman": corr.spearman,
                f"{metric_key_prefix}_pearson": corr.pearson,
            }
            self.eval_seconds += time.perf_counter() - start
            logger.info("step %d: dev spearman %.2f", self.state.global_step, corr.spearman)
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(
                self.args, self.state, self.control, metrics
            )
            return metrics

        def _save(self, output_dir=None, state_dict=None):
            if self.args.should_save:
                model: AnglE = self.accelerator.unwrap_model(self.model)
                if model.card_data.training is not None:  # the checkpoint's card: its step
                    model.card_data.training["steps"] = self.state.global_step
                model.save_pretrained(output_dir)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            _load_backbone_weights(model or self.model, resume_from_checkpoint)

        def _load_best_model(self):
            logger.info(
                "loading the best checkpoint %s (dev spearman %.2f)",
                self.state.best_model_checkpoint,
                self.state.best_metric,
            )
            _load_backbone_weights(self.model, self.state.best_model_checkpoint)

    class LogCallback(TrainerCallback):
        """Send the Trainer's loss records to the ``logging`` module."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logger.info(
                    "step %d: loss %.4f, lr %.3g",
                    state.global_step,
                    logs["loss"],
                    logs.get("learning_rate", float("nan")),
                )

    return AngleTrainer, LogCallback


def _load_backbone_weights(model: AnglE, checkpoint: str) -> None:
    """Load a checkpoint's backbone weights (written by ``save_pretrained``) in place."""
    from safetensors.torch import load_file

    files = sorted(Path(checkpoint).glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in checkpoint {checkpoint}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    tied = set(getattr(model.backbone, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"checkpoint {checkpoint} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def fit(
    model: str | AnglE | None = None,
    train_data: str | Path | TrainData | None = None,
    **options: Any,
) -> TrainResult:
    """Fine-tune an embedder with the AnglE objective.

    Args:
        model: a model folder or hub id (default all-MiniLM-L6-v2), or a loaded :class:`AnglE`.
        train_data: a data source (see :func:`anglekit.data.load_train_data`) or validated
            :class:`~anglekit.data.TrainData`; default the bundled STS-B train set.
        **options: any field of :class:`TrainOptions`, :class:`~anglekit.losses.LossConfig`
            or :class:`~anglekit.espresso.EspressoConfig` (``ese=True``, ``matryoshka_dims``).

    Returns:
        Where the final model was saved (``<output_dir>/model``) and how training went.

    Example:
        >>> result = fit("sentence-transformers/all-MiniLM-L6-v2", "stsb:train",
        ...              max_steps=200, bf16=True, ibn_threshold=4.0)
    """
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint

    train_kwargs, loss_kwargs, size_kwargs = split_options(options)
    if isinstance(model, str):
        train_kwargs["model"] = model
    if isinstance(train_data, str | Path):
        train_kwargs["train_data"] = str(train_data)
    opts = TrainOptions(**train_kwargs)
    if opts.bf16 is None:  # record what "auto" chose, for the summary and the model card
        opts = replace(opts, bf16=fast_bf16() and not opts.fp16)
    loss = AngleLoss(LossConfig(**loss_kwargs))
    size = EspressoConfig(**size_kwargs)
    objective = EspressoLoss(loss, size) if size.active else loss
    if opts.push_to_hub:
        from anglekit.hub import check_can_push

        check_can_push(opts.push_to_hub)  # fail now, not after training
    torch.manual_seed(opts.seed)

    data = (
        train_data
        if isinstance(train_data, TrainData)
        else load_train_data(opts.train_data, column_map=opts.column_map)
    )
    dev = load_sts(opts.dev_data) if opts.dev_data else None
    if isinstance(model, AnglE):
        ignored = [n for n in ("pooling", "max_length", "prompt") if getattr(opts, n) is not None]
        if ignored:
            raise ValueError(
                f"{', '.join(ignored)} only apply when fit loads the model; the AnglE object "
                "given carries its own (set them with AnglE.from_pretrained)"
            )
    else:
        model = AnglE.from_pretrained(
            opts.model,
            pooling=opts.pooling,
            max_length=opts.max_length,
            prompt=opts.prompt,
        )
    _warn_on_label_scale(data, loss.config)
    dataset = TokenizedDataset(data, model.tokenize, seed=opts.seed)
    logger.info("training on %d %s examples from %s", len(data), data.format.value, data.source)

    out = Path(opts.output_dir)
    evaluating = dev is not None
    show_progress = opts.progress and sys.stderr.isatty()
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps,
        per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.gradient_accumulation_steps,
        learning_rate=opts.learning_rate,
        warmup_steps=opts.warmup_steps,
        weight_decay=opts.weight_decay,
        lr_scheduler_type="linear",
        seed=opts.seed,
        data_seed=opts.seed,
        bf16=opts.bf16,
        fp16=opts.fp16,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=opts.eval_steps,
        save_strategy="steps",
        save_steps=opts.eval_steps if evaluating else opts.save_steps,
        save_total_limit=opts.save_total_limit,
        load_best_model_at_end=evaluating,
        metric_for_best_model="spearman" if evaluating else None,
        greater_is_better=True,
        logging_steps=opts.logging_steps,
        report_to=[] if opts.report_to == "none" else [opts.report_to],
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=not show_progress,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer_class, log_callback = _make_trainer_classes()
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=AngleCollator(
            model.tokenizer.pad_token_id,
            model.config.padding_side,
            drop_duplicates=opts.drop_duplicates,
        ),
        angle_loss=objective,
        texts_per_example=len(data.format.text_fields),
        eval_dataset=dev,
        lengths=dataset.lengths() if opts.group_by_length else None,
    )
    trainer.remove_callback(PrinterCallback)  # the library logs; it does not print
    if not show_progress:
        trainer.remove_callback(ProgressCallback)
    trainer.add_callback(log_callback())
    resume = get_last_checkpoint(str(out)) if opts.resume else None
    if opts.resume and resume is None:
        logger.warning("--resume: no checkpoint in %s, starting from scratch", out)
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    source = data.source if isinstance(train_data, TrainData) else opts.train_data
    model.card_data = _card_for_run(model, opts, loss, data, source, dev, args)
    if size.active:
        model.card_data.loss["size"] = size.to_dict()
    model.train()
    output = trainer.train(resume_from_checkpoint=resume)
    model.eval()

    final = out / FINAL_MODEL_DIR
    model.card_data.training.update(
        steps=trainer.state.global_step,
        epochs=trainer.state.epoch,
        best_step=trainer.state.best_global_step if evaluating else None,
        best_dev_spearman=trainer.state.best_metric if evaluating else None,
    )
    if dev is not None:  # the final model's dev score, as `anglekit eval` computes it
        from anglekit.evaluation import SuiteResult, evaluate_pairs

        corr = trainer.dev_scores.get(trainer.state.best_global_step)
        if corr is None:  # the best checkpoint was scored by an earlier, resumed-from run
            corr = evaluate_pairs(_dev_encoder(model), dev)
        dev_name = Path(opts.dev_data).stem if Path(opts.dev_data).is_file() else opts.dev_data
        final_dev = SuiteResult(scores={dev_name: corr})
        logger.info("final model: dev spearman %.2f", corr.spearman)
        model.card_data.record_eval(final_dev, opts.dev_data, MEASURED_BY_TRAIN)
    model.save_pretrained(final)
    seconds = output.metrics["train_runtime"] - trainer.eval_seconds
    examples = trainer.state.global_step * opts.batch_size * opts.gradient_accumulation_steps
    best_step = trainer.state.best_global_step if evaluating else None
    result = TrainResult(
        model_dir=final,
        steps=trainer.state.global_step,
        train_seconds=seconds,
        train_examples_per_s=examples / seconds if seconds > 0 else float("nan"),
        best_dev_spearman=trainer.state.best_metric if evaluating else None,
        best_step=best_step,
    )
    summary = {
        **{k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()},
        "train_pairs_per_s": result.train_examples_per_s,
        "options": asdict(opts),
        "loss": {**asdict(loss.config), **size.to_dict()},
        "data": {"source": data.source, "format": data.format.value, "examples": len(data)},
    }
    with atomic_file(out / SUMMARY_FILE) as f:
        f.write(json.dumps(summary, indent=2) + "\n")
    logger.info("saved the final model to %s", final)
    if opts.plots:
        from anglekit.plots import write_training_plots

        write_training_plots(trainer.state.log_history, out / "plots")
    if opts.push_to_hub:
        from anglekit.hub import push_to_hub

        push_to_hub(final, opts.push_to_hub)
    return result


def _dev_encoder(model: AnglE):
    """How dev sets are encoded, in training and after it (as ``anglekit eval`` does)."""
    return lambda texts: model.encode(texts, batch_size=64, normalize=True, show_progress=False)


def _card_for_run(
    model: AnglE,
    opts: TrainOptions,
    loss: AngleLoss,
    data: TrainData,
    source: str,
    dev: Any,
    args: Any,
) -> CardData:
    """The model card data of a run: its options, loss, data; results are added at the end."""
    options = training_options(asdict(opts), evaluating=dev is not None)
    options["optimizer"] = str(getattr(args.optim, "value", args.optim))
    options["lr_scheduler"] = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    options["effective_batch_size"] = (
        opts.batch_size * opts.gradient_accumulation_steps * args.world_size
    )
    # Which terms apply to this data format, asked of the loss itself on a random batch.
    probe = torch.randn(2, len(data.format.text_fields), 4, generator=torch.Generator())
    labels = torch.tensor([0.0, 1.0]) if data.format.has_label else None
    data_info: dict[str, Any] = {
        "source": source,
        "format": data.format.value,
        "examples": len(data),
    }
    if opts.column_map:
        data_info["column_map"] = opts.column_map
    if dev is not None:
        data_info.update(dev=opts.dev_data, dev_pairs=len(dev))
    return CardData(
        base_model=model.card_data.base_model or model.config.base_model,
        license=model.card_data.license,
        training={"start_model": model.name_or_path or model.config.base_model, "options": options},
        loss={"config": asdict(loss.config), "terms": list(loss.terms(probe, labels))},
        data=data_info,
        repo_id=opts.push_to_hub,
    )


def _warn_on_label_scale(data: TrainData, loss: LossConfig) -> None:
    """Say so when graded labels would make most pairs in-batch positives."""
    if not data.format.has_label or not loss.ibn_w:
        return
    labels = [ex.label for ex in data.examples]
    top = max(labels)
    positives = sum(y >= loss.ibn_threshold for y in labels) / len(labels)
    if top > 1 and positives > 0.5:
        logger.warning(
            "labels reach %.3g but ibn_threshold=%.3g makes %.0f%% of pairs in-batch positives; "
            "for 0-5 STS scores set ibn_threshold to about 4",
            top,
            loss.ibn_threshold,
            100 * positives,
        )
