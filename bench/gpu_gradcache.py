"""One-GPU GradCache throughput: all-MiniLM-L6-v2 at a logical batch of 4096 pairs, bf16.

No DDP, no network: the packaged all-MiniLM-L6-v2 trains ``--steps`` optimizer steps of
``--batch`` generated, distinct scored pairs streamed from a JSON Lines file, embedded in
GradCache chunks of ``--chunk`` pairs under bf16 autocast, with in-batch negatives over the
whole logical batch. Reported: training pairs/s (all steps, the first included) and the peak
GPU memory torch allocated. Results go to ``bench/results/gpu_gradcache.json``.

Run it through ``bench/gpu_gradcache.sh`` (it sets the offline environment and a 10 minute
limit).

Example:
    bench/gpu_gradcache.sh                       # batch 4096, chunks of 512, 20 steps
    bench/gpu_gradcache.sh --chunk 1024 --steps 10
"""

from __future__ import annotations

import argparse
import json
import sys

import _common
import scale_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4096, help="logical batch (pairs)")
    parser.add_argument("--chunk", type=int, default=512, help="GradCache chunk (pairs)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--workers", type=int, default=4, help="data loading workers")
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch; this benchmark needs one", file=sys.stderr)
        return 2
    data = scale_bench.generate_pairs(args.batch * args.steps)  # every pair seen once
    options = {
        "model": str(_common.minilm_folder()),
        "train_data": str(data),
        "streaming": True,
        "max_steps": args.steps,
        "batch_size": args.batch,
        "gradcache_chunk_size": args.chunk,
        "bf16": True,
        "max_length": args.max_length,
        "dataloader_workers": args.workers,
        "learning_rate": 2e-5,
        "ibn_threshold": 4.0,
        "logging_steps": 5,
        "save_steps": 10**6,
    }
    torch.cuda.reset_peak_memory_stats()
    result = scale_bench.run_fit(options, evaluate=False)
    result.update(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        batch=args.batch,
        chunk=args.chunk,
        steps_requested=args.steps,
    )
    _common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (_common.RESULTS_DIR / "gpu_gradcache.json").write_text(json.dumps(result, indent=2) + "\n")
    if result["oom"]:
        print(f"out of GPU memory at chunk {args.chunk}: {result['error']}")
        return 1
    _common.print_table(
        ["device", "logical batch", "chunk", "steps", "pairs/s", "peak GPU MB"],
        [
            [
                result["device"],
                str(args.batch),
                str(args.chunk),
                str(result["steps"]),
                _common.fmt(result["pairs_per_s"], 0),
                _common.fmt(result["peak_gpu_mb"], 0),
            ]
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
