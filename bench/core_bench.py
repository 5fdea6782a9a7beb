"""Protocol-core benchmark: e2ee against stock python-axolotl, in one run.

Prints microseconds per message (100-byte plaintext) for:

* 1:1 encrypt+decrypt on the same chain, and under it the floor: python-axolotl's own
  ``SessionCipher`` with e2ee's fast paths but none of e2ee's layers,
* 1:1 ping-pong (a DH ratchet step every message),
* session setup (bundle -> first message decrypted -> first reply decrypted),
* group encrypt+decrypt (Sender Keys),
* the same 1:1 same-chain figure on the SQLite store (one committed, fsynced
  transaction per encrypt and per decrypt),
* the rejection time of a Sender Key message claiming a 2^32-1 jump,

and the same figures for stock python-axolotl 0.2.3 on pure-Python protobuf 3.20
(its own in-memory stores), measured in a subprocess from a separate virtualenv
(``$XDG_CACHE_HOME/blindpost/axolotl-reference``, default ``~/.cache``; created on first
use, outside the checkout so the project tree holds no second protobuf), with the ratio.

    python bench/core_bench.py [--count N] [--no-reference]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import e2ee  # noqa: F401
from e2ee.core import ProtocolEngine
from e2ee.errors import SenderKeyJumpTooLarge
from e2ee.store import Address, MemoryProtocolStore, ProtocolStore

PLAINTEXT = b"x" * 100
ALICE, BOB = Address("alice", 1), Address("bob", 1)
HERE = Path(__file__).resolve().parent
REFENV = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "blindpost"
    / "axolotl-reference"
)
TARGETS = {
    "same_chain_us": 150,
    "ping_pong_us": 700,
    "group_us": 500,
    "sqlite_encrypt_1tx_us": 1000,
    "sqlite_decrypt_1tx_us": 1000,
}


ROUNDS = 5
WARMUP_SECONDS = 1.0


def per_message(fn: Callable[[int], None], count: int) -> float:
    """Microseconds per message: the best of ROUNDS rounds of count/ROUNDS messages.

    The best round, as ``timeit`` reports, is the figure least disturbed by other
    processes on the machine; the reference is measured the same way. The warm-up
    runs for at least WARMUP_SECONDS: on this VM a CPU coming out of idle runs the
    first figure of a run 20-30 % slower than the same code a second later.
    """
    size = max(count // ROUNDS, 1)
    deadline = time.perf_counter() + WARMUP_SECONDS
    fn(max(count // 10, 1))
    while time.perf_counter() < deadline:
        fn(max(size // 4, 1))
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        fn(size)
        best = min(best, (time.perf_counter() - start) / size)
    return best * 1e6


def pair(make_store: Callable[[str], ProtocolStore]) -> tuple[ProtocolEngine, ProtocolEngine]:
    alice, bob = ProtocolEngine(make_store("alice")), ProtocolEngine(make_store("bob"))
    alice.create_account("alice", 1)
    bob.create_account("bob", 1)
    alice.process_bundle("bob", bob.local_bundle(1))
    bob.decrypt(ALICE, alice.encrypt(BOB, b"hello"))
    alice.decrypt(BOB, bob.encrypt(ALICE, b"hi"))
    return alice, bob


def measure_ours(count: int) -> dict[str, float]:
    alice, bob = pair(lambda _: MemoryProtocolStore())

    def same_chain(n: int) -> None:
        for _ in range(n):
            bob.decrypt(ALICE, alice.encrypt(BOB, PLAINTEXT))

    def ping_pong(n: int) -> None:
        for _ in range(n // 2):
            bob.decrypt(ALICE, alice.encrypt(BOB, PLAINTEXT))
            alice.decrypt(BOB, bob.encrypt(ALICE, PLAINTEXT))

    def session_setup_us(n: int) -> float:
        """Bundle -> first message decrypted -> reply decrypted; accounts made beforehand."""
        peers = []
        for _ in range(n):
            a, b = ProtocolEngine(MemoryProtocolStore()), ProtocolEngine(MemoryProtocolStore())
            a.create_account("alice", 1)
            b.create_account("bob", 1)
            peers.append((a, b, b.local_bundle(1)))
        start = time.perf_counter()
        for a, b, bundle in peers:
            a.process_bundle("bob", bundle)
            b.decrypt(ALICE, a.encrypt(BOB, PLAINTEXT))
            a.decrypt(BOB, b.encrypt(ALICE, PLAINTEXT))
        return (time.perf_counter() - start) / n * 1e6

    bob.group_process_distribution("g", ALICE, alice.group_distribution("g"))

    def group(n: int) -> None:
        for _ in range(n):
            bob.group_decrypt("g", ALICE, alice.group_encrypt("g", PLAINTEXT))

    # The floor under the same-chain figure: python-axolotl's own SessionCipher on its own
    # in-memory test stores, in this interpreter (upb protobuf, e2ee's fast paths
    # installed), with none of e2ee's layers (parsing, staging, commit, locks).
    import _axolotl_reference as raw
    from axolotl.protocol.whispermessage import WhisperMessage

    sender, receiver = raw.setup()

    def same_chain_floor(n: int) -> None:
        for _ in range(n):
            message = WhisperMessage(serialized=sender.encrypt(PLAINTEXT).serialize())
            receiver.decryptMsg(message)

    results = {
        "same_chain_us": per_message(same_chain, count),
        "same_chain_axolotl_floor_us": per_message(same_chain_floor, count),
        "ping_pong_us": per_message(ping_pong, count),
        "session_setup_us": session_setup_us(max(count // 20, 10)),
        "group_us": per_message(group, count),
    }
    results["jump_reject_us"] = measure_jump_rejection(alice, bob)
    results.update(measure_sqlite(count))
    return results


def measure_jump_rejection(alice: ProtocolEngine, bob: ProtocolEngine) -> float:
    from axolotl.groups.state.senderkeyrecord import SenderKeyRecord
    from axolotl.protocol.senderkeymessage import SenderKeyMessage

    from e2ee.store import SenderKeyId

    state = SenderKeyRecord(
        serialized=alice.store.load_sender_key(SenderKeyId("g", ALICE))
    ).getSenderKeyState()
    hostile = bytes(
        SenderKeyMessage(
            state.getKeyId(), 2**32 - 1, bytes(16), state.getSigningKeyPrivate()
        ).serialize()
    )
    start = time.perf_counter()
    try:
        bob.group_decrypt("g", ALICE, hostile)
    except SenderKeyJumpTooLarge:
        return (time.perf_counter() - start) * 1e6
    raise SystemExit("a 2^32-1 Sender Key jump was accepted")


def measure_sqlite(count: int) -> dict[str, float]:
    """Same-chain 1:1 on SQLite: end to end, and each side's one transaction alone."""
    from e2ee.store.sqlite import SQLiteProtocolStore

    n = max(count // 4, 50)
    with tempfile.TemporaryDirectory() as tmp:
        alice, bob = pair(lambda name: SQLiteProtocolStore.open(Path(tmp) / f"{name}.db"))

        def same_chain(k: int) -> None:
            for _ in range(k):
                bob.decrypt(ALICE, alice.encrypt(BOB, PLAINTEXT))

        end_to_end = per_message(same_chain, n)
        start = time.perf_counter()
        sent = [alice.encrypt(BOB, PLAINTEXT) for _ in range(n)]
        encrypt = (time.perf_counter() - start) / n * 1e6
        start = time.perf_counter()
        for message in sent:
            bob.decrypt(ALICE, message)
        decrypt = (time.perf_counter() - start) / n * 1e6
    return {
        "sqlite_same_chain_us": end_to_end,
        "sqlite_encrypt_1tx_us": encrypt,
        "sqlite_decrypt_1tx_us": decrypt,
    }


def measure_reference(count: int) -> dict[str, float] | None:
    python = REFENV / "bin" / "python"
    if not python.exists():
        print("creating the reference virtualenv (stock python-axolotl, protobuf 3.20) ...")
        REFENV.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(REFENV)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "python-axolotl==0.2.3",
                "protobuf==3.20.3",
            ],
            check=True,
        )
    out = subprocess.run(
        [str(python), str(HERE / "_axolotl_reference.py"), str(count)],
        check=True,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),  # never import this checkout's packages
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def verdict(value: float, target: float | None) -> str:
    if target is None:
        return ""
    return "ok" if value <= target else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=2000, help="messages per figure")
    parser.add_argument("--no-reference", action="store_true", help="skip stock python-axolotl")
    args = parser.parse_args()
    from google.protobuf.internal import api_implementation

    ours = measure_ours(args.count)
    reference = None if args.no_reference else measure_reference(args.count)
    print(
        f"e2ee on protobuf backend {api_implementation.Type()!r}; per message, 100-byte plaintext"
    )
    if reference:
        print(
            f"reference: stock python-axolotl on protobuf backend {reference['protobuf_backend']!r}"
        )
    print(f"{'figure':28} {'e2ee us':>10} {'stock us':>10} {'speed-up':>9} {'target us':>10}")
    for key, value in ours.items():
        ref = reference.get(key) if reference else None
        target = TARGETS.get(key)
        print(
            f"{key:28} {value:10.1f} {ref if ref is not None else float('nan'):10.1f} "
            f"{(ref / value) if ref else float('nan'):9.2f} "
            f"{target if target else '':>10} {verdict(value, target)}"
        )


if __name__ == "__main__":
    main()
