"""Training with the AnglE objective on the ``transformers`` Trainer.

:class:`TrainOptions` is the one definition of every training option: :func:`fit` takes them
as keyword arguments and ``anglekit train`` turns them into flags. The Trainer (and accelerate
under it) supplies the loop, mixed precision, gradient accumulation, checkpoints, resume,
logging integrations and multi-device runs under ``torchrun`` / ``accelerate launch``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from anglekit._fields import option
from anglekit._files import atomic_file
from anglekit.batching import AngleCollator, TokenizedDataset
from anglekit.card import MEASURED_BY_TRAIN, CardData, training_options
from anglekit.checkpoints import last_complete_checkpoint, mark_complete
from anglekit.cpu_inference import warn_if_bf16_emulated
from anglekit.cpu_training import FrozenWeightCasts, attention_kernels, use_fast_dropout
from anglekit.data import DataFormat, TrainData, load_sts, load_train_data
from anglekit.distributed import gather_batch
from anglekit.espresso import EspressoConfig, EspressoLoss, parse_sizes
from anglekit.gradcache import gradcache_backward
from anglekit.layers import num_layers
from anglekit.losses import AngleLoss, LossConfig
from anglekit.model import DEFAULT_MODEL, AnglE
from anglekit.streaming import StreamingDataset

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


@dataclass
class TrainOptions:
    """Every option of ``fit`` / ``anglekit train`` except the loss settings (:class:`LossConfig`).

    The defaults fine-tune all-MiniLM-L6-v2 on the bundled STS-B train set and keep the
    checkpoint with the best STS-B dev Spearman.
    """

    model: str = option(DEFAULT_MODEL, "model folder or hub id to fine-tune")
    train_data: str = option(
        "stsb:train", "training data: .jsonl/.csv/.tsv, datasets folder, hub id"
    )
    dev_data: str | None = option("stsb:dev", "STS-format dev set evaluated every --eval-steps")
    dev_sizes: str | None = option(
        None,
        "keep the checkpoint with the best mean dev Spearman over these layers x dims sizes, "
        "e.g. 2x64,4x128,6x384 (for --ese / --matryoshka-dims); default: full size",
    )
    output_dir: str = option("runs/anglekit", "checkpoints go here; the final model in <dir>/model")
    column_map: str | None = option(None, "rename columns, e.g. sentence1=text1,sentence2=text2")
    pooling: str | None = option(None, "pooling (cls, mean, max, last, ...); default: the model's")
    max_length: int | None = option(
        None, "truncate texts to this many tokens; default: the model's"
    )
    prompt: str | None = option(None, "prompt template with {text}, or A, B, C from Prompts")
    epochs: float = option(1.0, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int = option(-1, "optimizer steps; -1 trains for --epochs")
    batch_size: int = option(32, "examples per device per step")
    learning_rate: float = option(2e-5, "peak learning rate")
    warmup_steps: int = option(0, "linear warm-up steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    gradient_accumulation_steps: int = option(1, "batches accumulated per optimizer step")
    seed: int = option(42, "random seed")
    bf16: bool | None = option(
        None, "bf16 mixed precision; unset: on where the hardware runs bf16 fast, unless --fp16"
    )
    fp16: bool = option(False, "fp16 mixed precision (GPU)")
    gradient_checkpointing: bool = option(False, "recompute activations to save memory")
    eval_steps: int = option(50, "evaluate on --dev-data and save a checkpoint every N steps")
    save_steps: int = option(500, "checkpoint every N steps when there is no dev set")
    save_total_limit: int = option(2, "checkpoints kept (the best one always is)")
    logging_steps: int = option(10, "log the loss every N steps")
    resume: bool = option(False, "continue from the last checkpoint in --output-dir")
    report_to: str = option("none", "tensorboard, wandb, ... or none")
    drop_duplicates: bool = option(True, "drop examples whose text already appears in the batch")
    group_by_length: bool = option(True, "batch texts of similar length together (less padding)")
    progress: bool = option(True, "show a progress bar on a terminal")
    plots: bool = option(True, "loss and dev Spearman curves in <output-dir>/plots (matplotlib)")
    push_to_hub: str | None = option(None, "upload the final model to this hub repo (user/name)")
    gather_across_devices: bool = option(
        False, "in-batch negatives from every device's batch (all-gather, multi-device runs)"
    )
    gradcache_chunk_size: int | None = option(
        None, "GradCache: embed the batch this many examples at a time (memory of one chunk)"
    )
    streaming: bool = option(
        False, "stream a .jsonl/.csv/.tsv file instead of loading it (needs --max-steps)"
    )
    shuffle_buffer: int = option(10_000, "examples in the streaming shuffle buffer")
    dataloader_workers: int = option(0, "data loading worker processes")
    dtype: str | None = option(
        None, "weight dtype: float32, bfloat16 or float16; default: the model's"
    )
    padding_side: str | None = option(None, "pad on the left or right; default: the model's")
    lora: bool = option(False, "train a LoRA adapter (peft) instead of all weights")
    lora_r: int = option(32, "LoRA rank")
    lora_alpha: float = option(32.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = option(0.1, "dropout on the LoRA input")
    lora_target_modules: str | None = option(
        None, "comma-separated module names to adapt; default: every linear layer"
    )
    merge_lora: bool = option(
        False, "save the final model with the adapter merged into its weights"
    )
    load_kbit: int | None = option(None, "load the backbone in 4 or 8 bits (QLoRA; CUDA only)")
    bidirectional_from: int | None = option(
        None, "decoder layers from this index on attend in both directions (Llama/Mistral/Qwen2)"
    )
    gguf_file: str | None = option(None, "load the backbone from this GGUF file inside --model")

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "batch_size",
            "gradient_accumulation_steps",
            "eval_steps",
            "save_steps",
            "logging_steps",
            "save_total_limit",
            "shuffle_buffer",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"max_steps must be -1 or >= 1, got {self.max_steps}")
        if self.max_steps == -1 and not self.epochs > 0:
            problems.append(f"epochs must be > 0, got {self.epochs}")
        if self.gradcache_chunk_size is not None and self.gradcache_chunk_size < 1:
            problems.append(f"gradcache_chunk_size must be >= 1, got {self.gradcache_chunk_size}")
        if self.dataloader_workers < 0:
            problems.append(f"dataloader_workers must be >= 0, got {self.dataloader_workers}")
        if self.streaming and self.max_steps == -1:
            problems.append("streaming data has no length: set max_steps")
        if self.bf16 and self.fp16:
            problems.append("choose bf16 or fp16, not both")
        try:
            if parse_sizes(self.dev_sizes) and not self.dev_data:
                problems.append("dev_sizes needs dev_data")
        except ValueError as err:
            problems.append(f"dev_sizes: {err}")
        if self.load_kbit is not None and not self.lora:
            problems.append("k-bit weights cannot be trained directly; add lora")
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
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    class AngleTrainer(Trainer):
        """A Trainer whose loss is the AnglE objective and whose metric is dev Spearman."""

        def __init__(
            self,
            *args: Any,
            angle_loss: AngleLoss | EspressoLoss,
            texts_per_example: int,
            lengths: list[int] | None,
            gather_across_devices: bool = False,
            gradcache_chunk_size: int | None = None,
            dev_sizes: tuple[tuple[int, int], ...] = (),
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            self.dev_sizes = dev_sizes
            self.angle_loss = angle_loss
            self.texts_per_example = texts_per_example
            self.lengths = lengths
            self.gather_across_devices = gather_across_devices
            self.gradcache_chunk_size = gradcache_chunk_size
            self._defer_rotation = False
            self.eval_seconds = 0.0
            self.dev_scores: dict[int, Any] = {}  # step -> full-size Correlation
            # bf16 compute: autocast, or weights loaded in bf16 (fixed for the whole run)
            self.bf16_compute = self.args.bf16 or self.model.backbone.dtype == torch.bfloat16
            self.frozen_casts = None
            if self.args.device.type == "cpu" and self.args.bf16:
                self.frozen_casts = FrozenWeightCasts(self.model.backbone, torch.bfloat16)

        def objective(self, rows: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
            """The AnglE loss of ``(N*K, D)`` embeddings (``(L, N*K, D)`` per layer for ESE),
            over all devices' batches if asked."""
            emb = rows.unflatten(-2, (-1, self.texts_per_example))  # ([L,] N, K, D)
            if self.gather_across_devices:
                emb, labels = gather_batch(emb, labels)  # (sum_r N_r, K, D)
            return self.angle_loss(emb, labels)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels", None)
            layerwise = getattr(self.angle_loss, "layerwise", False)
            emb = model(**inputs, all_layers=layerwise)  # (N*K, D), or (L, N*K, D) layerwise
            loss = self.objective(emb, labels)
            return (loss, emb) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            length = inputs["attention_mask"].shape[-1]
            casts = self.frozen_casts
            with (
                attention_kernels(self.args.device, self.bf16_compute, length),
                casts.swapped_in() if casts else contextlib.nullcontext(),
            ):
                return self._training_step(model, inputs, num_items_in_batch)

        def _training_step(self, model, inputs, num_items_in_batch):
            if self.gradcache_chunk_size is None:
                return super().training_step(model, inputs, num_items_in_batch)
            model.train()
            inputs = self._prepare_inputs(inputs)
            labels = inputs.pop("labels", None)
            steps = self.current_gradient_accumulation_steps
            with self.compute_loss_context_manager():
                return gradcache_backward(
                    model,
                    inputs,
                    self.gradcache_chunk_size * self.texts_per_example,
                    lambda rows: self.objective(rows, labels) / steps,
                    backward=self.accelerator.backward,
                    no_sync=lambda: self.accelerator.no_sync(model),
                )

        def get_train_dataloader(self):
            if not isinstance(self.train_dataset, StreamingDataset):
                return super().get_train_dataloader()
            # The stream shards itself per device and worker: not wrapped by accelerate,
            # which would have every device read (or one device dispatch) the whole stream.
            from torch.utils.data import DataLoader

            self.train_dataset.devices = (self.args.process_index, self.args.world_size)
            return DataLoader(
                self.train_dataset,
                batch_size=self._train_batch_size,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
            )

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
            from anglekit.evaluation import evaluate_pairs, evaluate_sizes

            start = time.perf_counter()
            model: AnglE = self.accelerator.unwrap_model(self.model)
            dataset = eval_dataset or self.eval_dataset
            if not self.dev_sizes:
                corr = evaluate_pairs(_dev_encoder(model), dataset)
                self.dev_scores[self.state.global_step] = corr
                spearman, pearson, cells = corr.spearman, corr.pearson, {}
            else:  # the mean over the sizes decides which checkpoint is kept
                cells = evaluate_sizes(_dev_layers_encoder(model), dataset, self.dev_sizes)
                spearman = sum(c.spearman for c in cells.values()) / len(cells)
                pearson = sum(c.pearson for c in cells.values()) / len(cells)
            metrics = {
                f"{metric_key_prefix}_spearman": spearman,
                f"{metric_key_prefix}_pearson": pearson,
                **{
                    f"{metric_key_prefix}_spearman_{layers}x{dims}": corr.spearman
                    for (layers, dims), corr in cells.items()
                },
            }
            self.eval_seconds += time.perf_counter() - start
            logger.info(
                "step %d: dev spearman %.2f%s",
                self.state.global_step,
                spearman,
                f" (mean over {len(cells)} sizes)" if cells else "",
            )
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
                backbone = None
                if state_dict is not None:  # gathered by DeepSpeed ZeRO-3 / FSDP
                    backbone = {
                        k.removeprefix("backbone."): v
                        for k, v in state_dict.items()
                        if k.startswith("backbone.")
                    }
                model.save_pretrained(output_dir, backbone_state=backbone)

        def _save_optimizer_and_scheduler(self, output_dir):
            # The model save above renames a complete folder into place; files other processes
            # write into the checkpoint (optimizer shards, RNG states) must come after it.
            self.accelerator.wait_for_everyone()
            super()._save_optimizer_and_scheduler(output_dir)

        def _save_checkpoint(self, model, trial):
            # Rotation deletes old checkpoints: defer it until this one is marked complete.
            limit = self.args.save_total_limit
            self.args.save_total_limit = None
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.save_total_limit = limit
            self.accelerator.wait_for_everyone()  # sharded states are written by every rank
            if self.args.should_save:
                run_dir = self._get_output_dir(trial=trial)
                step = self.state.global_step
                mark_complete(Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}", step)
                rotate_checkpoints(
                    output_dir=run_dir,
                    save_total_limit=limit,
                    best_model_checkpoint=self.state.best_model_checkpoint,
                    use_mtime=True,
                )

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

    if hasattr(model.backbone, "peft_config"):  # a LoRA checkpoint holds the adapter only
        from anglekit.llm import load_adapter_weights

        load_adapter_weights(model.backbone, checkpoint)
        return
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
        ...              max_steps=200, bf16=True)
    """
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    train_kwargs, loss_kwargs, size_kwargs = split_options(options)
    if isinstance(model, str):
        train_kwargs["model"] = model
    if isinstance(train_data, str | Path):
        train_kwargs["train_data"] = str(train_data)
    opts = TrainOptions(**train_kwargs)
    if opts.bf16 is None:  # record what "auto" chose, for the summary and the model card
        opts = replace(opts, bf16=fast_bf16() and not opts.fp16)
    elif opts.bf16 and not torch.cuda.is_available():
        warn_if_bf16_emulated("bf16=False, --no-bf16")
    loss = AngleLoss(LossConfig(**loss_kwargs))
    size = EspressoConfig(**size_kwargs)
    objective = EspressoLoss(loss, size) if size.active else loss
    if getattr(objective, "layerwise", False) and (
        opts.gradcache_chunk_size is not None or opts.gather_across_devices
    ):
        raise ValueError(
            "ese trains on every layer's embeddings, which gradcache_chunk_size and "
            "gather_across_devices do not carry; use them without ese (matryoshka_dims works)"
        )
    if opts.push_to_hub:
        from anglekit.hub import check_can_push

        check_can_push(opts.push_to_hub)  # fail now, not after training
    torch.manual_seed(opts.seed)

    if opts.streaming and isinstance(train_data, TrainData):
        raise ValueError("streaming reads a file: give train_data as a path, not TrainData")
    if opts.streaming:
        data = None
    elif isinstance(train_data, TrainData):
        data = train_data
    else:
        data = load_train_data(opts.train_data, column_map=opts.column_map)
    dev = load_sts(opts.dev_data) if opts.dev_data else None
    loading = (
        "pooling", "max_length", "prompt", "dtype", "padding_side", "load_kbit",
        "bidirectional_from", "gguf_file",
    )  # fmt: skip
    if isinstance(model, AnglE):
        ignored = [n for n in loading if getattr(opts, n) is not None]
        if ignored:
            raise ValueError(
                f"{', '.join(ignored)} only apply when fit loads the model; the AnglE object "
                "given carries its own (set them with AnglE.from_pretrained)"
            )
    else:
        model = AnglE.from_pretrained(opts.model, **{n: getattr(opts, n) for n in loading})
    if opts.lora or hasattr(model.backbone, "peft_config"):
        from anglekit.llm import LoraSettings, prepare_lora_training

        settings = LoraSettings(
            r=opts.lora_r,
            alpha=opts.lora_alpha,
            dropout=opts.lora_dropout,
            target_modules=LoraSettings.parse_targets(opts.lora_target_modules),
        )
        prepare_lora_training(model, settings, opts.gradient_checkpointing)
    if opts.fp16:
        _check_fp16_trainable(model)
    dev_sizes = parse_sizes(opts.dev_sizes) if dev is not None else ()
    _check_sizes(model, dev_sizes)
    use_fast_dropout(model.backbone)
    if data is None:
        dataset = StreamingDataset(
            opts.train_data,
            training_tokenizer(model),
            column_map=opts.column_map,
            seed=opts.seed,
            shuffle_buffer=opts.shuffle_buffer,
        )
        data_fmt, data_source, n_examples = dataset.format, dataset.source, None
        logger.info("streaming %s examples from %s", data_fmt.value, data_source)
        if data_fmt.has_label:  # the label scale, from the rows of one shuffle buffer
            head = itertools.islice(dataset.examples(), opts.shuffle_buffer)
            loss.config = _place_ibn_threshold([ex.label for ex in head], loss.config)
    else:
        if data.format.has_label:
            labels = [ex.label for ex in data.examples]
            loss.config = _place_ibn_threshold(labels, loss.config)
        dataset = TokenizedDataset(data, training_tokenizer(model), seed=opts.seed)
        data_fmt, data_source, n_examples = data.format, data.source, len(data)
        logger.info("training on %d %s examples from %s", len(data), data_fmt.value, data_source)

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
        dataloader_num_workers=opts.dataloader_workers,
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
        texts_per_example=len(data_fmt.text_fields),
        gather_across_devices=opts.gather_across_devices,
        gradcache_chunk_size=opts.gradcache_chunk_size,
        dev_sizes=dev_sizes,
        eval_dataset=dev,
        lengths=dataset.lengths() if opts.group_by_length and data is not None else None,
    )
    if opts.gradcache_chunk_size is not None and trainer.is_deepspeed_enabled:
        raise ValueError(
            "gradcache_chunk_size runs several backward passes per step, which DeepSpeed does "
            "not allow; use DDP or FSDP with GradCache"
        )
    if dev is not None and _shards_parameters(trainer):
        raise ValueError(
            "dev evaluation encodes with the whole model in each process, which DeepSpeed "
            "ZeRO-3 and FSDP shard across processes: train with --dev-data none and score the "
            "saved model with `anglekit eval`"
        )
    trainer.remove_callback(PrinterCallback)  # the library logs; it does not print
    if not show_progress:
        trainer.remove_callback(ProgressCallback)
    trainer.add_callback(log_callback())
    resume = None
    if opts.resume:
        resume = last_complete_checkpoint(out, remove_incomplete=args.should_save)
        trainer.accelerator.wait_for_everyone()
    if opts.resume and resume is None:
        logger.warning("--resume: no checkpoint in %s, starting from scratch", out)
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    source = data_source if isinstance(train_data, TrainData) else opts.train_data
    data_info = {"source": source, "format": data_fmt.value, "examples": n_examples}
    model.card_data = _card_for_run(model, opts, loss, data_fmt, data_info, dev, args)
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
    main_process = trainer.is_world_process_zero()  # under torchrun, only it writes files
    if opts.merge_lora:
        from anglekit.llm import merge_lora

        model.backbone = merge_lora(model.backbone)
    trainer.save_model(str(final))  # every process: sharded engines gather the weights
    seconds = output.metrics["train_runtime"] - trainer.eval_seconds
    examples = trainer.state.global_step * global_batch_size(opts, args.world_size)
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
        "data": {"source": data_source, "format": data_fmt.value, "examples": n_examples},
    }
    if main_process:
        with atomic_file(out / SUMMARY_FILE) as f:
            f.write(json.dumps(summary, indent=2) + "\n")
        logger.info("saved the final model to %s", final)
    if opts.plots and main_process:
        from anglekit.plots import write_training_plots

        write_training_plots(trainer.state.log_history, out / "plots")
    if opts.push_to_hub and main_process:
        from anglekit.hub import push_to_hub

        push_to_hub(final, opts.push_to_hub)
    trainer.accelerator.wait_for_everyone()  # the final model exists when any process returns
    return result


def global_batch_size(opts: TrainOptions, world_size: int) -> int:
    """Examples per optimizer step over all devices."""
    return opts.batch_size * opts.gradient_accumulation_steps * world_size


def _shards_parameters(trainer: Any) -> bool:
    """Whether the engine splits the weights across processes (ZeRO-3, FSDP)."""
    if trainer.is_fsdp_enabled:
        return True
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def training_tokenizer(model: AnglE) -> Callable[[list[str]], list[list[int]]]:
    """Token ids of training texts: with the model's default prompt, as ``encode`` applies it."""
    template = model.template()
    return lambda texts: model.tokenize(texts, template)


