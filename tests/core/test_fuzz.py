"""Malformed input on every decrypt and parse path: typed errors only, store untouched.

What a user relies on: whatever bytes a relay or a peer hands us, the SDK answers
with one of the errors it documents (an :class:`e2ee.errors.E2EEError`, never a
protobuf, python-axolotl or C-library exception) and a refused input changes not
one byte of the local store. A mutated real message may decrypt only where the
mutation falls in a region the protocol ignores, and then only to the original
plaintext and without changing the identity key recorded for its sender.

The bulk run is deterministic (a seeded :class:`random.Random`) and counts every
input it feeds; a smaller Hypothesis layer searches on top. Inputs:

* random bytes of random lengths (with and without a valid version byte);
* every real message truncated at every length, from either end; every version
  byte; every single bit flipped;
* random byte replacements, bit flips, insertions, deletions, duplications,
  splices of two real messages;
* well-formed protobuf messages with fields of wrong lengths, missing fields,
  non-canonical and low-order keys, extreme counters and ids;
* messages a malicious peer or group member authenticates correctly but fills with
  garbage (bad padding, huge counters and iteration jumps);
* prekey bundle JSON with wrong types, out-of-range values and broken keys.
"""

from __future__ import annotations

import base64
import copy
import logging
import math
import random
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from axolotl.groups.state.senderkeyrecord import SenderKeyRecord
from axolotl.protocol import whisperprotos_pb2 as pb
from axolotl.protocol.senderkeymessage import SenderKeyMessage
from axolotl.protocol.whispermessage import WhisperMessage
from axolotl.sessioncipher import AESCipher
from axolotl.state.sessionrecord import SessionRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_state import memory_data

import e2ee  # noqa: F401  (installs the protobuf shim before axolotl loads)
from e2ee.core import MAX_SENDER_KEY_JUMP, PreKeyBundle, ProtocolEngine, wire
from e2ee.core.engine import Ciphertext
from e2ee.core.keys import MAX_DEVICE_ID
from e2ee.errors import (
    E2EEError,
    InvalidBundle,
    InvalidMessage,
    PeerError,
    UsageError,
)
from e2ee.store import Address, MemoryProtocolStore, SenderKeyId

SEED = 20_240_601
NOW_MS = 1_700_000_000_000
GROUP = "g"
#: Inputs the bulk run feeds each path; together at least MIN_TOTAL.
BUDGET = {
    "decrypt/prekey": 22_000,
    "decrypt/message": 22_000,
    "group_decrypt": 22_000,
    "group_process_distribution": 14_000,
    "PreKeyBundle.from_json": 10_000,
    "wire.parse_*": 12_000,
}
MIN_TOTAL = 100_000
#: Of those, messages a malicious peer authenticates correctly (1:1, group).
FORGED_1TO1 = 1_500
FORGED_GROUP = 800

_P = 2**255 - 19
#: Canonical encodings of Curve25519 points of small order: 0, 1, the two of
#: order 8, and p-1 (order 2). X25519 with them gives an all-zero secret.
LOW_ORDER = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    _P - 1,
]
NON_CANONICAL = [_P, _P + 1, 2**255 - 1, 2**256 - 1, 2**255 + 5]


def point(u: int) -> bytes:
    """A serialized public key (type byte 5) with the raw 32-byte u-coordinate ``u``."""
    return b"\x05" + (u % 2**256).to_bytes(32, "little")


# -- the world: one receiver, real messages from three senders ------------------------------


@dataclass(frozen=True, repr=False)
class Sample:
    """A real message Bob may receive, and what a successful decrypt must return."""

    name: str
    sender: Address
    body: bytes
    plaintext: bytes | None  # None: a distribution (no plaintext)
    identity: bytes  # the sender's real identity key

    def __repr__(self) -> str:
        return f"Sample({self.name!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


@dataclass(repr=False)
class World:
    bob: ProtocolEngine
    store: MemoryProtocolStore
    prekey: list[Sample]
    message: list[Sample]
    group: list[Sample]
    distribution: list[Sample]
    bundles: list[dict[str, Any]]
    #: A malicious peer's means: Carol's session with Bob, Alice's sender key.
    carol_session: bytes
    alice_sender_key: bytes
    bob_iteration: int  # where Bob's copy of Alice's group chain stands
    real_keys: list[bytes] = field(default_factory=list)

    def __repr__(self) -> str:
        return "World(bob; alice, carol pending)"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis' printer
        printer.text(repr(self))

    @property
    def all_samples(self) -> list[Sample]:
        return self.prekey + self.message + self.group + self.distribution


def _engine(name: str) -> ProtocolEngine:
    engine = ProtocolEngine(MemoryProtocolStore(), now_ms=lambda: NOW_MS)
    engine.create_account(name, 1)
    return engine


