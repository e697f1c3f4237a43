"""Range and choice checks that config sections run in `__post_init__`; a ValueError names the field
(the config loader adds the section)."""

from __future__ import annotations

from typing import Any


def at_least(section: Any, low: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < low:
            raise ValueError(f"{name}={value} is out of range; it must be >= {low}")


def above(section: Any, low: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value <= low:
            raise ValueError(f"{name}={value} is out of range; it must be > {low}")


def at_most(section: Any, high: float, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value > high:
            raise ValueError(f"{name}={value} is out of range; it must be <= {high}")


def one_of(section: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(section, name)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