def _dev_encoder(model: AnglE):
    """How dev sets are encoded, in training and after it (as ``anglekit eval`` does)."""
    return lambda texts: model.encode(texts, batch_size=64, normalize=True, show_progress=False)


def _dev_layers_encoder(model: AnglE):
    """Dev embeddings of every depth, for ``dev_sizes``."""
    return lambda texts: model.encode(texts, batch_size=64, show_progress=False, all_layers=True)


def _check_sizes(model: AnglE, sizes: tuple[tuple[int, int], ...]) -> None:
    depth, width = num_layers(model.backbone), model.hidden_size
    bad = [f"{layers}x{dims}" for layers, dims in sizes if layers > depth or dims > width]
    if bad:
        raise ValueError(
            f"dev_sizes {', '.join(bad)} exceed this model's {depth} layers x {width} dims"
        )


def _card_for_run(
    model: AnglE,
    opts: TrainOptions,
    loss: AngleLoss,
    data_format: DataFormat,
    data_info: dict[str, Any],
    dev: Any,
    args: Any,
) -> CardData:
    """The model card data of a run: its options, loss, data; results are added at the end."""
    options = training_options(asdict(opts), evaluating=dev is not None)
    if not opts.streaming:
        options.pop("shuffle_buffer", None)
    options["optimizer"] = str(getattr(args.optim, "value", args.optim))
    options["lr_scheduler"] = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    options["effective_batch_size"] = global_batch_size(opts, args.world_size)
    # Which terms apply to this data format, asked of the loss itself on a random batch.
    probe = torch.randn(2, len(data_format.text_fields), 4, generator=torch.Generator())
    labels = torch.tensor([0.0, 1.0]) if data_format.has_label else None
    data_info = dict(data_info)
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


