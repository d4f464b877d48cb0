"""Fine-tunes SmolLM2 with a LoRA adapter through anglekit's ``fit``; scores STS-B test.

Runs in the project venv with ``bench/`` on PYTHONPATH; started by ``bench/llm_bench.py``.
Prints one JSON object on its last stdout line.
"""

from __future__ import annotations

import _common
import _llm


def main() -> None:
    """Scores (zero-shot, when asked), fine-tunes, rescores; prints the result as JSON."""
    args = _llm.worker_parser(__doc__.splitlines()[0]).parse_args()
    _common.setup_torch(args.threads, args.seed)
    import tempfile

    from anglekit import AnglE, Prompts, fit

    precision = {"auto": None, "fp32": False, "bf16": True}[args.precision]
    angle = AnglE.from_pretrained(
        str(args.model),
        pooling="last",
        prompt=Prompts.A,
        max_length=args.max_length,
        dtype="float32",
        device="cpu",
    )

    def encode(texts: list[str]):
        return angle.encode(texts, batch_size=32, show_progress=False)

    before = _llm.stsb_score(encode, args.test_data, args.test_limit) if args.zero_shot else None
    with tempfile.TemporaryDirectory(prefix="anglekit-llm-") as output_dir:
        result = fit(
            angle,
            str(args.train_data),
            dev_data=None,
            output_dir=output_dir,
            max_steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            warmup_steps=args.warmup_steps,
            seed=args.seed,
            bf16=precision,
            lora=True,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            gradient_checkpointing=args.gradient_checkpointing,
            cosine_w=1.0,
            ibn_w=1.0,
            angle_w=0.02,
            # STS-B labels run 0-5: only pairs scored >= 4 count as in-batch positives.
            ibn_threshold=4.0 if args.task == "stsb" else 0.5,
            plots=False,
            progress=False,
            logging_steps=10,
        )
    after = _llm.stsb_score(encode, args.test_data, args.test_limit)
    _common.emit_result(
        {
            "system": "anglekit",
            "task": args.task,
            "precision": args.precision,
            "gradient_checkpointing": args.gradient_checkpointing,
            "before": before,
            "after": after,
            "steps": result.steps,
            "batch_size": args.batch_size,
            "train_seconds": result.train_seconds,
            "train_pairs_per_s": result.train_examples_per_s,
            "versions": _common.package_versions("anglekit", "torch", "transformers", "peft"),
        }
    )


if __name__ == "__main__":
    main()
