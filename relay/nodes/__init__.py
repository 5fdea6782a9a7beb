# Invariant: nothing in this package holds state another relay node needs; Redis only signals
# and keeps short-lived cluster-wide facts (presence, replay keys, rate buckets), and the
# store stays the one truth about messages.
"""Relay nodes coordinated through Redis: presence, wake-ups, replay guard, rate limits."""