def build_world() -> World:
    """Bob holds: no session with Alice (her prekey messages are pending), an
    established session with Carol (some messages delivered, some pending), Alice's
    Sender Key for GROUP (some messages delivered, some pending), not Carol's."""
    alice, bob, carol = _engine("alice"), _engine("bob"), _engine("carol")
    a, b, c = alice.address, bob.address, carol.address
    alice.process_bundle("bob", bob.local_bundle(prekey_id=7))
    carol.process_bundle("bob", bob.local_bundle())  # no one-time prekey

    a1, a2 = (alice.encrypt(b, f"alice {i}".encode()) for i in (1, 2))
    c1, c2 = (carol.encrypt(b, f"carol {i}".encode()) for i in (1, 2))
    bob.decrypt(c, c1)
    carol.decrypt(b, bob.encrypt(c, b"bob to carol"))
    c3, c4 = (carol.encrypt(b, f"carol {i}".encode()) for i in (3, 4))
    bob.decrypt(c, c3)
    assert {a1.kind, a2.kind, c1.kind, c2.kind} == {"prekey"}
    assert {c3.kind, c4.kind} == {"message"}

    dist_a = alice.group_distribution(GROUP)
    dist_c = carol.group_distribution(GROUP)
    bob.group_process_distribution(GROUP, a, dist_a)
    g1, g2, g3 = (alice.group_encrypt(GROUP, f"group {i}".encode()) for i in (1, 2, 3))
    bob.group_decrypt(GROUP, a, g1)
    gc = carol.group_encrypt(GROUP, b"carol to group")

    def inner(ct: Ciphertext) -> bytes:
        return pb.PreKeyWhisperMessage.FromString(ct.body[1:]).message

    ik = {a: alice.identity_key, c: carol.identity_key}
    world = World(
        bob=bob,
        store=bob.store,  # type: ignore[arg-type]
        prekey=[
            Sample("alice prekey 1 (new session)", a, a1.body, b"alice 1", ik[a]),
            Sample("alice prekey 2 (new session)", a, a2.body, b"alice 2", ik[a]),
            Sample("carol prekey 1 (duplicate)", c, c1.body, b"carol 1", ik[c]),
            Sample("carol prekey 2 (late)", c, c2.body, b"carol 2", ik[c]),
        ],
        message=[
            Sample("carol message 3 (duplicate)", c, c3.body, b"carol 3", ik[c]),
            Sample("carol message 4 (pending)", c, c4.body, b"carol 4", ik[c]),
            Sample("carol prekey 2, inner message", c, inner(c2), b"carol 2", ik[c]),
            Sample("alice prekey 1, inner message (no session)", a, inner(a1), b"alice 1", ik[a]),
        ],
        group=[
            Sample("alice group 1 (duplicate)", a, g1, b"group 1", ik[a]),
            Sample("alice group 2 (pending)", a, g2, b"group 2", ik[a]),
            Sample("alice group 3 (pending)", a, g3, b"group 3", ik[a]),
            Sample("carol group (no sender key)", c, gc, b"carol to group", ik[c]),
        ],
        distribution=[
            Sample("alice distribution (held)", a, dist_a, None, ik[a]),
            Sample("carol distribution (new)", c, dist_c, None, ik[c]),
        ],
        bundles=[bob.local_bundle(prekey_id=9).to_json(), bob.local_bundle().to_json()],
        carol_session=carol.store.load_session(b) or b"",
        alice_sender_key=alice.store.load_sender_key(SenderKeyId(GROUP, a)) or b"",
        bob_iteration=SenderKeyRecord(serialized=bob.store.load_sender_key(SenderKeyId(GROUP, a)))
        .getSenderKeyState()
        .getSenderChainKey()
        .getIteration(),
    )
    world.real_keys = [
        alice.identity_key,
        bob.identity_key,
        carol.identity_key,
        bob.local_bundle().signed_prekey.public_key,
    ]
    return world


# -- the oracle ------------------------------------------------------------------------------

#: What each path documents it raises for bad input.
DOCUMENTED: dict[str, type[E2EEError]] = {
    "decrypt/prekey": PeerError,
    "decrypt/message": PeerError,
    "group_decrypt": PeerError,
    "group_process_distribution": InvalidMessage,
    "PreKeyBundle.from_json": InvalidBundle,
    "wire.parse_*": InvalidMessage,
}


def _live(store: MemoryProtocolStore) -> dict[str, Any]:
    return memory_data(store)


