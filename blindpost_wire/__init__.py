"""Wire definitions shared by the relay and the client SDK.

The relay may not import the SDK (it must stay blind to its crypto) and the SDK
may not import the relay; what both sides must agree on byte for byte lives here,
once, beside the one small runtime helper both sides' long-running programs share
(``loop``: the event loop they run on). This package imports nothing but the
standard library (``loop`` imports uvloop lazily, where it is installed).
"""
