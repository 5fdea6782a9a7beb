# Pure text formatting for times, sizes and delivery ticks.
#
# Invariant: nothing here reads the clock or the local time zone; callers pass
# ``now_ms`` and ``tz`` (the app's clock), so snapshots render the same forever.
"""Formatting helpers (times, sizes, status ticks)."""

from __future__ import annotations

from datetime import datetime, tzinfo

__all__ = [
    "TICKS",
    "clock_time",
    "day_key",
    "day_label",
    "human_size",
    "short_time",
    "tick_for",
]

#: Outgoing status -> (glyph, component class suffix). Read and delivered differ
#: in glyph *and* colour so they are told apart without colour too.
TICKS: dict[str, tuple[str, str]] = {
    "pending": ("◷", "pending"),
    "failed": ("✗ failed", "failed"),
    "sent": ("✓", "sent"),
    "delivered": ("✓✓", "delivered"),
    "read": ("✓✓ read", "read"),
}


def _dt(ms: int, tz: tzinfo) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz)


def day_key(ms: int, tz: tzinfo) -> str:
    """The calendar day of ``ms`` (``YYYY-MM-DD``)."""
    return _dt(ms, tz).strftime("%Y-%m-%d")


def day_label(ms: int, now_ms: int, tz: tzinfo) -> str:
    """``Today``, ``Yesterday`` or the date, for a day separator."""
    day = _dt(ms, tz).date()
    today = _dt(now_ms, tz).date()
    delta = (today - day).days
    if delta == 0:
        return "Today"
    if delta == 1:
        return "Yesterday"
    return _dt(ms, tz).strftime("%a %d %b %Y")


def short_time(ms: int | None, now_ms: int, tz: tzinfo) -> str:
    """When a chat was last active, as the chat list shows it; empty for None.

    ``HH:MM`` today, ``Yesterday``, the weekday (``Mon``) within the last week,
    ``DD Mon`` earlier this year, ``DD Mon YYYY`` before that.
    """
    if ms is None:
        return ""
    when = _dt(ms, tz)
    now = _dt(now_ms, tz)
    delta = (now.date() - when.date()).days
    if delta <= 0:
        return when.strftime("%H:%M")
    if delta == 1:
        return "Yesterday"
    if delta < 7:
        return when.strftime("%a")
    if when.year == now.year:
        return when.strftime("%d %b")
    return when.strftime("%d %b %Y")


def clock_time(ms: int, tz: tzinfo) -> str:
    """``HH:MM``: a message's time of day (its day is on the day separator above it)."""
    return _dt(ms, tz).strftime("%H:%M")


def human_size(size: int) -> str:
    """``532 B``, ``12.3 KB``, ``4.0 MB``..."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def tick_for(status: str) -> tuple[str, str]:
    """(glyph, style suffix) for an outgoing message's status."""
    return TICKS.get(status, ("", "sent"))
