"""Encoding throughput of anglekit's ``AnglE.encode`` (torch or ONNX backend) on STS-B.

Runs inside the project venv (``.venv``) with ``bench/`` on PYTHONPATH; started by
``bench/encode_bench.py``. It lives beside the peer workers because it is run the same
way, in its own process. Prints one JSON object on its last stdout line.
"""

from __future__ import annotations

import _common

DTYPES = ("float32", "bfloat16")


def main() -> None:
    """Loads the packaged model with mean pooling and times ``AnglE.encode``."""
    parser = _common.encode_worker_parser(__doc__.splitlines()[0])
    parser.add_argument("--system", required=True, help="row name in the report")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    parser.add_argument("--quantize", choices=("int8",), default=None)
    parser.add_argument(
        "--max-tokens-per-batch", type=int, default=None, help="token budget instead of batch"
    )
    args = parser.parse_args()
    _common.setup_torch(args.threads)

    from anglekit import AnglE

    kwargs = {"dtype": args.dtype} if args.dtype != "float32" else {}
    if args.backend == "onnx":
        kwargs.update(backend="onnx", quantize=args.quantize)
    model = AnglE.from_pretrained(str(args.model), pooling="mean", **kwargs)
    batching = (
        {"max_tokens_per_batch": args.max_tokens_per_batch}
        if args.max_tokens_per_batch
        else {"batch_size": args.batch_size}
    )

    def encode(texts: list[str]) -> object:
        return model.encode(texts, show_progress=False, **batching)

    _common.run_encode_worker(
        args,
        encode,
        system=args.system,
        dtype=args.dtype,
        backend=args.backend,
        quantize=args.quantize,
        **batching,
        versions=_common.package_versions("anglekit", "torch", "transformers", "onnxruntime"),
    )


if __name__ == "__main__":
    main()
