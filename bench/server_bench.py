"""Server benchmark: `anglekit serve` under load on loopback, with and without micro-batching.

For each system the driver starts `anglekit serve` on the packaged all-MiniLM-L6-v2
(127.0.0.1, a free port, its own process) and, at each concurrency level (default 1, 16
and 64 clients), runs a closed-loop load: every client sends a request, waits for the
answer, and sends the next. A request holds 1-32 STS-B sentences (uniform, drawn from the
first 2,000 distinct train sentences by a seeded generator, so both systems get the same
requests) and asks for base64 embeddings, as the OpenAI client does. A level stops
launching requests after ``--seconds`` or ``--max-requests``, whichever comes first.

Systems: ``batched`` (the default server: concurrent requests merged into shared forward
passes) and ``unbatched`` (``--no-batching``: one request per forward pass). Reported per
level: requests and texts per second, p50/p99 latency, errors (any non-200 answer or
transport failure) and the mean texts per forward pass from the server's ``/metrics``; the
``gain`` lines give batched over unbatched texts/s. Results go to
``bench/results/server_bench.json``, server logs to ``bench/results/logs/``.

The load generator runs in this process, beside the server: on a small machine it takes
CPU from the server, so compare systems within one run only.

Example:
    .venv/bin/python bench/server_bench.py                       # ~5 min
    .venv/bin/python bench/server_bench.py --only batched --concurrency 64
    .venv/bin/python bench/server_bench.py --concurrency 1,4 --seconds 3 --max-requests 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import _common

SYSTEMS = ("batched", "unbatched")
BENCH = "server_bench"
MODEL_NAME = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class LoadConfig:
    """The workload every system gets."""

    threads: int
    concurrency: tuple[int, ...] = (1, 16, 64)
    seconds: float = 30.0
    max_requests: int = 3000
    min_texts: int = 1
    max_texts: int = 32
    sentences: int = 2000
    encoding_format: str = "base64"
    max_wait_ms: float = 0.0
    max_batch_size: int = 64
    dtype: str | None = None
    seed: int = 0
    startup_timeout_s: float = 180.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`anglekit serve` in a subprocess, stopped on exit."""

    def __init__(self, system: str, config: LoadConfig) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "anglekit.cli", "-q", "serve", str(_common.minilm_folder()),
            "--port", str(self.port),
            "--model-name", MODEL_NAME,
            "--max-wait-ms", str(config.max_wait_ms),
            "--max-batch-size", str(config.max_batch_size),
            "--max-items", str(max(config.max_texts, 256)),
        ]  # fmt: skip
        if config.dtype:
            command += ["--dtype", config.dtype]
        if system == "unbatched":
            command.append("--no-batching")
        self.log = _common.log_path(BENCH, system).open("w", encoding="utf-8")
        print(f"[bench] $ {' '.join(command)}", file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(
            command,
            env=_common.worker_env(config.threads),
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.timeout = config.startup_timeout_s

    def wait_ready(self) -> None:
        """Poll ``/health`` until the model is loaded.

        Raises:
            RuntimeError: If the server exits or does not answer in time.
        """
        import httpx

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).json().get("status") == "ok":
                    return
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server did not answer /health within {self.timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def batch_counters(url: str) -> tuple[float, float]:
    """``(texts, forward passes)`` so far, from the server's ``/metrics``."""
    import httpx

    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("anglekit_batch_texts_sum", "anglekit_batch_texts_count"):
            values[name] = float(value)
    return values["anglekit_batch_texts_sum"], values["anglekit_batch_texts_count"]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (nearest rank) or ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def run_level(
    url: str, clients: int, sentences: list[str], config: LoadConfig
) -> dict[str, Any]:
    """Closed-loop load from ``clients`` concurrent clients; returns the level's numbers."""
    import httpx

    latencies: list[float] = []
    texts_done = 0
    errors: list[str] = []
    started = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    stop_at = time.perf_counter() + config.seconds

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal started, texts_done
        rng = random.Random(config.seed * 1_000_003 + index)
        while time.perf_counter() < stop_at and started < config.max_requests:
            started += 1
            count = rng.randint(config.min_texts, config.max_texts)
            body = {
                "input": rng.sample(sentences, count),
                "model": MODEL_NAME,
                "encoding_format": config.encoding_format,
            }
            begin = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/embeddings", json=body)
                ok = response.status_code == 200 and len(response.json()["data"]) == count
                if not ok:
                    errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as e:
                ok = False
                errors.append(f"{type(e).__name__}: {e}")
            if ok:
                latencies.append(time.perf_counter() - begin)
                texts_done += count

    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        begin = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - begin
    return {
        "clients": clients,
        "requests": len(latencies) + len(errors),
        "texts": texts_done,
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "texts_per_s": texts_done / wall,
        "p50_ms": None if not latencies else 1000 * percentile(latencies, 50),
        "p99_ms": None if not latencies else 1000 * percentile(latencies, 99),
        "errors": len(errors),
        "first_errors": errors[:3],
    }


def bench_system(system: str, config: LoadConfig) -> list[dict[str, Any]]:
    """Start the server for ``system`` and run every concurrency level against it."""
    pairs = _common.load_pairs(_common.stsb_path("train"))
    sentences = _common.unique_sentences(pairs, config.sentences)
    server = Server(system, config)
    rows = []
    try:
        server.wait_ready()
        warmup = replace(config, seconds=5.0, max_requests=10)
        asyncio.run(run_level(server.url, 2, sentences, warmup))
        for clients in config.concurrency:
            texts_before, passes_before = batch_counters(server.url)
            level = asyncio.run(run_level(server.url, clients, sentences, config))
            texts_after, passes_after = batch_counters(server.url)
            passes = passes_after - passes_before
            level["texts_per_pass"] = (texts_after - texts_before) / passes if passes else None
            status = "ok" if level["errors"] == 0 else "errors"
            rows.append(_common.result_row(f"{system} x{clients}", status, mode=system, **level))
            print(
                f"[bench] {system} x{clients}: {level['texts_per_s']:.0f} texts/s, "
                f"p50 {_common.fmt(level['p50_ms'], 0)} ms, errors {level['errors']}",
                file=sys.stderr,
                flush=True,
            )
    except (RuntimeError, OSError, ValueError) as e:
        rows.append(_common.result_row(system, "failed", mode=system, error=str(e)))
    finally:
        server.stop()
    return rows


def print_report(rows: Sequence[dict[str, Any]]) -> None:
    """Prints the table, the batching gain per level, and any failures."""
    headers = [
        "system",
        "requests",
        "req/s",
        "texts/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "texts/pass",
        "status",
    ]
    table = [
        [
            row["system"],
            str(row.get("requests", "-")),
            _common.fmt(row.get("requests_per_s"), 1),
            _common.fmt(row.get("texts_per_s"), 0),
            _common.fmt(row.get("p50_ms"), 0),
            _common.fmt(row.get("p99_ms"), 0),
            str(row.get("errors", "-")),
            _common.fmt(row.get("texts_per_pass"), 1),
            row["status"],
        ]
        for row in rows
    ]
    print()
    _common.print_table(headers, table)
    by_level: dict[int, dict[str, float]] = {}
    for row in rows:
        if "clients" in row:
            by_level.setdefault(row["clients"], {})[row["mode"]] = row["texts_per_s"]
    for clients, speeds in sorted(by_level.items()):
        gain = _common.ratio(speeds.get("batched"), speeds.get("unbatched"))
        if gain is not None:
            print(f"gain of micro-batching at {clients} clients: {gain:.2f}x texts/s")
    for row in rows:
        for error in row.get("first_errors", []):
            print(f"{row['system']}: {error}")
    _common.print_failures(rows)


def _levels(value: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {value}"
        ) from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1: {value}")
    return levels


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the selected systems and writes ``bench/results/server_bench.json``."""
    parser = _common.base_parser(__doc__, SYSTEMS)
    defaults = LoadConfig(threads=2)
    parser.add_argument(
        "--concurrency",
        type=_levels,
        default=defaults.concurrency,
        help="comma-separated client counts (default: 1,16,64)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=defaults.seconds,
        help=f"time limit per level (default: {defaults.seconds:g})",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=defaults.max_requests,
        help=f"request limit per level (default: {defaults.max_requests})",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=defaults.max_wait_ms,
        help=f"the server's batching wait (default: {defaults.max_wait_ms:g})",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="the server's weight dtype (default: as saved, float32)",
    )
    args = parser.parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    config = LoadConfig(
        threads=args.threads,
        concurrency=args.concurrency,
        seconds=args.seconds,
        max_requests=args.max_requests,
        max_wait_ms=args.max_wait_ms,
        dtype=args.dtype,
    )
    runners = {system: (lambda s=system: bench_system(s, config)) for system in SYSTEMS}
    return _common.run_benchmark(BENCH, config, args.only, runners, print_report)


if __name__ == "__main__":
    sys.exit(main())
