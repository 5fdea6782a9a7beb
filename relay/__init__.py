# Invariant: the relay stores and forwards opaque bytes only; it never imports the client SDK.
"""Blindpost relay: a blind store-and-forward server for ciphertext, prekey bundles and media."""

from relay.app import create_app
from relay.config import RelayConfig

__all__ = ["RelayConfig", "create_app"]
