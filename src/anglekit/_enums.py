"""Parsing of the ``str`` Enums that name anglekit's choices."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound=Enum)


def parse_choice(kind: type[E], value: str | E, what: str) -> E:
    """``value`` as a member of ``kind``; an unknown name raises, listing the valid ones."""
    try:
        return kind(value)
    except ValueError:
        valid = ", ".join(str(member.value) for member in kind)
        raise ValueError(f"unknown {what} {value!r}; valid: {valid}") from None