def _check_fp16_trainable(model: AnglE) -> None:
    """fp16 mixed precision scales the loss and unscales float32 gradients; torch refuses to
    unscale float16 ones, so float16 weights can be trained only through a LoRA adapter
    (whose weights peft keeps in float32)."""
    half = [
        name
        for name, p in model.backbone.named_parameters()
        if p.requires_grad and p.dtype == torch.float16
    ]
    if half:
        raise ValueError(
            f"fp16 mixed precision trains float32 weights, but {len(half)} trainable "
            f"parameters are float16 (first: {half[0]}); load the model with "
            "dtype='float32', or train a LoRA adapter (lora=True)"
        )


def _place_ibn_threshold(labels: Sequence[float], loss: LossConfig) -> LossConfig:
    """Put an unset ``ibn_threshold`` on the scale of the training labels, and say so when
    a threshold the user set makes most graded pairs in-batch positives."""
    if loss.ibn_threshold is None:
        placed = loss.for_labels(labels)
        logger.info("in-batch positives: labels >= %.3g", placed.ibn_threshold)
        return placed
    top = max(labels)
    positives = sum(y >= loss.ibn_threshold for y in labels) / len(labels)
    if loss.ibn_w and top > 1 and positives > 0.5:
        logger.warning(
            "labels reach %.3g but ibn_threshold=%.3g makes %.0f%% of pairs in-batch positives; "
            "for 0-5 STS scores set it to about 4, or leave it unset to place it on the labels",
            top,
            loss.ibn_threshold,
            100 * positives,
        )
    return loss