class Oracle:
    """Feeds inputs to Bob, classifies every outcome, restores Bob after a success.

    Defects are collected (one example per path, error type and raising line) so a
    run reports all of them at once.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.pristine = copy.deepcopy(_live(world.store))
        self.count: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self.defects: dict[tuple[str, str, str], str] = {}
        self.defect_counts: Counter[tuple[str, str, str]] = Counter()

    # Any success: ``allowed`` None; else the plaintexts a success may return.
    def feed(
        self,
        path: str,
        what: object,
        call: Callable[[], Any],
        allowed: frozenset[bytes] | None,
        note: str = "",
        verify: Callable[[Any], str | None] | None = None,
    ) -> None:
        self.count[path] += 1
        try:
            result = call()
        except E2EEError as exc:
            if not isinstance(exc, DOCUMENTED[path]):
                self._defect(path, what, exc, "undocumented error type", note)
            elif path != "wire.parse_*" and _live(self.world.store) != self.pristine:
                self._defect(path, what, exc, "store changed by a refused input", note)
                self._restore()
            self.refused[path] += 1
            return
        except Exception as exc:  # noqa: BLE001  the point: nothing untyped may escape
            self._defect(path, what, exc, "untyped exception", note)
            self._restore()
            return
        self.accepted[f"{path} [{note}]"] += 1
        plaintext = getattr(result, "plaintext", result)
        if allowed is not None and plaintext not in allowed:
            self._defect(
                path, what, None, "accepted with a plaintext never sent", note, repr(plaintext)
            )
        problem = verify(result) if verify is not None else None
        if problem:
            self._defect(path, what, None, problem, note)
        if path.startswith(("decrypt", "group")):
            self._restore()

    def _restore(self) -> None:
        for name, value in copy.deepcopy(self.pristine).items():
            setattr(self.world.store, name, value)

    def _defect(
        self,
        path: str,
        what: object,
        exc: BaseException | None,
        kind: str,
        note: str,
        detail: str = "",
    ) -> None:
        where = ""
        if exc is not None:
            frames = traceback.extract_tb(exc.__traceback__)
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        key = (path, f"{kind}: {type(exc).__name__ if exc else ''}", where)
        self.defect_counts[key] += 1
        if key in self.defects:
            return
        shown = what.hex() if isinstance(what, bytes) else repr(what)[:2000]
        trace = "".join(traceback.format_exception(exc)) if exc is not None else ""
        self.defects[key] = f"{path} [{note}] {kind} {detail}\n  input: {shown}\n{trace}"

    def check(self) -> None:
        assert _live(self.world.store) == self.pristine, "store differs from the pristine copy"
        assert not self.defects, "\n\n".join(
            f"({self.defect_counts[key]} inputs) {text}" for key, text in self.defects.items()
        )

    # -- the paths ------------------------------------------------------------------------

    def decrypt(
        self,
        kind: str,
        sender: Address,
        body: bytes,
        allowed: frozenset[bytes] | None,
        note: str,
        identity: bytes | None = None,
    ) -> None:
        """``identity``: the key a success must leave recorded for ``sender``, if known."""
        bob = self.world.bob
        ct = Ciphertext(kind, body)  # type: ignore[arg-type]

        def same_identity(_: Any) -> str | None:
            record = bob.identity(sender)
            if identity is None or (record is not None and record.identity_key == identity):
                return None
            return "accepted, but the sender's recorded identity key changed"

        self.feed(
            f"decrypt/{kind}",
            (kind, sender, body),
            lambda: bob.decrypt(sender, ct),
            allowed,
            note,
            same_identity,
        )

    def group_decrypt(
        self, group: str, sender: Address, body: bytes, allowed: frozenset[bytes] | None, note: str
    ) -> None:
        bob = self.world.bob
        self.feed(
            "group_decrypt",
            (group, sender, body),
            lambda: bob.group_decrypt(group, sender, body),
            allowed,
            note,
        )

    def distribution(self, group: str, sender: Address, body: bytes, note: str) -> None:
        bob = self.world.bob
        self.feed(
            "group_process_distribution",
            (group, sender, body),
            lambda: bob.group_process_distribution(group, sender, body),
            None,
            note,
        )

    def bundle(self, data: Any, note: str) -> None:
        def parse() -> PreKeyBundle:
            bundle = PreKeyBundle.from_json(data)
            bundle.verify()
            assert PreKeyBundle.from_json(bundle.to_json()) == bundle
            return bundle

        self.feed("PreKeyBundle.from_json", data, parse, None, note)

    def parse(self, body: Any, note: str) -> None:
        for parser in (
            wire.parse_prekey_message,
            wire.parse_whisper_message,
            wire.parse_sender_key_message,
            wire.parse_distribution_message,
        ):
            self.feed("wire.parse_*", (parser.__name__, body), lambda p=parser: p(body), None, note)


# -- byte mutations --------------------------------------------------------------------------


def truncations(body: bytes) -> Iterator[bytes]:
    for i in range(len(body)):
        yield body[:i]
    for i in range(1, len(body)):
        yield body[i:]


def version_bytes(body: bytes) -> Iterator[bytes]:
    for v in range(256):
        if v != body[0]:
            yield bytes([v]) + body[1:]


def bit_flips(body: bytes) -> Iterator[bytes]:
    for i in range(len(body) * 8):
        flipped = bytearray(body)
        flipped[i // 8] ^= 1 << (i % 8)
        yield bytes(flipped)


def random_bytes(rng: random.Random) -> bytes:
    """Random length (rarely over the size limit); mostly with the right version byte."""
    if rng.random() < 0.002:
        length = wire.MAX_MESSAGE_BYTES + 1
    else:
        length = rng.randrange(0, rng.choice([16, 200, 2000]))
    data = rng.randbytes(length)
    if data and rng.random() < 0.6:
        data = bytes([wire.CURRENT_VERSION_BYTE]) + data[1:]
    return data


def mutate(rng: random.Random, body: bytes, other: bytes) -> bytes:
    """One to four random edits of ``body`` (``other`` feeds splices); never ``body`` itself."""
    while (mutant := _edit(rng, body, other)) == body:
        pass
    return mutant


def _edit(rng: random.Random, body: bytes, other: bytes) -> bytes:
    data = bytearray(body)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 4])):
        op = rng.randrange(9)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:  # replace bytes
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1 and data:  # flip bits
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 2:  # insert random bytes
            data[pos:pos] = rng.randbytes(rng.choice([1, 1, 2, 3, 8, 40]))
        elif op == 3:  # delete a span
            del data[pos : pos + rng.choice([1, 1, 2, 4, 16])]
        elif op == 4:  # duplicate a span
            data[pos:pos] = data[pos : pos + rng.randrange(1, 24)]
        elif op == 5:  # splice with another real message
            cut = rng.randrange(len(other) + 1)
            data = data[:pos] + bytearray(other[cut:])
        elif op == 6 and data:  # an interesting byte value
            data[rng.randrange(len(data))] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x33, 0x05])
        elif op == 7:  # truncate or extend
            if rng.random() < 0.5:
                del data[pos:]
            else:
                data += rng.randbytes(rng.randrange(1, 40))
        elif op == 8 and len(data) > 2:  # swap two bytes
            i, j = rng.randrange(len(data)), rng.randrange(len(data))
            data[i], data[j] = data[j], data[i]
    return bytes(data)


# -- well-formed protobuf with wrong fields --------------------------------------------------


def key_field(rng: random.Random, real: list[bytes]) -> bytes:
    """A public-key field: real, low-order, non-canonical, wrong type or wrong length."""
    choice = rng.randrange(7)
    if choice == 0:
        return rng.choice(real)
    if choice == 1:
        return point(rng.choice(LOW_ORDER))
    if choice == 2:
        return point(rng.choice(NON_CANONICAL))
    if choice == 3:
        return bytes([rng.randrange(256)]) + rng.randbytes(32)
    if choice == 4:
        return rng.randbytes(rng.choice([0, 1, 32, 34, 64, 300]))
    if choice == 5:
        return rng.choice(real)[:-1] if rng.random() < 0.5 else rng.choice(real) + b"\x00"
    return b"\x05" + rng.randbytes(32)


#: Boundary values for uint32 protobuf fields (ids, counters, iterations).
EDGE_UINTS = (0, 1, 2, 0x7F, 0x80, 0xFFFF, 0xFFFFFE, 0xFFFFFF, 1 << 24, 2**31 - 1, 2**31, 2**32 - 1)
#: Boundary values for JSON integers.
EDGE_INTS = (0, 1, -1, 2**31 - 1, 2**31, 0xFFFFFE, 0xFFFFFF, 1 << 24, 2**64, -(2**100))


def uint(rng: random.Random, real: list[int]) -> int:
    return rng.choice([*EDGE_UINTS, rng.randrange(2**32), *real])


def ciphertext_field(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice([0, 1, 15, 16, 17, 31, 32, 48, 1000, 1024]))


def _maybe_omit(rng: random.Random, message: Any, names: list[str]) -> None:
    for name in names:
        if rng.random() < 0.08:
            message.ClearField(name)


def _tail(rng: random.Random, length: int) -> bytes:
    return rng.randbytes(length if rng.random() < 0.85 else rng.randrange(0, length + 8))


def _version(rng: random.Random) -> bytes:
    return bytes([wire.CURRENT_VERSION_BYTE if rng.random() < 0.85 else rng.randrange(256)])


def whisper_proto(rng: random.Random, world: World) -> bytes:
    real = [pb.WhisperMessage.FromString(s.body[1:-8]).ratchetKey for s in world.message]
    proto = pb.WhisperMessage(
        ratchetKey=key_field(rng, real + world.real_keys),
        counter=uint(rng, [0, 1, 2, 3, 2000, 2001]),
        previousCounter=uint(rng, [0, 1]),
        ciphertext=ciphertext_field(rng),
    )
    _maybe_omit(rng, proto, [f.name for f in proto.DESCRIPTOR.fields])
    return _version(rng) + proto.SerializeToString() + _tail(rng, 8)


def prekey_proto(rng: random.Random, world: World) -> bytes:
    base = pb.PreKeyWhisperMessage.FromString(rng.choice(world.prekey).body[1:])
    proto = pb.PreKeyWhisperMessage(
        registrationId=uint(rng, [base.registrationId]),
        preKeyId=uint(rng, [7, 8, base.preKeyId]),
        signedPreKeyId=uint(rng, [1, 2, base.signedPreKeyId]),
        baseKey=key_field(rng, [base.baseKey, *world.real_keys]),
        identityKey=key_field(rng, [base.identityKey, *world.real_keys]),
        message=rng.choice([base.message, whisper_proto(rng, world), ciphertext_field(rng)]),
    )
    _maybe_omit(rng, proto, [f.name for f in proto.DESCRIPTOR.fields])
    return _version(rng) + proto.SerializeToString()


def sender_key_proto(rng: random.Random, world: World) -> bytes:
    real = pb.SenderKeyMessage.FromString(world.group[1].body[1:-64])
    proto = pb.SenderKeyMessage(
        id=uint(rng, [real.id]),
        iteration=uint(rng, [0, 1, 2, 3, MAX_SENDER_KEY_JUMP, MAX_SENDER_KEY_JUMP + 2]),
        ciphertext=ciphertext_field(rng),
    )
    _maybe_omit(rng, proto, [f.name for f in proto.DESCRIPTOR.fields])
    return _version(rng) + proto.SerializeToString() + _tail(rng, 64)


def distribution_proto(rng: random.Random, world: World) -> bytes:
    real = pb.SenderKeyDistributionMessage.FromString(world.distribution[0].body[1:])
    proto = pb.SenderKeyDistributionMessage(
        id=uint(rng, [real.id]),
        iteration=uint(rng, [0, 1, real.iteration]),
        chainKey=rng.choice([real.chainKey, rng.randbytes(rng.choice([0, 1, 31, 32, 33, 64]))]),
        signingKey=key_field(rng, [real.signingKey, *world.real_keys]),
    )
    _maybe_omit(rng, proto, [f.name for f in proto.DESCRIPTOR.fields])
    return _version(rng) + proto.SerializeToString()


#: Hand-made protobuf traps, each behind the right version byte: deep group nesting,
#: lengths past the end, over-long and unterminated varints, a field number of 0, a
#: repeated field, unknown wire types. Fed to every parser.
_V = bytes([wire.CURRENT_VERSION_BYTE])
PATHOLOGICAL = [
    _V + b"\x0b" * 200_000 + b"\x00" * 72,
    _V + b"\x0a\xff\xff\xff\xff\x0f" + b"\x00" * 72,
    _V + b"\x10" + b"\xff" * 11 + b"\x01" + b"\x00" * 72,
    _V + b"\x10" + b"\x80" * 64,
    _V + b"\x00\x00" + b"\x00" * 72,
    _V + b"\x0a\x21\x05" + b"\x01" * 32 + b"\x0a\x21\x05" + b"\x02" * 32 + b"\x00" * 72,
    _V + b"\x0f\x0e\x0d\x0c" + b"\x00" * 72,
    _V + b"\x0c" + b"\x00" * 72,
    _V + b"\x22\x80\x80\x80\x80\x10" + b"\x00" * 72,
]


# -- a malicious peer: correctly authenticated garbage ---------------------------------------


def forged_whisper(rng: random.Random, world: World) -> bytes:
    """A message with a valid MAC from Carol's real session: reaches AES and padding."""
    state = SessionRecord(serialized=world.carol_session).getSessionState()
    chain = state.getSenderChainKey()
    for _ in range(rng.choice([0, 0, 1, 2, 5])):
        chain = chain.getNextChainKey()
    keys = chain.getMessageKeys()
    if rng.random() < 0.5:
        body = rng.randbytes(16 * rng.randrange(1, 4))  # almost surely bad padding
    else:
        cipher = AESCipher(keys.getCipherKey(), keys.getIv())
        body = cipher.encrypt(rng.randbytes(rng.randrange(40)))
    message = WhisperMessage(
        3,
        keys.getMacKey(),
        state.getSenderRatchetKey(),
        chain.getIndex(),
        uint(rng, [0, 1]),
        body,
        state.getLocalIdentityKey(),
        state.getRemoteIdentityKey(),
    )
    return bytes(message.serialize())


