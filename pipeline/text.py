"""Small helpers for the words kgrad prints."""

from __future__ import annotations


def count(n, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun`` in agreement: ``count(1, "task")`` is "1 task", ``count(2, "task")`` "2 tasks"."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
