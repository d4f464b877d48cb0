"""Fine-tunes all-MiniLM-L6-v2 on STS-B train with angle-emb's own API and AngleLoss.

Runs inside ``bench/.venvs/angle-emb`` (angle-emb 0.6.1) with ``bench/`` on PYTHONPATH;
started by ``bench/train_bench.py``. Prints one JSON object on its last stdout line.

angle-emb 0.6.x has no ``AngleDataTokenizer``: ``AnglE.fit`` takes the raw
``text1/text2/label`` dataset and tokenizes in its data collator (``max_length`` from
``from_pretrained``). Its ``fit`` defaults to ``warmup_steps=1000``, which at 200 steps
would never reach the target learning rate, so the warmup is passed explicitly (the
same value every system gets). Checkpointing is off so the timed call trains only.
"""

from __future__ import annotations

import tempfile
import time

import _common


def main() -> None:
    """Scores, fine-tunes and rescores the model, then prints the result as JSON."""
    args = _common.train_worker_parser(__doc__.splitlines()[0]).parse_args()
    _common.setup_torch(args.threads, args.seed)

    import torch
    from angle_emb import AnglE
    from datasets import Dataset

    angle = AnglE.from_pretrained(
        str(args.model), pooling_strategy="avg", max_length=args.max_length, train_mode=True
    )
    dtype = next(angle.backbone.parameters()).dtype
    if dtype != torch.float32:
        raise RuntimeError(f"expected float32 weights for an fp32 run, got {dtype}")

    def encode(texts: list[str]) -> object:
        # angle-emb's encode runs one forward over its whole input; batch it like fit does.
        import numpy as np

        chunks = [texts[i : i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
        return np.concatenate([angle.encode(chunk) for chunk in chunks])

    before = _common.stsb_test_spearman(encode, args.test_data)

    pairs = _common.load_pairs(args.train_data)
    train_ds = Dataset.from_dict(
        {
            "text1": [p.text1 for p in pairs],
            "text2": [p.text2 for p in pairs],
            "label": [p.label for p in pairs],
        }
    )
    with tempfile.TemporaryDirectory(prefix="angle-emb-") as output_dir:
        start = time.perf_counter()
        angle.fit(
            train_ds,
            output_dir=output_dir,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            warmup_steps=args.warmup_steps,
            logging_steps=20,
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
        )
        train_seconds = time.perf_counter() - start

    after = _common.stsb_test_spearman(encode, args.test_data)
    _common.emit_result(
        {
            "system": "angle-emb",
            "loss": "AngleLoss(cosine_w=1, ibn_w=1, angle_w=0.02)",
            "before": before,
            "after": after,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "train_seconds": train_seconds,
            "train_pairs_per_s": args.steps * args.batch_size / train_seconds,
            "versions": _common.package_versions("angle_emb", "torch", "transformers"),
        }
    )


if __name__ == "__main__":
    main()