def forged_whisper_far(world: World, ahead: int) -> bytes:
    """A correctly MACed message ``ahead`` steps past Carol's sending chain."""
    state = SessionRecord(serialized=world.carol_session).getSessionState()
    chain = state.getSenderChainKey()
    for _ in range(ahead):
        chain = chain.getNextChainKey()
    keys = chain.getMessageKeys()
    body = AESCipher(keys.getCipherKey(), keys.getIv()).encrypt(b"far ahead")
    return bytes(
        WhisperMessage(
            3,
            keys.getMacKey(),
            state.getSenderRatchetKey(),
            chain.getIndex(),
            0,
            body,
            state.getLocalIdentityKey(),
            state.getRemoteIdentityKey(),
        ).serialize()
    )


def forged_group(rng: random.Random, world: World, iteration: int | None = None) -> bytes:
    """A group message signed with Alice's real signing key: reaches the cipher."""
    state = SenderKeyRecord(serialized=world.alice_sender_key).getSenderKeyState()
    current = state.getSenderChainKey().getIteration()
    if iteration is None:
        iteration = current + rng.choice([-3, -1, 0, 1, 2, 10])
        body = rng.randbytes(rng.choice([16, 32, 48, 17, 15, 0]))
    else:
        body = rng.randbytes(16)  # whole blocks: reaches the jump check and the cipher
    message = SenderKeyMessage(
        state.getKeyId(), max(iteration, 0), body, state.getSigningKeyPrivate()
    )
    return bytes(message.serialize())


