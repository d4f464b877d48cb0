"""An OpenAI-compatible embedding server (``anglekit serve``, extra ``anglekit[serve]``).

This package imports without the extra: :class:`ServeOptions` also defines the flags of
``anglekit serve``. The FastAPI application lives in :mod:`anglekit.server.app`, which needs
FastAPI, uvicorn and prometheus-client; :func:`create_app` and :func:`serve` import it on
first use and name the install command when it is missing.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from anglekit.model import AnglE

__all__ = ["API_KEY_ENV", "ServeOptions", "create_app", "require_serve", "serve"]

logger = logging.getLogger(__name__)

#: Environment variable read for the API key when ``--api-key`` is not given.
API_KEY_ENV = "ANGLEKIT_API_KEY"
SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ServeOptions:
    """Settings of the embedding server; each is also a flag of ``anglekit serve``.

    Attributes:
        host: interface to listen on; loopback unless you mean to expose the server.
        port: TCP port.
        api_key: clients must send ``Authorization: Bearer <key>``; defaults to the
            ``ANGLEKIT_API_KEY`` environment variable (with ``serve``), else no key.
        model_name: the name clients send as ``model`` and get back; defaults to the model's
            folder name or hub id.
        batching: merge concurrent requests into shared forward passes.
        max_batch_size: texts per forward pass.
        max_wait_ms: how long a request that finds the model idle waits for others to join
            its batch; requests that queue while the model is busy are merged regardless.
        max_queue: texts allowed to wait for the model; beyond, requests get 503.
        max_items: texts per embeddings request (pairs per similarity request).
        max_chars: characters per text.
        max_body_bytes: bytes per request body.
    """

    host: str = _option("127.0.0.1", "interface to listen on")
    port: int = _option(8000, "TCP port")
    api_key: str | None = _option(
        None, f"require 'Authorization: Bearer KEY'; when unset, ${API_KEY_ENV} or no key"
    )
    model_name: str | None = _option(
        None, "model name clients send and get back; when unset, the model's folder name"
    )
    batching: bool = _option(True, "merge concurrent requests into shared forward passes")
    max_batch_size: int = _option(64, "texts per forward pass")
    max_wait_ms: float = _option(
        0.0, "milliseconds an idle model waits for more requests to batch with"
    )
    max_queue: int = _option(4096, "texts allowed to wait for the model; beyond: 503")
    max_items: int = _option(256, "texts per embeddings request, pairs per similarity request")
    max_chars: int = _option(10_000, "characters per text")
    max_body_bytes: int = _option(4 * 1024 * 1024, "bytes per request body")

    def __post_init__(self) -> None:
        problems = [
            f"{f.name} must be a positive integer, got {getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name.startswith("max_")
            and f.name != "max_wait_ms"
            and (not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 1)
        ]
        if not 0 <= self.max_wait_ms <= 1000:
            problems.append(f"max_wait_ms must be in 0..1000, got {self.max_wait_ms!r}")
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in 0..65535, got {self.port!r}")
        ints = isinstance(self.max_queue, int) and isinstance(self.max_items, int)
        if ints and self.max_queue < self.max_items:
            problems.append(
                f"max_queue ({self.max_queue}) must be at least max_items ({self.max_items})"
            )
        if self.api_key is not None and not self.api_key:
            problems.append("api_key is empty; give a key or leave it unset")
        if problems:
            raise ValueError("invalid server options: " + "; ".join(problems))


def require_serve() -> None:
    """Raise ImportError naming the install command when the ``serve`` extra is missing."""
    missing = [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f'the embedding server needs {", ".join(missing)}: pip install "anglekit[serve]"'
        )


def create_app(model: AnglE, options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI application serving ``model`` (see :mod:`anglekit.server.app`)."""
    require_serve()
    from anglekit.server.app import build_app

    return build_app(model, options or ServeOptions())


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model: str, options: ServeOptions | None = None, *, dtype: str | None = None) -> None:
    """Load ``model`` and serve it with uvicorn until interrupted.

    Args:
        model: a model folder or hub id, loaded once at start; clients never choose it.
        options: server settings; ``api_key`` falls back to ``$ANGLEKIT_API_KEY``.
        dtype: weight dtype (``float32``, ``bfloat16``, ``float16``); default as saved.
    """
    require_serve()
    import uvicorn

    from anglekit.model import AnglE

    options = options or ServeOptions()
    if options.api_key is None and API_KEY_ENV in os.environ:
        if not os.environ[API_KEY_ENV]:
            raise ValueError(f"${API_KEY_ENV} is set but empty; give a key or unset it")
        options = replace(options, api_key=os.environ[API_KEY_ENV])
    if options.model_name is None:
        options = replace(options, model_name=Path(model).name if Path(model).is_dir() else model)
    if not _is_loopback(options.host) and options.api_key is None:
        logger.warning(
            "listening on %s without an API key: anyone who can reach this port can use the "
            "model; set --api-key or $%s",
            options.host,
            API_KEY_ENV,
        )
    angle = AnglE.from_pretrained(model, dtype=dtype)
    app = create_app(angle, options)
    logger.info(
        "serving %s as %r on http://%s:%d", model, options.model_name, options.host, options.port
    )
    uvicorn.run(app, host=options.host, port=options.port, log_level="info", access_log=False)
