"""The embedding server: OpenAI-compatible API, micro-batching, limits, auth, a real uvicorn."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from anglekit.model import AnglE  # noqa: E402
from anglekit.server import ServeOptions, create_app, require_serve  # noqa: E402

from .conftest import WORDS  # noqa: E402

QUERY = "query: {text}"
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def angle(tiny_bert) -> AnglE:
    """The tiny BERT with a saved-style ``query`` prompt."""
    return AnglE.from_pretrained(str(tiny_bert), prompts={"query": QUERY}, device="cpu")


@contextmanager
def served(angle: AnglE, **options):
    """An in-process client of a fresh app (lifespan, hence the batcher, running)."""
    app = create_app(angle, ServeOptions(model_name="tiny", **options))
    with TestClient(app) as client:
        yield client


@pytest.fixture
def client(angle):
    with served(angle) as c:
        yield c


def metric_samples(client: TestClient, **headers: str) -> dict[tuple, float]:
    """``{(name, sorted label items): value}`` parsed from ``/metrics``."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def expected(angle: AnglE, texts: list[str], dims: int | None = None, **kwargs) -> np.ndarray:
    """What the API must return: encode, truncate, then normalise."""
    full = angle.encode(texts, normalize=False, **kwargs)[:, :dims]
    return full / np.linalg.norm(full, axis=1, keepdims=True)


class Gate:
    """Holds the model's worker thread inside ``encode`` until released."""

    def __init__(self, angle: AnglE, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        original = angle.encode

        def encode(*args, **kwargs):
            self.started.set()
            assert self.release.wait(30), "the test never released the gate"
            return original(*args, **kwargs)

        monkeypatch.setattr(angle, "encode", encode)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_embeddings_float_matches_encode(client, angle):
    """A list input gets OpenAI's response shape, unit vectors equal to encode's, token usage."""
    texts = WORDS[:3]
    r = client.post("/v1/embeddings", json={"input": texts, "model": "tiny"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "tiny"
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in body["data"])
    got = np.array([d["embedding"] for d in body["data"]])
    np.testing.assert_allclose(got, expected(angle, texts), atol=1e-5)
    tokens = sum(len(ids) for ids in angle.tokenize(texts))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_single_string_and_base64_round_trip(client):
    """A string input gives one row; base64 decodes (little-endian float32) to the floats."""
    floats = client.post("/v1/embeddings", json={"input": WORDS[0]}).json()
    assert len(floats["data"]) == 1
    b64 = client.post("/v1/embeddings", json={"input": WORDS[0], "encoding_format": "base64"})
    raw = base64.b64decode(b64.json()["data"][0]["embedding"])
    decoded = np.frombuffer(raw, dtype="<f4")
    np.testing.assert_allclose(decoded, floats["data"][0]["embedding"], rtol=1e-6, atol=1e-7)


def test_dimensions_truncate_then_renormalise(client, angle):
    """dimensions keeps the first k components of the raw embedding, rescaled to length 1."""
    r = client.post("/v1/embeddings", json={"input": WORDS[:2], "dimensions": 8})
    got = np.array([d["embedding"] for d in r.json()["data"]])
    assert got.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(got, expected(angle, WORDS[:2], dims=8), atol=1e-5)


def test_prompt_name_uses_saved_prompt(client, angle):
    """prompt_name applies the model's named template; an unknown name lists the known ones."""
    r = client.post("/v1/embeddings", json={"input": [WORDS[0]], "prompt_name": "query"})
    got = np.array(r.json()["data"][0]["embedding"])
    np.testing.assert_allclose(got, expected(angle, [WORDS[0]], prompt_name="query")[0], atol=1e-5)
    assert np.abs(got - expected(angle, [WORDS[0]])[0]).max() > 1e-4  # the prompt changed it
    bad = client.post("/v1/embeddings", json={"input": "x", "prompt_name": "passage"})
    assert bad.status_code == 400
    assert (
        "'passage'" in bad.json()["error"]["message"] and "query" in bad.json()["error"]["message"]
    )


def test_similarity_matches_model(client, angle):
    """/v1/similarity scores each pair by cosine, as AnglE.similarity does."""
    pairs = [[WORDS[0], WORDS[1]], [WORDS[2], WORDS[2]]]
    r = client.post("/v1/similarity", json={"pairs": pairs})
    assert r.status_code == 200, r.text
    scores = [d["similarity"] for d in r.json()["data"]]
    assert scores[0] == pytest.approx(angle.similarity(WORDS[0], WORDS[1]), abs=1e-5)
    assert scores[1] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b'{"input": ["a",', 400, "not valid JSON"),
        (b'["a", "b"]', 422, "valid dictionary"),
        (b'{"input": 5}', 422, "input"),
        (b'{"input": [1, 2, 3]}', 422, "token-id arrays are not supported"),
        (b'{"input": [[1, 2], [3]]}', 422, "token-id arrays are not supported"),
        (b'{"input": ["a", 7]}', 422, "input.1"),
        (b'{"input": ["a", ""]}', 400, "input[1] is empty"),
        (b'{"input": ["a", "   "]}', 400, "input[1] is empty"),
        (b'{"input": []}', 400, "empty list"),
        (b'{"input": "a", "colour": "red"}', 422, "colour"),
        (b'{"input": "a", "encoding_format": "int8"}', 422, "encoding_format"),
        (b'{"input": "a", "dimensions": 0}', 422, "dimensions"),
        (b'{"input": "a", "dimensions": "8"}', 422, "dimensions"),
        (b'{"input": "a", "dimensions": 33}', 400, "dimensions must be in 1..32"),
        (b'{"input": "a", "model": "../../etc/passwd"}', 404, "is not served here"),
        (b"", 422, "body"),
    ],
)
def test_bad_requests_get_clear_4xx(client, body, status, needle):
    """Malformed JSON, wrong types, token ids, empty texts, other models: 4xx JSON, never 500."""
    r = client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_bad_similarity_requests(client):
    """Pairs must be two strings each; empty texts are named by their position."""
    r = client.post("/v1/similarity", json={"pairs": [["a", "b", "c"]]})
    assert r.status_code == 422 and "pairs" in r.json()["error"]["message"]
    r = client.post("/v1/similarity", json={"pairs": [["a", "b"], ["c", ""]]})
    assert r.status_code == 400 and "pairs[3] is empty" in r.json()["error"]["message"]
    assert client.post("/v1/similarity", json={"pairs": []}).status_code == 422


