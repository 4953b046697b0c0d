"""Field checks for config dataclasses: each error names the field and says why it is wrong."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["check_bool", "check_choice", "check_int", "check_ratio", "check_real", "cut", "shown"]

#: characters of a value an error message echoes before cutting it
SHOWN_CHARS = 80


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters with its full length noted, so an error
    about a 100 KB string does not echo it whole."""
    return cut(repr(value), limit)


def cut(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with its full length noted."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def check_bool(field: str, value: Any) -> None:
    """Require a real bool; 0/1 or "yes" from a config file are caller bugs, not switches."""
    if not isinstance(value, bool):
        raise ValueError(f"{field}={shown(value)}: must be true or false")


def check_int(field: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    """Require an int (not a bool) within ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}={shown(value)}: must be an integer")
    if lo is not None and value < lo:
        raise ValueError(f"{field}={value}: must be >= {lo}")
    if hi is not None and value > hi:
        raise ValueError(f"{field}={value}: must be <= {hi}")


def check_real(
    field: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Require a finite real number within the given (optionally open) bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}={shown(value)}: must be a number")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{field}={value}: must be finite")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{field}={value}: must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ValueError(f"{field}={value}: must be {'<' if hi_open else '<='} {hi}")


def check_ratio(field: str, value: Any) -> None:
    """A fraction of elements kept: in (0, 1]; 0 would send nothing, >1 is more than the tensor."""
    check_real(field, value, 0.0, 1.0, lo_open=True)


def check_choice(field: str, value: Any, choices: Iterable[str]) -> None:
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{field}={shown(value)}: must be one of {', '.join(map(repr, options))}")
