"""Dataclass fields that carry their command-line help (``anglekit train --help``)."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str) -> Any:
    """A dataclass field with ``default`` whose ``--flag`` shows ``help``."""
    return field(default=default, metadata={"help": help})
