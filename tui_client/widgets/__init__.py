# Widgets of the terminal client. They know the adapter's view types only and
# report what the user did through Textual messages; none of them calls the
# backend (screens do, in workers).
"""Widgets of the Blindpost terminal client."""

__all__: list[str] = []
