"""Fine-tunes all-MiniLM-L6-v2 on STS-B train with sentence-transformers' AnglE or CoSENT loss.

Runs inside ``bench/.venvs/st`` with ``bench/`` on PYTHONPATH; started by
``bench/train_bench.py``. Labels are scaled to 0-1 (label / 5) as sentence-transformers
expects. The timed region is trainer construction plus ``train()``, the counterpart of
angle-emb's ``fit`` call. Prints one JSON object on its last stdout line.
"""

from __future__ import annotations

import tempfile
import time

import _common

LOSSES = ("AnglELoss", "CoSENTLoss")


def main() -> None:
    """Scores, fine-tunes and rescores the model, then prints the result as JSON."""
    parser = _common.train_worker_parser(__doc__.splitlines()[0])
    parser.add_argument("--loss", choices=LOSSES, required=True)
    args = parser.parse_args()
    _common.setup_torch(args.threads, args.seed)

    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer import losses

    model = SentenceTransformer(str(args.model), device="cpu")
    model.max_seq_length = args.max_length
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise RuntimeError(f"expected float32 weights for an fp32 run, got {dtype}")

    def encode(texts: list[str]) -> object:
        return model.encode(texts, batch_size=args.batch_size, show_progress_bar=False)

    before = _common.stsb_test_spearman(encode, args.test_data)

    pairs = _common.load_pairs(args.train_data)
    train_ds = Dataset.from_dict(
        {
            "sentence1": [p.text1 for p in pairs],
            "sentence2": [p.text2 for p in pairs],
            "score": [p.label / 5.0 for p in pairs],
        }
    )
    with tempfile.TemporaryDirectory(prefix="st-") as output_dir:
        training_args = SentenceTransformerTrainingArguments(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            warmup_steps=args.warmup_steps,
            lr_scheduler_type="linear",
            seed=args.seed,
            fp16=False,
            bf16=False,
            use_cpu=True,
            save_strategy="no",
            eval_strategy="no",
            logging_steps=20,
            report_to="none",
            disable_tqdm=True,
        )
        start = time.perf_counter()
        trainer = SentenceTransformerTrainer(
            model=model,
            args=training_args,
            train_dataset=train_ds,
            loss=getattr(losses, args.loss)(model),
        )
        trainer.train()
        train_seconds = time.perf_counter() - start

    after = _common.stsb_test_spearman(encode, args.test_data)
    _common.emit_result(
        {
            "system": f"sentence-transformers {args.loss}",
            "loss": args.loss,
            "before": before,
            "after": after,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "train_seconds": train_seconds,
            "train_pairs_per_s": args.steps * args.batch_size / train_seconds,
            "versions": _common.package_versions("sentence-transformers", "torch", "transformers"),
        }
    )


if __name__ == "__main__":
    main()
