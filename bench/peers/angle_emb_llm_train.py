"""Fine-tunes SmolLM2 with a LoRA adapter through angle-emb 0.6.1; scores STS-B test.

Runs inside ``bench/.venvs/angle-emb`` with ``bench/`` on PYTHONPATH; started by
``bench/llm_bench.py``. ``is_llm=True``, ``apply_lora=True``, ``pooling_strategy='last'``,
fp32 (angle-emb's training default), Prompts.A on every text in training and evaluation.
Checkpointing is off so the timed call trains only. Prints one JSON object.
"""

from __future__ import annotations

import tempfile
import time

import _common
import _llm


def main() -> None:
    """Scores (zero-shot, when asked), fine-tunes, rescores; prints the result as JSON."""
    args = _llm.worker_parser(__doc__.splitlines()[0]).parse_args()
    _common.setup_torch(args.threads, args.seed)

    import numpy as np
    from angle_emb import AnglE, Prompts
    from datasets import Dataset

    angle = AnglE.from_pretrained(
        str(args.model),
        is_llm=True,
        apply_lora=True,
        pooling_strategy="last",
        max_length=args.max_length,
        train_mode=True,
        lora_config_kwargs={
            "r": args.lora_r,
            "lora_alpha": args.lora_alpha,
            "lora_dropout": args.lora_dropout,
        },
        device="cpu",
    )

    def encode(texts: list[str]):
        chunks = [texts[i : i + 32] for i in range(0, len(texts), 32)]
        return np.concatenate([angle.encode(chunk, prompt=Prompts.A) for chunk in chunks])

    before = _llm.stsb_score(encode, args.test_data, args.test_limit) if args.zero_shot else None
    rows = _llm.read_jsonl(args.train_data)
    columns = list(rows[0])
    train_ds = Dataset.from_dict({c: [r[c] for r in rows] for c in columns})
    prompts = (
        {"text_prompt": Prompts.A}
        if args.task == "stsb"
        else {"query_prompt": Prompts.A, "doc_prompt": Prompts.A}
    )
    with tempfile.TemporaryDirectory(prefix="angle-emb-llm-") as output_dir:
        start = time.perf_counter()
        angle.fit(
            train_ds,
            output_dir=output_dir,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            warmup_steps=args.warmup_steps,
            logging_steps=10,
            save_strategy="no",
            fp16=False,
            bf16=False,
            loss_kwargs={"cosine_w": 1.0, "ibn_w": 1.0, "angle_w": 0.02},
            argument_kwargs={
                "max_steps": args.steps,
                "seed": args.seed,
                "report_to": "none",
                "disable_tqdm": True,
                "use_cpu": True,
            },
            **prompts,
        )
        train_seconds = time.perf_counter() - start
    angle.backbone.eval()
    after = _llm.stsb_score(encode, args.test_data, args.test_limit)
    _common.emit_result(
        {
            "system": "angle-emb",
            "task": args.task,
            "before": before,
            "after": after,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "train_seconds": train_seconds,
            "train_pairs_per_s": args.steps * args.batch_size / train_seconds,
            "versions": _common.package_versions("angle_emb", "torch", "transformers", "peft"),
        }
    )


if __name__ == "__main__":
    main()
