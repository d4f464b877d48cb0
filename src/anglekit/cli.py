"""The ``anglekit`` command: ``train``, ``eval``, ``encode``, ``export`` and ``push``.

``main(argv)`` returns the exit code, so tests call it in-process. Training flags are built
from :class:`~anglekit.training.TrainOptions` and :class:`~anglekit.losses.LossConfig`, the
same definitions ``fit`` takes, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from anglekit._files import atomic_file

__all__ = ["main"]

logger = logging.getLogger("anglekit")

TRAIN_EXAMPLES = """examples:
  anglekit train                                   # all-MiniLM-L6-v2 on bundled STS-B
  anglekit train --model bert-base-uncased --pooling cls --train-data pairs.jsonl \\
      --dev-data stsb:dev --epochs 1 --bf16 --ibn-threshold 4
  anglekit train --train-data nli.triplets.jsonl --column-map anchor=query \\
      --max-steps 1000 --batch-size 64 --output-dir runs/nli --resume
  torchrun --nproc-per-node 8 -m anglekit train --train-data big.jsonl --streaming \\
      --max-steps 50000 --batch-size 512 --gradcache-chunk-size 64 --gather-across-devices
  anglekit train --model Qwen/Qwen2-0.5B --lora --lora-r 32 --prompt A --pooling last \\
      --learning-rate 2e-4 --train-data nli.triplets.jsonl   # an LLM with a LoRA adapter
  anglekit train --ese --ese-compression-size 64 --pooling mean   # good at 2 layers x 64 dims
"""
EVAL_EXAMPLES = """examples:
  anglekit eval sentence-transformers/all-MiniLM-L6-v2 runs/anglekit/model   # STS-B test
  anglekit eval runs/anglekit/model --data ~/SentEval/data/downstream --json results.json
  anglekit eval runs/anglekit/model --data my_sts.csv
  anglekit eval runs/anglekit/model --update-card --plot runs/anglekit/eval-plots
"""
ENCODE_EXAMPLES = """examples:
  anglekit encode runs/anglekit/model --input texts.txt --output vecs.npy
  cat texts.txt | anglekit encode runs/anglekit/model --output vecs.jsonl --normalize
  anglekit encode runs/ese/model --layers 2 --embedding-size 64 --input texts.txt --output v.npy
"""
SERVE_EXAMPLES = """examples:
  anglekit serve runs/anglekit/model                  # http://127.0.0.1:8000/v1/embeddings
  ANGLEKIT_API_KEY=secret anglekit serve runs/anglekit/model --host 0.0.0.0 --port 8080
  anglekit serve all-MiniLM-L6-v2 --max-wait-ms 2 --max-batch-size 128 --dtype bfloat16
"""
EXPORT_EXAMPLES = """examples:
  anglekit export onnx runs/anglekit/model runs/anglekit/onnx          # float32 graph
  anglekit export onnx runs/anglekit/model runs/anglekit/onnx-int8 --int8
  anglekit export st runs/anglekit/model runs/anglekit/st   # SentenceTransformer(folder)
"""
PUSH_EXAMPLES = """examples:
  hf auth login                                    # once, or set HF_TOKEN
  anglekit push runs/anglekit/model my-user/minilm-angle-stsb
  anglekit push runs/anglekit/model my-org/minilm-angle --private
