"""Blindpost terminal client (Textual) and the ``blindpost`` command line."""
