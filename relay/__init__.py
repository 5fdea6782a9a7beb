"""Blindpost relay: a blind store-and-forward server for ciphertext, prekey bundles and media."""