# -- JSON bundles ---------------------------------------------------------------------------


def json_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(14 if depth < 3 else 10)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice(EDGE_INTS)
    if choice == 3:
        return rng.choice([0.0, 1.0, 1.5, -0.0, math.inf, -math.inf, math.nan, 1e308])
    if choice == 4:
        return "".join(rng.choice("ab=+/ \n\x00é€\ud800") for _ in range(rng.randrange(12)))
    if choice == 5:
        return base64.b64encode(rng.randbytes(rng.choice([0, 1, 32, 33, 34, 63, 64, 65]))).decode()
    if choice == 6:
        return base64.b64encode(point(rng.choice(LOW_ORDER + NON_CANONICAL))).decode()
    if choice == 7:
        return base64.b64encode(b"\x05" + rng.randbytes(32)).decode().rstrip("=")
    if choice == 8:
        return base64.urlsafe_b64encode(b"\x05" + rng.randbytes(32)).decode()
    if choice == 9:
        return rng.randbytes(33)  # not JSON at all, but a caller might pass it
    if choice == 10:
        return [json_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    if choice == 11:
        return {"id": json_value(rng, depth + 1), "public_key": json_value(rng, depth + 1)}
    if choice == 12:
        return {
            "id": 1,
            "public_key": json_value(rng, depth + 1),
            "signature": json_value(rng, depth + 1),
        }
    return {str(json_value(rng, depth + 1)): json_value(rng, depth + 1)}


BUNDLE_FIELDS = [
    ("device_id",),
    ("registration_id",),
    ("identity_key",),
    ("signed_prekey",),
    ("signed_prekey", "id"),
    ("signed_prekey", "public_key"),
    ("signed_prekey", "signature"),
    ("one_time_prekey",),
    ("one_time_prekey", "id"),
    ("one_time_prekey", "public_key"),
]


_B64_FIELDS = {"identity_key", "public_key", "signature"}


def mutate_bundle(rng: random.Random, world: World) -> Any:
    data = copy.deepcopy(rng.choice(world.bundles))
    if rng.random() < 0.05:
        return json_value(rng)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        path = rng.choice(BUNDLE_FIELDS)
        target = data
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            continue
        roll = rng.random()
        if roll < 0.15:
            target.pop(path[-1], None)
        elif roll < 0.3 and path[-1] in _B64_FIELDS and isinstance(target.get(path[-1]), str):
            try:
                raw = bytearray(base64.b64decode(target[path[-1]], validate=True))
            except ValueError:  # an earlier edit already broke it
                continue
            if raw:
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            target[path[-1]] = base64.b64encode(bytes(raw)).decode()
        elif roll < 0.4:
            # a field from the other bundle shape, or a swapped key
            other = rng.choice(world.bundles)
            target[path[-1]] = copy.deepcopy(other.get(path[0]))
        else:
            target[path[-1]] = json_value(rng)
    if rng.random() < 0.05:
        data[str(json_value(rng)) if rng.random() < 0.5 else "extra"] = json_value(rng)
    return data


# -- the bulk run ------------------------------------------------------------------------------


def _allowed(*samples: Sample) -> frozenset[bytes]:
    return frozenset(s.plaintext for s in samples if s.plaintext is not None)


def _bytes_inputs(
    rng: random.Random,
    samples: list[Sample],
    budget: int,
    structured: Callable[[random.Random], bytes],
) -> Iterator[tuple[Sample, bytes, frozenset[bytes], str]]:
    """Exhaustive edits of every sample, then random ones up to ``budget``."""
    produced = 0
    for sample in samples:
        for note, edits in (
            ("truncated", truncations(sample.body)),
            ("version byte", version_bytes(sample.body)),
            ("bit flip", bit_flips(sample.body)),
        ):
            for body in edits:
                produced += 1
                yield sample, body, _allowed(sample), note
    everything = [s.body for s in samples]
    sent = _allowed(*samples)
    while produced < budget:
        produced += 1
        sample = rng.choice(samples)
        roll = rng.random()
        if roll < 0.6:
            other = rng.choice(everything)
            splice = [s for s in samples if s.body == other]
            yield sample, mutate(rng, sample.body, other), _allowed(sample, *splice), "mutated"
        elif roll < 0.75:
            yield sample, random_bytes(rng), frozenset(), "random bytes"
        else:
            # Built around real parts (a real inner message, real keys): a success may
            # only return something that was really sent.
            yield sample, structured(rng), sent, "protobuf, wrong fields"


def _sender(rng: random.Random, sample: Sample) -> tuple[Address, bool]:
    """Mostly the real sender; sometimes another (the relay lies about the sender)."""
    if rng.random() < 0.97:
        return sample.sender, False
    others = [Address("alice", 1), Address("carol", 1), Address("mallory", 1), Address("alice", 2)]
    return rng.choice([a for a in others if a != sample.sender]), True


def run_bulk(oracle: Oracle, rng: random.Random) -> None:
    world = oracle.world

    for sample, body, allowed, note in _bytes_inputs(
        rng, world.prekey, BUDGET["decrypt/prekey"], lambda r: prekey_proto(r, world)
    ):
        sender, lied = _sender(rng, sample)
        # A first message binds the identity it carries to the claimed sender; that a
        # relay can misattribute it is the protocol's (the relay authenticates senders).
        oracle.decrypt(
            "prekey",
            sender,
            body,
            allowed,
            note + (", other sender" if lied else ""),
            identity=None if lied else sample.identity,
        )

    for sample, body, allowed, note in _bytes_inputs(
        rng,
        world.message,
        BUDGET["decrypt/message"] - FORGED_1TO1 - 200,
        lambda r: whisper_proto(r, world),
    ):
        sender, lied = _sender(rng, sample)
        oracle.decrypt(
            "message",
            sender,
            body,
            allowed,
            note + (", other sender" if lied else ""),
            identity=None if lied else sample.identity,
        )
    for i in range(400):
        # Bodies of one kind sent as the other kind (200 each way).
        sample = (world.prekey if i % 2 else world.message)[i // 2 % 4]
        kind = "message" if sample in world.prekey else "prekey"
        body = sample.body if i % 4 < 2 else mutate(rng, sample.body, sample.body)
        oracle.decrypt(kind, sample.sender, body, frozenset(), "kind confusion", sample.identity)
    carol = world.message[1]
    for body in PATHOLOGICAL:
        for sample in (world.prekey[0], world.message[1]):
            oracle.decrypt("prekey", sample.sender, body, frozenset(), "pathological protobuf")
            oracle.decrypt("message", sample.sender, body, frozenset(), "pathological protobuf")
        oracle.group_decrypt(GROUP, world.group[1].sender, body, frozenset(), "pathological")
        oracle.distribution(GROUP, world.distribution[1].sender, body, "pathological protobuf")
    for ahead in (1999, 2000, 2001, 5000):  # python-axolotl's skip limit is 2000
        body = forged_whisper_far(world, ahead)
        oracle.decrypt("message", carol.sender, body, None, f"forged {ahead} ahead", carol.identity)
    for _ in range(FORGED_1TO1 - 4):
        # Carol herself sends garbage under a valid MAC: any plaintext may come out.
        body = forged_whisper(rng, world)
        oracle.decrypt("message", carol.sender, body, None, "forged by Carol", carol.identity)

    for sample, body, allowed, note in _bytes_inputs(
        rng,
        world.group,
        BUDGET["group_decrypt"] - FORGED_GROUP - 300,
        lambda r: sender_key_proto(r, world),
    ):
        group = GROUP if rng.random() < 0.97 else rng.choice(["h", "G", "g "])
        sender, lied = _sender(rng, sample)
        oracle.group_decrypt(group, sender, body, allowed, note)
    for _ in range(300):
        # Wrong group, wrong sender for real messages.
        sample = rng.choice(world.group)
        group = rng.choice([GROUP, "h"])
        sender = rng.choice([Address("alice", 1), Address("carol", 1), Address("alice", 2)])
        oracle.group_decrypt(
            group,
            sender,
            sample.body,
            _allowed(sample) if (group, sender) == (GROUP, sample.sender) else frozenset(),
            "cross-wired",
        )

    alice = world.group[1].sender
    for jump in (2000, 2001, MAX_SENDER_KEY_JUMP, MAX_SENDER_KEY_JUMP + 1, 2**32):
        iteration = min(world.bob_iteration + jump, 2**32 - 1)
        body = forged_group(rng, world, iteration)
        oracle.group_decrypt(GROUP, alice, body, None, f"forged jump {jump}")
    for _ in range(FORGED_GROUP - 5):
        # Alice herself signs garbage: any plaintext may come out.
        oracle.group_decrypt(GROUP, alice, forged_group(rng, world), None, "forged by Alice")

    for sample, body, _, note in _bytes_inputs(
        rng,
        world.distribution,
        BUDGET["group_process_distribution"],
        lambda r: distribution_proto(r, world),
    ):
        group = GROUP if rng.random() < 0.9 else "h"
        oracle.distribution(group, sample.sender, body, note)

    for _ in range(BUDGET["PreKeyBundle.from_json"]):
        oracle.bundle(mutate_bundle(rng, world), "mutated bundle")

    samples = world.all_samples
    for body in PATHOLOGICAL:
        oracle.parse(body, "pathological protobuf")
    parse_inputs = BUDGET["wire.parse_*"] // 4 - len(PATHOLOGICAL)
    for i in range(parse_inputs):
        roll = rng.random()
        if i < 6:
            odd: Any = [
                None,
                "3",
                3,
                bytearray(samples[0].body),
                memoryview(samples[0].body),
                [0x33],
            ][i]
            oracle.parse(odd, "not bytes")
        elif roll < 0.5:
            sample = rng.choice(samples)
            oracle.parse(mutate(rng, sample.body, rng.choice(samples).body), "mutated")
        elif roll < 0.7:
            oracle.parse(random_bytes(rng), "random bytes")
        else:
            make = rng.choice([whisper_proto, prekey_proto, sender_key_proto, distribution_proto])
            oracle.parse(make(rng, world), "protobuf, wrong fields")


@pytest.fixture(scope="module")
def world() -> World:
    return build_world()


def test_100k_malformed_inputs_raise_only_typed_errors_and_change_nothing(
    world: World, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="axolotl")  # one warning per replayed setup
    oracle = Oracle(world)
    started = time.perf_counter()
    run_bulk(oracle, random.Random(SEED))
    elapsed = time.perf_counter() - started
    total = sum(oracle.count.values())
    with capsys.disabled():
        print(f"\nfuzz: {total} inputs in {elapsed:.1f} s")
        for path in BUDGET:
            print(f"  {path}: {oracle.count[path]} inputs, {oracle.refused[path]} refused")
        for what, n in sorted(oracle.accepted.items()):
            print(f"  accepted {n}: {what}")
    oracle.check()
    assert total >= MIN_TOTAL
    assert set(oracle.count) == set(BUDGET)
    for path, budget in BUDGET.items():
        assert oracle.count[path] >= budget * 0.99, path


# -- Hypothesis on top -------------------------------------------------------------------------

SEARCH = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _route(oracle: Oracle, sample: Sample, body: bytes, note: str) -> None:
    """Feed ``body`` to the path that ``sample`` came from."""
    world = oracle.world
    allowed = _allowed(sample)
    if sample in world.prekey:
        oracle.decrypt("prekey", sample.sender, body, allowed, note, sample.identity)
    elif sample in world.message:
        oracle.decrypt("message", sample.sender, body, allowed, note, sample.identity)
    elif sample in world.group:
        oracle.group_decrypt(GROUP, sample.sender, body, allowed, note)
    else:
        oracle.distribution(GROUP, sample.sender, body, note)


@SEARCH
@given(body=st.binary(max_size=600))
def test_arbitrary_bytes_on_every_path(world: World, body: bytes) -> None:
    oracle = Oracle(world)
    oracle.parse(body, "hypothesis bytes")
    for sample in (world.prekey[0], world.message[1], world.group[1], world.distribution[1]):
        # Bytes from nowhere never decrypt, whatever path they take.
        oracle.decrypt("prekey", sample.sender, body, frozenset(), "hypothesis bytes")
        oracle.decrypt("message", sample.sender, body, frozenset(), "hypothesis bytes")
        oracle.group_decrypt(GROUP, sample.sender, body, frozenset(), "hypothesis bytes")
        oracle.distribution(GROUP, sample.sender, body, "hypothesis bytes")
    oracle.check()


EDIT = st.tuples(
    st.sampled_from(["set", "xor", "insert", "delete"]),
    st.integers(min_value=0, max_value=400),
    st.integers(min_value=1, max_value=255),
)


@SEARCH
@given(data=st.data(), edits=st.lists(EDIT, min_size=1, max_size=5))
def test_edited_real_messages_on_their_own_path(
    world: World, data: st.DataObject, edits: list[tuple[str, int, int]]
) -> None:
    sample = data.draw(st.sampled_from(world.all_samples), label="sample")
    body = bytearray(sample.body)
    for op, position, value in edits:
        at = position % (len(body) + 1)
        if op == "insert":
            body[at:at] = bytes([value])
        elif body and op == "delete":
            del body[at % len(body)]
        elif body and op == "set":
            body[at % len(body)] = value
        elif body:
            body[at % len(body)] ^= value
    oracle = Oracle(world)
    _route(oracle, sample, bytes(body), "hypothesis edits")
    oracle.parse(bytes(body), "hypothesis edits")
    oracle.check()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=60),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=8,
)


