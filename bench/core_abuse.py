"""Abuse benchmark: what a hostile peer costs a receiver's protocol core (issue 19).

One receiver ("bob", default ``DecryptLimits``, the real clock) gets genuine traffic from
two peers -- carol (1:1) and dave (group) at ``--genuine-rate`` messages a second each --
while an attacker sends, at each rate of ``--rates``, one of:

* ``forged-1to1``: forged 1:1 messages 2,000 ahead of a chain bob knows (MAC never valid);
* ``forged-archived``: the same with a new ratchet key, from a peer that made 41 session
  setups, so python-axolotl would try all 41 states;
* ``jump-group``: legitimate Sender Key messages, each a maximal jump (2,000) ahead;
* ``forged-group``: group messages with a signature by the wrong key.

For each it prints the receiver's CPU time (``time.thread_time``) spent on the attacker's
messages as a share of one core over the run, what became of them (failed, refused, accepted),
and the genuine messages' decrypt time (median, p99) next to a run without attacker; every
genuine message must decrypt. Target: the attacker costs at most 10 % of one core while
genuine messages keep their normal rate. The share includes the first burst of a full budget
(``work_capacity``), so use runs of 10 s or more. First it prints the measured cost of each metered
primitive relative to one derivation (the unit weights in ``e2ee.core.budget``).

    python bench/core_abuse.py [--seconds S] [--rates 10,100,1000,2000] [--genuine-rate 50]
                               [--attacks forged-1to1,jump-group,...]

Figures from a busy machine are meaningless: run it on a quiet one. ``--seconds 0.5
--rates 10`` checks that it runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import e2ee  # noqa: F401  (installs the compat shim, fast paths and meters)
from e2ee.core import DecryptLimits, ProtocolEngine, budget
from e2ee.core.engine import Ciphertext
from e2ee.errors import DecryptBudgetExceeded, E2EEError
from e2ee.store import Changes, MemoryProtocolStore, SenderKeyId

GROUP = "g"
MAC_LENGTH = 8
TARGET_SHARE = 0.10
ATTACKS = ("forged-1to1", "forged-archived", "jump-group", "forged-group")


def device(name: str) -> ProtocolEngine:
    engine = ProtocolEngine(MemoryProtocolStore(), limits=DecryptLimits())
    engine.create_account(name, 1)
    return engine


def connect(sender: ProtocolEngine, receiver: ProtocolEngine) -> None:
    sender.process_bundle(receiver.address.name, receiver.local_bundle(None))
    receiver.decrypt(sender.address, sender.encrypt(receiver.address, b"hello"))
    sender.decrypt(receiver.address, receiver.encrypt(sender.address, b"hi"))
    receiver.decrypt(sender.address, sender.encrypt(receiver.address, b"known chain"))


def forged(genuine: Ciphertext, counter: int, ratchet_key: bytes | None = None) -> Ciphertext:
    from axolotl.protocol import whisperprotos_pb2 as pb  # after e2ee's protobuf shim

    proto = pb.WhisperMessage()
    proto.ParseFromString(genuine.body[1:-MAC_LENGTH])
    proto.counter = counter
    if ratchet_key is not None:
        proto.ratchetKey = ratchet_key
    return Ciphertext("message", genuine.body[:1] + proto.SerializeToString() + bytes(MAC_LENGTH))


def jump_chain(engine: ProtocolEngine, steps: int) -> None:
    from axolotl.groups.state.senderkeyrecord import SenderKeyRecord

    key_id = SenderKeyId(GROUP, engine.address)
    record = SenderKeyRecord(serialized=engine.store.load_sender_key(key_id))
    state = record.getSenderKeyState()
    chain = state.getSenderChainKey()
    for _ in range(steps):
        chain = chain.getNext()
    state.setSenderChainKey(chain)
    engine.store.commit(Changes(sender_keys_put={key_id: bytes(record.serialize())}))


@dataclass
class Run:
    attack_cpu_s: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    genuine_us: list[float] = field(default_factory=list)
    genuine_sent: int = 0
    genuine_ok: int = 0
    wall_s: float = 0.0


class World:
    """Bob, his genuine peers and one attacker set up for ``attack``."""

    def __init__(self, attack: str | None) -> None:
        from axolotl.ecc.curve import Curve
        from axolotl.groups.state.senderkeyrecord import SenderKeyRecord
        from axolotl.protocol import whisperprotos_pb2 as pb
        from axolotl.protocol.senderkeymessage import SenderKeyMessage

        self.bob = device("bob")
        self.carol, self.dave = device("carol"), device("dave")
        connect(self.carol, self.bob)
        self._distribute(self.dave)
        self.attack = attack
        self.mallory = device("mallory")
        if attack in ("forged-1to1", "forged-archived"):
            setups = 41 if attack == "forged-archived" else 1
            for _ in range(setups):
                connect(self.mallory, self.bob)
            template = self.mallory.encrypt(self.bob.address, b"template")
            proto = pb.WhisperMessage()
            proto.ParseFromString(template.body[1:-MAC_LENGTH])
            key = (
                bytes(Curve.generateKeyPair().getPublicKey().serialize())
                if attack == "forged-archived"
                else None
            )
            # A new ratchet key starts a chain at 0: 2,000 is the largest jump
            # python-axolotl derives for (it refuses more before deriving).
            counter = 2_000 if key else proto.counter + 2_000
            self.hostile = forged(template, counter, key)
        elif attack in ("jump-group", "forged-group"):
            self._distribute(self.mallory)
            if attack == "jump-group":
                self._new_jump()
            else:
                state = SenderKeyRecord(
                    serialized=self.mallory.store.load_sender_key(
                        SenderKeyId(GROUP, self.mallory.address)
                    )
                ).getSenderKeyState()
                stranger = Curve.generateKeyPair().getPrivateKey()
                self.group_hostile = bytes(
                    SenderKeyMessage(state.getKeyId(), 0, bytes(16), stranger).serialize()
                )

    def _distribute(self, member: ProtocolEngine) -> None:
        self.bob.group_process_distribution(GROUP, member.address, member.group_distribution(GROUP))

    def _new_jump(self) -> None:
        jump_chain(self.mallory, budget.MAX_SENDER_KEY_JUMP)
        self.group_hostile = self.mallory.group_encrypt(GROUP, b"far ahead")

    def attack_once(self) -> str:
        """Deliver one attacker message to bob; return what became of it."""
        try:
            if self.attack in ("forged-1to1", "forged-archived"):
                self.bob.decrypt(self.mallory.address, self.hostile)
            else:
                self.bob.group_decrypt(GROUP, self.mallory.address, self.group_hostile)
        except DecryptBudgetExceeded:
            return "refused"
        except E2EEError:
            return "failed"
        return "accepted"

    def after_accepted(self) -> None:
        if self.attack == "jump-group":
            self._new_jump()  # the attacker's own work, outside the receiver's timing


def run(world: World, seconds: float, attack_rate: float, genuine_rate: float) -> Run:
    result = Run()
    start = time.perf_counter()
    end = start + seconds
    next_attack = start
    next_genuine = start
    turn = 0
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        did = False
        if genuine_rate and now >= next_genuine:
            next_genuine += 1 / genuine_rate
            turn += 1
            text = b"genuine %d" % turn
            one = world.carol.encrypt(world.bob.address, text)
            many = world.dave.group_encrypt(GROUP, text)
            for kind in ("1:1", "group"):
                result.genuine_sent += 1
                t0 = time.perf_counter()
                try:
                    if kind == "1:1":
                        plain = world.bob.decrypt(world.carol.address, one).plaintext
                    else:
                        plain = world.bob.group_decrypt(GROUP, world.dave.address, many)
                except E2EEError:
                    plain = b""
                result.genuine_us.append((time.perf_counter() - t0) * 1e6)
                result.genuine_ok += plain == text
            did = True
        if world.attack and attack_rate and now >= next_attack:
            next_attack += 1 / attack_rate
            c0 = time.thread_time()
            outcome = world.attack_once()
            result.attack_cpu_s += time.thread_time() - c0
            result.outcomes[outcome] += 1
            if outcome == "accepted":
                world.after_accepted()
            did = True
        if not did:
            wake = min(next_genuine if genuine_rate else end, next_attack if attack_rate else end)
            time.sleep(max(0.0, min(wake, end) - time.perf_counter()))
    result.wall_s = time.perf_counter() - start
    return result


def unit_costs() -> dict[str, float]:
    """Microseconds per metered primitive, best of five rounds."""
    import os

    from axolotl.ecc.curve import Curve
    from axolotl.groups.ratchet.senderchainkey import SenderChainKey
    from axolotl.kdf.hkdfv3 import HKDFv3
    from axolotl.ratchet.chainkey import ChainKey

    chain = ChainKey(HKDFv3(), os.urandom(32), 0)
    sender_chain = SenderChainKey(0, os.urandom(32))
    a, b = Curve.generateKeyPair(), Curve.generateKeyPair()
    signature = Curve.calculateSignature(a.getPrivateKey(), b"x" * 100)
    ops: dict[str, Callable[[], object]] = {
        "derivation (1:1)": lambda: (chain.getMessageKeys(), chain.getNextChainKey()),
        "derivation (group)": lambda: (sender_chain.getSenderMessageKey(), sender_chain.getNext()),
        "agreement": lambda: Curve.calculateAgreement(a.getPublicKey(), b.getPrivateKey()),
        "key pair": Curve.generateKeyPair,
        "signature check": lambda: Curve.verifySignature(a.getPublicKey(), b"x" * 100, signature),
    }
    out = {}
    for name, op in ops.items():
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(200):
                op()
            best = min(best, (time.perf_counter() - t0) / 200)
        out[name] = best * 1e6
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each run")
    parser.add_argument("--rates", default="10,100,1000,2000", help="attacker messages/s")
    parser.add_argument("--genuine-rate", type=float, default=50.0, help="per genuine peer")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        parser.error(f"unknown attacks: {', '.join(sorted(unknown))}")

    costs = unit_costs()
    unit = costs["derivation (1:1)"]
    print("metered primitive        us    units (measured)  units (budget)")
    weights = {
        "derivation (1:1)": budget.DERIVATION,
        "derivation (group)": budget.DERIVATION,
        "agreement": budget.AGREEMENT,
        "key pair": budget.KEY_PAIR,
        "signature check": budget.SIGNATURE_CHECK,
    }
    for name, us in costs.items():
        print(f"{name:20} {us:8.1f} {us / unit:12.1f} {weights[name]:15}")
    limits = DecryptLimits()
    print(
        f"budget per peer: {limits.work_capacity} units burst, {limits.work_refill_per_s} units/s"
        f" = {limits.work_refill_per_s * unit / 1e4:.1f} % of one core at {unit:.1f} us/unit"
    )

    base = run(World(None), args.seconds, 0, args.genuine_rate)
    print(
        f"\nno attacker: genuine {base.genuine_ok}/{base.genuine_sent} decrypted, "
        f"median {statistics.median(base.genuine_us):.0f} us, "
        f"p99 {percentile(base.genuine_us, 0.99):.0f} us"
    )
    print(
        f"\n{'attack':16} {'rate/s':>7} {'sent':>6} {'failed':>6} {'refused':>7} {'accepted':>8} "
        f"{'cpu %':>6} {'genuine ok':>10} {'med us':>7} {'p99 us':>7}  verdict"
    )
    for attack in attacks:
        for rate in rates:
            result = run(World(attack), args.seconds, rate, args.genuine_rate)
            share = result.attack_cpu_s / result.wall_s
            ok = result.genuine_ok == result.genuine_sent and share <= TARGET_SHARE
            print(
                f"{attack:16} {rate:7.0f} {sum(result.outcomes.values()):6} "
                f"{result.outcomes['failed']:6} {result.outcomes['refused']:7} "
                f"{result.outcomes['accepted']:8} {share * 100:6.1f} "
                f"{result.genuine_ok:>5}/{result.genuine_sent:<4} "
                f"{statistics.median(result.genuine_us):7.0f} "
                f"{percentile(result.genuine_us, 0.99):7.0f}  {'ok' if ok else 'MISSED'}"
            )


if __name__ == "__main__":
    main()
