"""Encoding throughput of anglekit's ``AnglE.encode`` (fp32 or bf16) on STS-B sentences.

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
    parser.add_argument("--dtype", choices=DTYPES, required=True)
    args = parser.parse_args()
    _common.setup_torch(args.threads)

    from anglekit import AnglE

    kwargs = {} if args.dtype == "float32" else {"dtype": args.dtype}
    model = AnglE.from_pretrained(str(args.model), pooling="mean", **kwargs)

    def encode(texts: list[str]) -> object:
        return model.encode(texts, batch_size=args.batch_size)

    _common.run_encode_worker(
        args,
        encode,
        system="anglekit" if args.dtype == "float32" else f"anglekit {args.dtype}",
        dtype=args.dtype,
        versions=_common.package_versions("anglekit", "torch", "transformers"),
    )


if __name__ == "__main__":
    main()