@SEARCH
@given(data=st.data(), value=JSON)
def test_bundle_json_with_any_value_in_any_field(
    world: World, data: st.DataObject, value: Any
) -> None:
    bundle = copy.deepcopy(data.draw(st.sampled_from(world.bundles), label="bundle"))
    path = data.draw(st.sampled_from(BUNDLE_FIELDS), label="field")
    target = bundle
    for key in path[:-1]:
        target = target[key] if isinstance(target.get(key), dict) else {}
    target[path[-1]] = value
    oracle = Oracle(world)
    oracle.bundle(bundle, f"hypothesis {'.'.join(path)}")
    oracle.bundle(value, "hypothesis whole value")
    oracle.check()


# -- defects the fuzzer found: minimal reproductions -------------------------------------------


def test_rewrapped_message_cannot_change_the_senders_recorded_identity() -> None:
    """An envelope's identity key is believed only if it set up the session that decrypts.

    Found by the bulk run (bit flips in the identity key of a late prekey message).
    Anyone on the path can take a pending message from an established session, wrap
    it in a prekey envelope with a fresh base key and any identity key, and deliver
    it as kind "prekey". python-axolotl builds a (useless) new session from the
    envelope, archives the real one, then decrypts the inner message with the
    archived real session; the engine then records the envelope's identity key for
    the sender as a changed key (untrusted), reports an identity change, and holds
    sending to that contact. The user sees "safety number changed" for a key the
    contact never had.
    """
    from e2ee.core.keys import generate_identity

    bob, carol = _engine("bob"), _engine("carol")
    carol.process_bundle("bob", bob.local_bundle())
    bob.decrypt(carol.address, carol.encrypt(bob.address, b"hello"))
    carol.decrypt(bob.address, bob.encrypt(carol.address, b"hi"))
    pending = carol.encrypt(bob.address, b"genuine")
    assert pending.kind == "message"

    mallory = bytes(generate_identity()[0].getPublicKey().serialize())
    fresh_base_key = bytes(generate_identity()[0].getPublicKey().serialize())
    envelope = pb.PreKeyWhisperMessage(
        registrationId=1,
        signedPreKeyId=bob.local_bundle().signed_prekey.prekey_id,
        baseKey=fresh_base_key,
        identityKey=mallory,
        message=pending.body,
    )
    rewrapped = Ciphertext(
        "prekey", bytes([wire.CURRENT_VERSION_BYTE]) + envelope.SerializeToString()
    )
    try:
        decrypted = bob.decrypt(carol.address, rewrapped)
    except E2EEError:
        pass  # refusing the envelope is a fine answer
    else:
        assert decrypted.plaintext == b"genuine"
        assert decrypted.identity_change is None
    recorded = bob.identity(carol.address)
    assert recorded is not None and recorded.identity_key == carol.identity_key
    assert carol.decrypt(bob.address, bob.encrypt(carol.address, b"still talking")).plaintext


def test_device_id_range_is_the_same_for_accounts_bundles_and_senders() -> None:
    """Found while building bundle inputs: ``create_account`` used to take device ids
    up to 2**31-1 while ``PreKeyBundle.from_json`` refused any above 0xFFFFFF (and
    accepted 0). Now every entry point agrees with the relay: 1..127."""
    for device_id in (1, MAX_DEVICE_ID):
        engine = ProtocolEngine(MemoryProtocolStore(), now_ms=lambda: NOW_MS)
        engine.create_account("dave", device_id)
        bundle = engine.local_bundle(prekey_id=1)
        assert PreKeyBundle.from_json(bundle.to_json()) == bundle, device_id
    for device_id in (0, MAX_DEVICE_ID + 1, 2**31 - 1):
        with pytest.raises(UsageError):
            ProtocolEngine(MemoryProtocolStore()).create_account("dave", device_id)
        body = bundle.to_json() | {"device_id": device_id}
        with pytest.raises(InvalidBundle):
            PreKeyBundle.from_json(body)
        with pytest.raises(InvalidMessage):
            engine.decrypt(Address("erin", device_id), Ciphertext("message", b"\x33" + bytes(40)))
