"""Wire definitions shared by the relay and the client SDK.

The relay may not import the SDK (it must stay blind to its crypto) and the SDK
may not import the relay; what both sides must agree on byte for byte lives here,
once. This package imports nothing but the standard library.
"""