def test_limits(angle):
    """Too many items, too long texts and too large bodies get 400/413 with the limit named."""
    with served(angle, max_items=3, max_chars=20, max_body_bytes=300) as client:
        r = client.post("/v1/embeddings", json={"input": ["a"] * 4})
        assert r.status_code == 400 and "limit is 3" in r.json()["error"]["message"]
        r = client.post("/v1/similarity", json={"pairs": [["a", "b"]] * 4})
        assert r.status_code == 400 and "limit is 3" in r.json()["error"]["message"]
        r = client.post("/v1/embeddings", json={"input": ["a", "b" * 21]})
        assert r.status_code == 400
        assert "input[1] has 21 characters; the limit is 20" in r.json()["error"]["message"]
        r = client.post("/v1/embeddings", json={"input": ["x" * 10] * 40})
        assert r.status_code == 413 and "300 bytes" in r.json()["error"]["message"]
        chunks = (b'{"input": "' if i == 0 else b"y" * 50 for i in range(10))
        r = client.post("/v1/embeddings", content=chunks)  # chunked, no Content-Length
        assert r.status_code == 413
        assert client.post("/v1/embeddings", json={"input": ["a", "b" * 20]}).status_code == 200


def test_api_key(angle):
    """With a key, /v1 and /metrics need 'Bearer <key>'; /health stays open."""
    with served(angle, api_key=KEY) as client:
        body = {"input": "a"}
        assert client.post("/v1/embeddings", json=body).status_code == 401
        wrong = client.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert wrong.json()["error"]["code"] == "invalid_api_key"
        basic = client.post("/v1/embeddings", json=body, headers={"Authorization": f"Basic {KEY}"})
        assert basic.status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        assert client.post("/v1/embeddings", json=body, headers=auth).status_code == 200
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=auth).status_code == 200
        assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_share_forward_passes(angle, monkeypatch, batching):
    """Requests queued while the model is busy run as one forward pass, each with its options.

    Without batching, the same requests take one forward pass each.
    """
    gate = Gate(angle, monkeypatch)
    bodies = [
        {"input": WORDS[1:3], "prompt_name": "query"},
        {"input": WORDS[3], "dimensions": 8},
        {"input": [WORDS[4]], "encoding_format": "base64"},
    ]
    with served(angle, batching=batching, max_wait_ms=20) as client, ThreadPoolExecutor(4) as pool:
        first = pool.submit(client.post, "/v1/embeddings", json={"input": WORDS[0]})
        assert gate.started.wait(10)
        futures = [pool.submit(client.post, "/v1/embeddings", json=b) for b in bodies]
        batcher = client.app.state.anglekit.batcher
        wait_for(lambda: batcher.queued_texts == 4)
        gate.release.set()
        responses = [first.result(30)] + [f.result(30) for f in futures]
        samples = metric_samples(client)
    assert [r.status_code for r in responses] == [200] * 4
    passes = samples[("anglekit_batch_requests_count", ())]
    assert samples[("anglekit_batch_requests_sum", ())] == 4
    assert samples[("anglekit_batch_texts_sum", ())] == 5
    assert passes == (2 if batching else 4)
    query = np.array([d["embedding"] for d in responses[1].json()["data"]])
    np.testing.assert_allclose(query, expected(angle, WORDS[1:3], prompt_name="query"), atol=1e-5)
    short = np.array(responses[2].json()["data"][0]["embedding"])
    np.testing.assert_allclose(short, expected(angle, [WORDS[3]], dims=8)[0], atol=1e-5)
    raw = base64.b64decode(responses[3].json()["data"][0]["embedding"])
    b64 = np.frombuffer(raw, dtype="<f4")
    np.testing.assert_allclose(b64, expected(angle, [WORDS[4]])[0], atol=1e-5)


