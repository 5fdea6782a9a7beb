# Screens of the terminal client. Screens own the workers that call the backend;
# a worker posts a past-tense message back, and the handler updates widgets, so
# no handler ever awaits the network.
"""Screens of the Blindpost terminal client."""

__all__: list[str] = []
