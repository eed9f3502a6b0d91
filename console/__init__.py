"""Watches a deployed fabric cluster from the user's terminal: `python -m console --help`.

The commands (`status`, `logs`, `results`, `runs`) read only what a deployed stack publishes
(its outputs, the nodes' phase parameters, the run's files in S3, the nodes' log streams).
This module holds the plain-text formatting the commands share; AWS access is in `aws.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

NO_VALUE = "-"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded (no trailing
    blanks in a terminal or a test's expected text)."""
    widths = [len(header) for header in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(widths[index]) for index, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_pairs(rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Labels and values, aligned, without a header row."""
    lines = format_table([""] * len(rows[0]), rows).splitlines()[1:] if rows else []
    return "\n".join(indent + line for line in lines)


def format_duration(seconds: float | None) -> str:
    """Two units at most, the way a person reads a clock: 45s, 3m12s, 2h05m, 1d03h."""
    if seconds is None:
        return NO_VALUE
    total = max(0, round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_time(moment: datetime | None) -> str:
    """Always UTC, so that what the user sees matches the nodes' logs and S3's dates."""
    if moment is None:
        return NO_VALUE
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_number(value: object, decimals: int = 4) -> str:
    """A value from a script's JSON as the user wants to read it (any type, or missing)."""
    if value is None:
        return NO_VALUE
    if isinstance(value, float):
        if value and abs(value) < 10**-decimals:  # a tiny loss is not 0.0000
            return f"{value:.3g}"
        return f"{value:,.{decimals}f}"
    return str(value)


def parse_time(text: object) -> datetime | None:
    """An ISO-8601 time from a script's JSON; a time without a zone is taken as UTC."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)