def test_full_queue_answers_503_with_retry_after(angle, monkeypatch):
    """When the queue holds max_queue texts, a new request gets 503 and Retry-After."""
    gate = Gate(angle, monkeypatch)
    with served(angle, max_items=2, max_queue=2) as client, ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/v1/embeddings", json={"input": "a"})
        assert gate.started.wait(10)
        queued = pool.submit(client.post, "/v1/embeddings", json={"input": ["b", "c"]})
        batcher = client.app.state.anglekit.batcher
        wait_for(lambda: batcher.queued_texts == 2)
        busy = client.post("/v1/embeddings", json={"input": "d"})
        assert busy.status_code == 503
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "queue_full"
        assert client.get("/health").status_code == 200  # the event loop still answers
        gate.release.set()
        assert first.result(30).status_code == 200 and queued.result(30).status_code == 200
        samples = metric_samples(client)
    key = ("anglekit_requests_total", (("endpoint", "/v1/embeddings"), ("status", "503")))
    assert samples[key] == 1


def test_metrics_count_requests_by_endpoint_and_status(client):
    """Requests are counted by endpoint and status, and timed."""
    client.post("/v1/embeddings", json={"input": "a"})
    client.post("/v1/embeddings", json={"input": 5})
    client.get("/nowhere")
    samples = metric_samples(client)
    ok = ("anglekit_requests_total", (("endpoint", "/v1/embeddings"), ("status", "200")))
    bad = ("anglekit_requests_total", (("endpoint", "/v1/embeddings"), ("status", "422")))
    other = ("anglekit_requests_total", (("endpoint", "other"), ("status", "404")))
    assert samples[ok] == 1 and samples[bad] == 1 and samples[other] == 1
    timed = ("anglekit_request_duration_seconds_count", (("endpoint", "/v1/embeddings"),))
    assert samples[timed] == 2
    assert samples[("anglekit_texts_total", ())] == 1


def test_health_and_no_docs(client):
    """/health names the model and its size; no OpenAPI or docs pages are exposed."""
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["dimensions"] == 32
    assert health["prompt_names"] == ["query"]
    assert client.get("/docs").status_code == 404
    assert client.get("/openapi.json").status_code == 404


def test_options_report_every_problem():
    """Invalid options raise one error listing all of them."""
    with pytest.raises(ValueError) as info:
        ServeOptions(max_items=0, max_wait_ms=-1, port=70000, api_key="")
    message = str(info.value)
    for part in ("max_items", "max_wait_ms", "port", "api_key"):
        assert part in message
    with pytest.raises(ValueError, match=r"max_queue \(8\) must be at least max_items \(16\)"):
        ServeOptions(max_items=16, max_queue=8)


def test_serve_command_refuses_bad_settings_before_loading(tmp_path, monkeypatch, capsys):
    """`anglekit serve` reports invalid limits and an empty key variable, exit status 1."""
    from anglekit.cli import main

    missing = str(tmp_path / "no-model")  # never loaded: the settings fail first
    assert main(["serve", missing, "--max-items", "0", "--max-wait-ms", "-1"]) == 1
    err = capsys.readouterr().err
    assert "max_items must be a positive integer" in err and "max_wait_ms" in err
    monkeypatch.setenv("ANGLEKIT_API_KEY", "")
    assert main(["serve", missing]) == 1
    assert "$ANGLEKIT_API_KEY is set but empty" in capsys.readouterr().err


def test_missing_extra_names_pip_command(monkeypatch):
    """Without FastAPI the server says which pip command installs it."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r'pip install "anglekit\[serve\]"'):
        require_serve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: ~15 s
def test_uvicorn_process_on_loopback(tiny_bert, tmp_path):
    """`anglekit serve` in its own process answers on 127.0.0.1, with the key from the env."""
    import httpx

    port = free_port()
    src = Path(__file__).resolve().parents[1] / "src"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
        "ANGLEKIT_API_KEY": KEY,
    }
    log = (tmp_path / "server.log").open("w")
    command = [sys.executable, "-m", "anglekit.cli", "serve", str(tiny_bert), "--port", str(port)]
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "server did not start in 90 s"
            try:
                health = httpx.get(f"{base}/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        name = health.json()["model"]
        assert name == tiny_bert.name
        auth = {"Authorization": f"Bearer {KEY}"}
        body = {"input": WORDS[:2], "model": name, "dimensions": 4}
        assert httpx.post(f"{base}/v1/embeddings", json=body, timeout=30).status_code == 401
        r = httpx.post(f"{base}/v1/embeddings", json=body, headers=auth, timeout=30)
        assert r.status_code == 200, r.text
        assert [len(d["embedding"]) for d in r.json()["data"]] == [4, 4]
        try:
            import openai
        except ImportError:
            return
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=30)
        out = client.embeddings.create(model=name, input=WORDS[:3], dimensions=8)
        vectors = np.array([d.embedding for d in out.data])  # sent and decoded as base64
        assert vectors.shape == (3, 8)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert out.usage.prompt_tokens > 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
