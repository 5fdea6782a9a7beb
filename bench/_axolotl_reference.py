"""Stock python-axolotl 0.2.3 on pure-Python protobuf 3.20: the reference figures.

Run by ``bench/core_bench.py`` inside its own virtualenv
(``~/.cache/blindpost/axolotl-reference``) so that nothing of e2ee is imported: this is
python-axolotl as its README uses it.
Prints one JSON object of microseconds per message.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from axolotl.axolotladdress import AxolotlAddress
from axolotl.ecc.curve import Curve
from axolotl.groups.groupcipher import GroupCipher
from axolotl.groups.groupsessionbuilder import GroupSessionBuilder
from axolotl.groups.senderkeyname import SenderKeyName
from axolotl.protocol.prekeywhispermessage import PreKeyWhisperMessage
from axolotl.protocol.senderkeydistributionmessage import SenderKeyDistributionMessage
from axolotl.protocol.whispermessage import WhisperMessage
from axolotl.sessionbuilder import SessionBuilder
from axolotl.sessioncipher import SessionCipher
from axolotl.state.prekeybundle import PreKeyBundle
from axolotl.state.prekeyrecord import PreKeyRecord
from axolotl.tests.groups.inmemorysenderkeystore import InMemorySenderKeyStore
from axolotl.tests.inmemoryaxolotlstore import InMemoryAxolotlStore
from axolotl.util.keyhelper import KeyHelper

PLAINTEXT = b"x" * 100


def peer() -> tuple[Any, Any]:
    store = InMemoryAxolotlStore()
    signed = KeyHelper.generateSignedPreKey(store.getIdentityKeyPair(), 1)
    store.storeSignedPreKey(1, signed)
    return store, signed


def bundle(store: Any, signed: Any, prekey_id: int) -> Any:
    pair = Curve.generateKeyPair()
    store.storePreKey(prekey_id, PreKeyRecord(prekey_id, pair))
    return PreKeyBundle(
        store.getLocalRegistrationId(),
        1,
        prekey_id,
        pair.getPublicKey(),
        1,
        signed.getKeyPair().getPublicKey(),
        signed.getSignature(),
        store.getIdentityKeyPair().getPublicKey(),
    )


def setup(prekey_id: int = 1) -> tuple[Any, Any]:
    (a, _), (b, signed) = peer(), peer()
    SessionBuilder(a, a, a, a, "bob", 1).processPreKeyBundle(bundle(b, signed, prekey_id))
    ac, bc = SessionCipher(a, a, a, a, "bob", 1), SessionCipher(b, b, b, b, "alice", 1)
    first = ac.encrypt(b"hello")
    bc.decryptPkmsg(PreKeyWhisperMessage(serialized=first.serialize()))
    ac.decryptMsg(WhisperMessage(serialized=bc.encrypt(b"hi").serialize()))
    return ac, bc


def per_message(
    fn: Callable[[int], None], count: int, rounds: int = 5, warmup_seconds: float = 1.0
) -> float:
    # The best of `rounds` rounds after a timed warm-up, as bench/core_bench.py measures e2ee.
    size = max(count // rounds, 1)
    deadline = time.perf_counter() + warmup_seconds
    fn(max(count // 10, 1))
    while time.perf_counter() < deadline:
        fn(max(size // 4, 1))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn(size)
        best = min(best, (time.perf_counter() - start) / size)
    return best * 1e6


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    ac, bc = setup()

    def same_chain(n: int) -> None:
        for _ in range(n):
            bc.decryptMsg(WhisperMessage(serialized=ac.encrypt(PLAINTEXT).serialize()))

    def ping_pong(n: int) -> None:
        for _ in range(n // 2):
            bc.decryptMsg(WhisperMessage(serialized=ac.encrypt(PLAINTEXT).serialize()))
            ac.decryptMsg(WhisperMessage(serialized=bc.encrypt(PLAINTEXT).serialize()))

    def session_setup_us(n: int) -> float:
        # Bundle -> first message decrypted -> reply decrypted; peers made beforehand.
        peers = []
        for _ in range(n):
            (a, _), (b, signed) = peer(), peer()
            peers.append((a, b, bundle(b, signed, 1)))
        start = time.perf_counter()
        for a, b, bob_bundle in peers:
            SessionBuilder(a, a, a, a, "bob", 1).processPreKeyBundle(bob_bundle)
            ac, bc = SessionCipher(a, a, a, a, "bob", 1), SessionCipher(b, b, b, b, "alice", 1)
            first = ac.encrypt(PLAINTEXT)
            bc.decryptPkmsg(PreKeyWhisperMessage(serialized=first.serialize()))
            ac.decryptMsg(WhisperMessage(serialized=bc.encrypt(PLAINTEXT).serialize()))
        return float((time.perf_counter() - start) / n * 1e6)

    name = SenderKeyName("g", AxolotlAddress("alice", 1))
    sa, sb = InMemorySenderKeyStore(), InMemorySenderKeyStore()
    dist = GroupSessionBuilder(sa).create(name)
    GroupSessionBuilder(sb).process(name, SenderKeyDistributionMessage(serialized=dist.serialize()))
    ga, gb = GroupCipher(sa, name), GroupCipher(sb, name)

    def group(n: int) -> None:
        for _ in range(n):
            gb.decrypt(ga.encrypt(PLAINTEXT))

    from google.protobuf.internal import api_implementation

    print(
        json.dumps(
            {
                "protobuf_backend": api_implementation.Type(),
                "same_chain_us": per_message(same_chain, count),
                "ping_pong_us": per_message(ping_pong, count),
                "session_setup_us": session_setup_us(max(count // 20, 10)),
                "group_us": per_message(group, count),
            }
        )
    )


if __name__ == "__main__":
    main()