"""


def _annotation_type(annotation: str) -> type:
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if name in annotation.split(" | "):
            return kind
    return str


def _optional(kind: type):
    def parse(value: str) -> Any:
        return None if value.lower() == "none" else kind(value)

    parse.__name__ = kind.__name__
    return parse


def add_options(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """Add one ``--flag`` per dataclass field, typed and documented from the field."""
    group = parser.add_argument_group(title)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        kind = _annotation_type(str(f.type))
        help_text = f.metadata.get("help", "") + f" (default: {default})"
        if kind is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            parse = _optional(kind) if "None" in str(f.type) else kind
            group.add_argument(
                flag, type=parse, default=default, help=help_text, metavar=f.name.upper()
            )


def build_parser() -> argparse.ArgumentParser:
    """The ``anglekit`` argument parser."""
    from anglekit import __version__
    from anglekit.espresso import EspressoConfig
    from anglekit.export import ExportFormat
    from anglekit.losses import LossConfig
    from anglekit.model import DTYPES
    from anglekit.quantization import Precision
    from anglekit.training import TrainOptions

    parser = argparse.ArgumentParser(
        prog="anglekit", description="Train, evaluate and apply AnglE text embeddings."
    )
    parser.add_argument("--version", action="version", version=f"anglekit {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only print errors and results")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    train = sub.add_parser(
        "train",
        help="fine-tune with the AnglE objective",
        epilog=TRAIN_EXAMPLES,
        formatter_class=fmt,
    )
    add_options(train, TrainOptions, "training")
    add_options(train, LossConfig, "loss (see anglekit.losses)")
    add_options(train, EspressoConfig, "fewer layers and dimensions (see anglekit.espresso)")

    ev = sub.add_parser(
        "eval", help="Spearman x100 on STS tasks", epilog=EVAL_EXAMPLES, formatter_class=fmt
    )
    ev.add_argument("models", nargs="+", metavar="MODEL", help="model folders or hub ids")
    ev.add_argument(
        "--data",
        default="stsb:test",
        help="an STS-format file, or a folder with the STS12-16/STS-B/SICK-R suite "
        "(JSON Lines or SentEval layout) (default: bundled STS-B test)",
    )
    ev.add_argument("--json", type=Path, help="also write the results as JSON here")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="weight dtype for inference (default: as saved)",
    )
    ev.add_argument(
        "--plot",
        type=Path,
        metavar="DIR",
        help="write per-task scatter plots and a bar chart of the suite here "
        '(pip install "anglekit[plot]")',
    )
    ev.add_argument(
        "--update-card",
        action="store_true",
        help="record the printed results in each model's card (README.md); "
        "models must be folders saved by anglekit",
    )

    enc = sub.add_parser(
        "encode",
        help="embed texts to .npy or JSON Lines",
        epilog=ENCODE_EXAMPLES,
        formatter_class=fmt,
    )
    enc.add_argument("model", help="model folder or hub id")
    enc.add_argument("--input", default="-", help="text file, one text per line (- = stdin)")
    enc.add_argument("--output", type=Path, required=True, help="output .npy or .jsonl")
    enc.add_argument("--batch-size", type=int, default=None, help="texts per batch (default 32)")
    enc.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=None,
        help="fill length-sorted batches up to this many padded tokens instead of --batch-size",
    )
    enc.add_argument(
        "--precision",
        choices=[p.value for p in Precision],
        default=Precision.FLOAT32.value,
        help="output precision; int8/uint8 ranges come from the texts themselves",
    )
    enc.add_argument("--prompt", default=None, help="template with {text}, or A, B, C")
    enc.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None)
    enc.add_argument("--embedding-size", type=int, default=None)
    enc.add_argument("--layers", type=int, default=None, help="run only the first N layers")
    enc.add_argument("--dtype", choices=list(DTYPES), default=None)

    from anglekit.server import ServeOptions

    srv = sub.add_parser(
        "serve",
        help='OpenAI-compatible embedding server (pip install "anglekit[serve]")',
        epilog=SERVE_EXAMPLES,
        formatter_class=fmt,
    )
    srv.add_argument("model", help="model folder or hub id, loaded once at start")
    srv.add_argument("--dtype", choices=list(DTYPES), default=None)
    add_options(srv, ServeOptions, "server")
    export = sub.add_parser(
        "export",
        help="write an ONNX or sentence-transformers folder",
        epilog=EXPORT_EXAMPLES,
        formatter_class=fmt,
    )
    export.add_argument("format", choices=[f.value for f in ExportFormat], help="target")
    export.add_argument("model", help="model folder or hub id")
    export.add_argument("output", type=Path, help="folder to write (replaced atomically)")
    export.add_argument("--int8", action="store_true", help="onnx only: dynamic int8 quantisation")

    push = sub.add_parser(
        "push",
        help="upload a saved model folder to the Hugging Face Hub",
        epilog=PUSH_EXAMPLES,
        formatter_class=fmt,
    )
    push.add_argument("model_dir", metavar="MODEL_DIR", help="folder saved by anglekit")
    push.add_argument("repo_id", metavar="REPO_ID", help="hub repo, user/name or org/name")
    push.add_argument(
        "--private",
        action="store_true",
        default=None,
        help="create the repo private (default: the hub's default)",
    )
    push.add_argument(
        "--token", default=None, help="Hugging Face token (default: HF_TOKEN or hf auth login)"
    )
    return parser


def _train(args: argparse.Namespace) -> int:
    from anglekit.distributed import end_process_group
    from anglekit.training import OPTION_GROUPS, fit

    names = [f.name for group in OPTION_GROUPS for f in fields(group)]
    try:
        result = fit(**{name: getattr(args, name) for name in names})
    finally:
        end_process_group()
    line = f"model saved to {result.model_dir} ({result.steps} steps, "
    line += f"{result.train_examples_per_s:.1f} examples/s"
    if result.best_dev_spearman is not None:
        line += f", best dev Spearman {result.best_dev_spearman:.2f} at step {result.best_step}"
    if os.environ.get("RANK", "0") == "0":
        print(line + ")")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from anglekit.card import MEASURED_BY_EVAL, record_eval_in_folder
    from anglekit.config import CONFIG_NAME
    from anglekit.evaluation import format_table, load_tasks, results_to_json, run_suite
    from anglekit.model import AnglE

    if args.plot:
        from anglekit.plots import require_matplotlib

        require_matplotlib()
    if args.update_card:
        for name in args.models:
            if not (Path(name) / CONFIG_NAME).is_file():
                raise ValueError(
                    f"--update-card needs model folders saved by anglekit; {name} has no "
                    f"{CONFIG_NAME}"
                )
    datasets = load_tasks(args.data)
    progress = False if args.quiet else None  # None: only on a terminal
    rows, cards = [], []
    for name in args.models:
        model = AnglE.from_pretrained(name, dtype=args.dtype)

        def encode(texts: list[str], model: AnglE = model) -> Any:
            return model.encode(
                texts, batch_size=args.batch_size, normalize=True, show_progress=progress
            )

        result = run_suite(encode, datasets, keep_cosines=bool(args.plot), show_progress=progress)
        rows.append((name, result))
        cards.append(model.card_data)
    print(format_table(rows))
    if args.json:
        with atomic_file(args.json) as f:
            f.write(json.dumps(results_to_json(rows), indent=2) + "\n")
    if args.update_card:
        measured_by = MEASURED_BY_EVAL + (f" --dtype {args.dtype}" if args.dtype else "")
        for (name, result), card in zip(rows, cards, strict=True):
            record_eval_in_folder(name, card, result, args.data, measured_by=measured_by)
            logger.info("recorded the results in the card of %s", name)
    if args.plot:
        from anglekit.plots import eval_plots

        written = eval_plots(rows, datasets, args.plot)
        logger.info("wrote %d plots to %s", len(written), args.plot)
    return 0


def _encode(args: argparse.Namespace) -> int:
    import numpy as np

    from anglekit.model import AnglE

    if args.input == "-":
        lines = sys.stdin.read().splitlines()
    else:
        path = Path(args.input)
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
        lines = path.read_text(encoding="utf-8").splitlines()
    empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if empty:
        raise ValueError(f"{args.input}: line {empty[0]} is empty ({len(empty)} empty line(s))")
    suffix = args.output.suffix.lower()
    if suffix not in (".npy", ".jsonl"):
        raise ValueError(f"--output must end in .npy or .jsonl, got {args.output}")
    model = AnglE.from_pretrained(args.model, dtype=args.dtype, layers=args.layers)
    vecs = model.encode(
        lines,
        batch_size=args.batch_size,
        prompt=args.prompt,
        normalize=args.normalize,
        embedding_size=args.embedding_size,
        show_progress=False if args.quiet else None,
        max_tokens_per_batch=args.max_tokens_per_batch,
        precision=args.precision,
    )
    if suffix == ".npy":
        with atomic_file(args.output, "wb") as f:
            np.save(f, vecs)
    else:
        with atomic_file(args.output) as f:
            for text, vec in zip(lines, vecs, strict=True):
                f.write(json.dumps({"text": text, "embedding": vec.tolist()}) + "\n")
    logger.info("wrote %d embeddings of size %d to %s", len(lines), vecs.shape[1], args.output)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from anglekit.server import ServeOptions, serve

    options = ServeOptions(**{f.name: getattr(args, f.name) for f in fields(ServeOptions)})
    serve(args.model, options, dtype=args.dtype)
    return 0


def _export(args: argparse.Namespace) -> int:
    from anglekit.export import ExportFormat, export_onnx, export_sentence_transformers

    if ExportFormat(args.format) is ExportFormat.ST:
        if args.int8:
            raise ValueError("--int8 applies to onnx exports only")
        export_sentence_transformers(args.model, args.output)
    else:
        export_onnx(args.model, args.output, quantize="int8" if args.int8 else None)
    print(f"exported {args.model} to {args.output} ({args.format})")
    return 0


def _push(args: argparse.Namespace) -> int:
    from anglekit.hub import push_to_hub

    url = push_to_hub(args.model_dir, args.repo_id, private=args.private, token=args.token)
    print(f"pushed {args.model_dir} to {url}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``anglekit`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    other_rank = os.environ.get("RANK", "0") != "0"  # under torchrun, one process reports
    logging.basicConfig(
        level=logging.WARNING if args.quiet or other_rank else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.quiet and hasattr(args, "progress"):
        args.progress = False
    commands = {
        "train": _train,
        "eval": _eval,
        "encode": _encode,
        "export": _export,
        "serve": _serve,
        "push": _push,
    }
    command = commands[args.command]
    try:
        return command(args)
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as e:
        print(f"anglekit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"anglekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
