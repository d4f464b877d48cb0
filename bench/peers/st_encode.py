"""Encoding throughput of sentence-transformers (torch backend, fp32) on STS-B sentences.

Runs inside ``bench/.venvs/st`` with ``bench/`` on PYTHONPATH; started by
``bench/encode_bench.py``. Prints one JSON object on its last stdout line.
"""

from __future__ import annotations

import _common


def main() -> None:
    """Loads the packaged model as is and times ``SentenceTransformer.encode``."""
    args = _common.encode_worker_parser(__doc__.splitlines()[0]).parse_args()
    _common.setup_torch(args.threads)

    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(args.model), device="cpu", backend="torch")
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise RuntimeError(f"expected float32 weights, got {dtype}")

    def encode(texts: list[str]) -> object:
        return model.encode(texts, batch_size=args.batch_size, show_progress_bar=False)

    _common.run_encode_worker(
        args,
        encode,
        system="sentence-transformers",
        dtype="float32",
        max_seq_length=model.max_seq_length,
        versions=_common.package_versions("sentence-transformers", "torch", "transformers"),
    )


if __name__ == "__main__":
    main()
