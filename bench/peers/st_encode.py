"""Encoding throughput of sentence-transformers (torch fp32/bf16, ONNX fp32/int8) on STS-B.

Runs inside ``bench/.venvs/st`` (torch variants) or ``bench/.venvs/st-onnx`` (ONNX variants)
with ``bench/`` on PYTHONPATH; started by ``bench/encode_bench.py``. Prints one JSON object on
its last stdout line.

Variants, each the way the sentence-transformers documentation tells users to pick it:

- ``torch``: ``SentenceTransformer(folder, backend="torch")``, fp32 weights.
- ``bf16``: the same with ``model_kwargs={"torch_dtype": torch.bfloat16}``.
- ``onnx``: ``backend="onnx"`` on a copy of the folder (exported on load by optimum).
- ``onnx-int8``: ``export_dynamic_quantized_onnx_model(model, "avx512_vnni", copy)``, then
  ``backend="onnx"`` with ``file_name="onnx/model_qint8_avx512_vnni.onnx"``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import _common

VARIANTS = {
    "torch": "sentence-transformers",
    "bf16": "sentence-transformers bf16",
    "onnx": "sentence-transformers ONNX",
    "onnx-int8": "sentence-transformers ONNX int8",
}
INT8_FILE = "onnx/model_qint8_avx512_vnni.onnx"


def load(variant: str, folder: Path, scratch: Path):
    """The model for one variant; ONNX variants export into ``scratch``."""
    import torch
    from sentence_transformers import SentenceTransformer

    if variant in ("torch", "bf16"):
        dtype = torch.float32 if variant == "torch" else torch.bfloat16
        model = SentenceTransformer(
            str(folder), device="cpu", backend="torch", model_kwargs={"torch_dtype": dtype}
        )
        found = next(model.parameters()).dtype
        if found != dtype:
            raise RuntimeError(f"expected {dtype} weights, got {found}")
        return model
    copy = scratch / "model"
    shutil.copytree(folder, copy)
    model = SentenceTransformer(str(copy), device="cpu", backend="onnx")
    if variant == "onnx":
        return model
    from sentence_transformers import export_dynamic_quantized_onnx_model

    export_dynamic_quantized_onnx_model(model, "avx512_vnni", str(copy))
    return SentenceTransformer(
        str(copy), device="cpu", backend="onnx", model_kwargs={"file_name": INT8_FILE}
    )


def main() -> None:
    """Loads the packaged model in the chosen variant and times ``SentenceTransformer.encode``."""
    parser = _common.encode_worker_parser(__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, default="torch")
    args = parser.parse_args()
    _common.setup_torch(args.threads)

    with tempfile.TemporaryDirectory(prefix="st-encode-") as scratch:
        model = load(args.variant, args.model, Path(scratch))

        def encode(texts: list[str]) -> object:
            return model.encode(texts, batch_size=args.batch_size, show_progress_bar=False)

        _common.run_encode_worker(
            args,
            encode,
            system=VARIANTS[args.variant],
            variant=args.variant,
            max_seq_length=model.max_seq_length,
            versions=_common.package_versions(
                "sentence-transformers", "torch", "transformers", "optimum", "onnxruntime"
            ),
        )


if __name__ == "__main__":
    main()
