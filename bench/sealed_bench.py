"""Sealed sender's per-message costs (e2ee.core.sealed, e2ee.payload): seal, open, verify.

Run under the bench lock, at normal priority::

    flock -w 3600 /work/bench.lock .venv/bin/python bench/sealed_bench.py

Figures and the machine they were taken on: docs/performance.md, "Sealed sender".
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import nacl.bindings as sodium
import nacl.signing

from blindpost_wire.sealed import CERT_CONTEXT, certificate_body
from e2ee import payload
from e2ee.core.sealed import (
    RelayKey,
    RelayKeyPins,
    SealedContent,
    SealedRecipient,
    open_sealed,
    seal,
    verify_certificate,
)


def _identity(private: bytes) -> bytes:
    return b"\x05" + sodium.crypto_scalarmult_base(private)


def _per_call_us(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    relay = nacl.signing.SigningKey(b"\x01" * 32)
    body = certificate_body("alice", 1, _identity(b"\x22" * 32), 2**62, 1)
    cert = body + relay.sign(CERT_CONTEXT + body).signature
    pins = RelayKeyPins().require([RelayKey(1, bytes(relay.verify_key))])
    inner = b"\x01" * 400
    privates = [os.urandom(32) for _ in range(100)]
    recipients = [SealedRecipient(f"user{i:03d}", 1, _identity(p)) for i, p in enumerate(privates)]

    def sealed(k: int) -> bytes:
        return seal(
            recipients[:k],
            SealedContent(cert, inner),
            ephemeral_private=os.urandom(32),
            content_key=os.urandom(32),
        )

    for k in (1, 100):

        def seal_k(k: int = k) -> bytes:
            return sealed(k)

        print(f"seal to {k} device(s): {_per_call_us(seal_k, 2000 // k + 20):.0f} us")
    envelope = sealed(100)
    last = recipients[99]
    opened = _per_call_us(
        lambda: open_sealed(
            envelope,
            user=last.user,
            device=1,
            identity_private=privates[99],
            identity_key=last.identity_key,
        ),
        2000,
    )
    print(f"open (100-recipient envelope, last entry): {opened:.0f} us")
    verified = _per_call_us(lambda: verify_certificate(cert, pins, 0), 2000)
    print(f"verify_certificate: {verified:.0f} us")
    text = payload.Payload(
        type=payload.PayloadType.TEXT, message_id=bytes(16), sent_at_ms=1, text="hi"
    )
    encoded = payload.encode(text)
    stamped = _per_call_us(lambda: payload.with_access_key(encoded, b"k" * 32), 20000)
    print(f"with_access_key: {stamped:.1f} us")


if __name__ == "__main__":
    main()
