"""Per-peer budgets for the work a received message can make the core do.

Invariants:

* Work is counted in *units*: one message-key derivation (a chain step of the 1:1
  ratchet or of a Sender Key chain) is one unit; an X25519 agreement, a key-pair
  generation and an XEdDSA signature check count as the derivations they cost
  (:data:`UNIT_COSTS`). Meters wrapped around those python-axolotl primitives
  (:func:`install`) count every call made while a :class:`WorkMeter` is active on
  the calling thread -- only inside the engine's decrypt paths; everywhere else
  the wrappers just call through.
* Every unit spent on a peer's message is charged to that peer's bucket except the
  *allowance* of a message that decrypts: the base cost of one in-order message
  (one DH ratchet step and its own key; for a setup also X3DH; for a group message
  its signature check and its own key). What is charged: skipped-key derivations,
  the work of every trial python-axolotl makes with a state that fails, and all of
  the work of a message that fails.
* A message is refused before any crypto when its peer's bucket is empty, or when
  the work its first trial will surely do exceeds what is left. The work of an
  admitted message stops (the meter raises) as soon as it would overdraw the bucket
  by more than the allowance. So, per peer, the work charged over any period is at
  most ``capacity + refill_per_s * seconds + allowance`` per concurrent message.
* Buckets live in memory only (a restart refills them), refill with the engine's
  clock (never the system's), and are bounded in number (least recently charged
  dropped first). Nothing here touches a store.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from axolotl.ecc.curve import Curve
from axolotl.groups.ratchet.senderchainkey import SenderChainKey
from axolotl.ratchet.chainkey import ChainKey

from e2ee.errors import DecryptBudgetExceeded, UsageError

__all__ = [
    "AGREEMENT",
    "ALLOWANCE_GROUP",
    "ALLOWANCE_MESSAGE",
    "ALLOWANCE_SETUP",
    "AXOLOTL_MAX_JUMP",
    "DERIVATION",
    "DH_STEP",
    "KEY_PAIR",
    "MAX_SENDER_KEY_JUMP",
    "MAX_SKIPPED_KEYS",
    "SIGNATURE_CHECK",
    "UNIT_COSTS",
    "DecryptLimits",
    "PeerBudgets",
    "WorkMeter",
    "install",
]

#: One message-key derivation (HMAC for the next chain key, HMAC + HKDF for the
#: message keys): the unit everything else is measured in.
DERIVATION = 1
#: An X25519 key agreement (libsodium through PyNaCl): measured at 3.7-5.4
#: derivations, counted high (an underestimate would loosen the CPU bound).
AGREEMENT = 5
#: A key pair generation (a scalar multiplication of the base point): 2.5-4.8.
KEY_PAIR = 3
#: An XEdDSA signature check (python-axolotl-curve25519): 19-27.
SIGNATURE_CHECK = 20
#: Units per metered primitive, by the python-axolotl name that is wrapped.
UNIT_COSTS: dict[str, int] = {
    "ChainKey.getMessageKeys": DERIVATION,
    "SenderChainKey.getSenderMessageKey": DERIVATION,
    "Curve.calculateAgreement": AGREEMENT,
    "Curve.generateKeyPair": KEY_PAIR,
    "Curve.verifySignature": SIGNATURE_CHECK,
}

#: A DH ratchet step on a message with a new ratchet key: two chains from the root
#: key (one agreement each) and our new ratchet key pair.
DH_STEP = 2 * AGREEMENT + KEY_PAIR
#: Free work of a 1:1 message that decrypts: a DH ratchet step and its own key.
ALLOWANCE_MESSAGE = DH_STEP + DERIVATION
#: Free work of a session setup that decrypts: X3DH (up to four agreements) and
#: the first message.
ALLOWANCE_SETUP = 4 * AGREEMENT + ALLOWANCE_MESSAGE
#: Free work of a group message that decrypts: its signature and its own key.
ALLOWANCE_GROUP = SIGNATURE_CHECK + DERIVATION

#: python-axolotl refuses a 1:1 message more than this far ahead of its chain
#: (``SessionCipher.getOrCreateMessageKeys``), before deriving anything.
AXOLOTL_MAX_JUMP = 2000
#: Default cap on a Sender Key message's jump ahead of its chain.
MAX_SENDER_KEY_JUMP = 2_000
#: Default cap on the skipped message keys kept per peer (see DecryptLimits).
MAX_SKIPPED_KEYS = 2_000


@dataclass(frozen=True, slots=True)
class DecryptLimits:
    """How much work and state a peer's messages may cost the receiver.

    Every field is validated on construction (:class:`UsageError`).

    Attributes:
        max_sender_key_jump: how far ahead of the chain a Sender Key message may
            be (iterations); refused with ``SenderKeyJumpTooLarge`` before any
            key is derived. At most ``max_skipped_keys``: keys beyond those kept
            would be derived only to be thrown away before the commit.
        max_skipped_keys: skipped message keys kept per peer record, all chains
            and states together (a 1:1 session with one device; a sender's
            Sender Key record in one group); the oldest are pruned first.
        work_capacity: the most work (units, see :data:`UNIT_COSTS`) one peer's
            messages may cost in a burst. At least 2,000 + ``DH_STEP`` (2,013) and at
            least ``max_sender_key_jump``, so every message python-axolotl would
            accept on its current chain can be admitted once the bucket is full.
        work_refill_per_s: units a peer's bucket regains per second of the
            engine's clock: the long-run ceiling on what the peer costs.
        max_tracked_peers: buckets kept in memory; the least recently charged
            one is dropped (refilled) beyond it.
        max_seen_base_keys: session-setup replay records kept per peer device
            (records whose signed prekey is gone are dropped as well).
        max_seen_distributions: Sender Key distribution replay records kept per
            sender and group.
    """

    max_sender_key_jump: int = MAX_SENDER_KEY_JUMP
    max_skipped_keys: int = MAX_SKIPPED_KEYS
    work_capacity: int = 4_000
    work_refill_per_s: int = 1_000
    max_tracked_peers: int = 10_000
    max_seen_base_keys: int = 64
    max_seen_distributions: int = 32

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"DecryptLimits.{name} must be a positive integer")
        if self.max_sender_key_jump > self.max_skipped_keys:
            raise UsageError("max_sender_key_jump must not exceed max_skipped_keys")
        floor = max(AXOLOTL_MAX_JUMP + DH_STEP, self.max_sender_key_jump)
        if self.work_capacity < floor:
            raise UsageError(f"work_capacity must be at least {floor} units")


class _Local(threading.local):
    meter: WorkMeter | None = None


_LOCAL = _Local()


class WorkMeter:
    """The work of one message, counted against its peer's bucket.

    Use as a context manager around the python-axolotl calls to meter; the engine
    settles it with :meth:`PeerBudgets.settle` when the message succeeded or failed.
    """

    __slots__ = ("_outer", "_retry_ms", "allowance", "level", "limit", "now_ms", "peer", "used")

    def __init__(
        self, peer: str, now_ms: int, level: float, allowance: int, retry_ms: int | None
    ) -> None:
        self.peer = peer
        self.now_ms = now_ms
        self.level = level
        self.allowance = allowance
        self.limit = level + allowance
        self.used = 0
        # When the bucket is full again; None when it was full already, so this
        # message needs more than a whole budget and retrying cannot help.
        self._retry_ms = retry_ms
        self._outer: WorkMeter | None = None

    def __repr__(self) -> str:
        return f"WorkMeter({self.peer!r}, used={self.used}, limit={self.limit:.0f})"

    def charge(self, units: int) -> None:
        """Count ``units`` about to be spent; raise instead if they overdraw."""
        used = self.used + units
        if used > self.limit:
            raise DecryptBudgetExceeded(
                self.peer, used - self.allowance, int(self.level), self._retry_ms
            )
        self.used = used

    def __enter__(self) -> WorkMeter:
        self._outer = _LOCAL.meter
        _LOCAL.meter = self
        return self

    def __exit__(self, *exc: object) -> None:
        _LOCAL.meter = self._outer
        self._outer = None


class PeerBudgets:
    """Token buckets of work units, one per peer (a remote user name).

    Args:
        limits: capacity, refill rate and how many buckets to keep.

    Thread-safe: devices of one peer may be decrypted in parallel.
    """

    __slots__ = ("_buckets", "_capacity", "_lock", "_max", "_per_ms")

    def __init__(self, limits: DecryptLimits) -> None:
        self._capacity = float(limits.work_capacity)
        self._per_ms = limits.work_refill_per_s / 1000.0
        self._max = limits.max_tracked_peers
        self._buckets: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PeerBudgets(tracked={len(self._buckets)})"

    def _level(self, peer: str, now_ms: int) -> float:
        entry = self._buckets.get(peer)
        if entry is None:
            return self._capacity
        level, at_ms = entry
        return min(self._capacity, level + max(0, now_ms - at_ms) * self._per_ms)

    def available(self, peer: str, now_ms: int) -> float:
        """Units ``peer`` may still spend at ``now_ms`` (negative while in debt)."""
        with self._lock:
            return self._level(peer, now_ms)

    def _retry_after_ms(self, needed: float, level: float) -> int | None:
        if needed > self._capacity:
            return None
        return max(1, math.ceil((needed - level) / self._per_ms))

    def check(self, peer: str, now_ms: int) -> None:
        """Refuse at once if ``peer``'s bucket is empty (before loading any state).

        Raises:
            DecryptBudgetExceeded: the bucket is empty or in debt.
        """
        if peer not in self._buckets:  # never charged, or dropped: full
            return
        with self._lock:
            level = self._level(peer, now_ms)
        if level <= 0:
            raise DecryptBudgetExceeded(peer, 1, int(level), self._retry_after_ms(1, level))

    def admit(self, peer: str, now_ms: int, allowance: int, expected: int = 0) -> WorkMeter:
        """A meter for one message of ``peer``, or a refusal before any work.

        Args:
            peer: the remote user name the work is charged to.
            now_ms: the engine's clock.
            allowance: the free base cost of this kind of message.
            expected: units beyond the allowance the message's first trial will
                spend for sure (e.g. a claimed jump).

        Raises:
            DecryptBudgetExceeded: the bucket is empty, or holds less than
                ``expected``.
        """
        with self._lock:
            level = self._level(peer, now_ms)
        needed = max(expected, 1)
        if level <= 0 or expected > level:
            raise DecryptBudgetExceeded(
                peer, needed, int(level), self._retry_after_ms(needed, level)
            )
        refill = None if level >= self._capacity else self._retry_after_ms(self._capacity, level)
        return WorkMeter(peer, now_ms, level, allowance, refill)

    def settle(self, meter: WorkMeter, *, succeeded: bool) -> None:
        """Charge what ``meter`` counted: beyond the allowance, or all on failure."""
        charge = meter.used - meter.allowance if succeeded else meter.used
        if charge <= 0:
            return
        with self._lock:
            buckets = self._buckets
            peer = meter.peer
            level = self._level(peer, meter.now_ms)
            # A concurrent message of the same peer may have settled with a later clock.
            at_ms = max(buckets[peer][1], meter.now_ms) if peer in buckets else meter.now_ms
            buckets[peer] = (level - charge, at_ms)
            buckets.move_to_end(peer)
            while len(buckets) > self._max:
                buckets.popitem(last=False)


# -- the meters ------------------------------------------------------------------------

#: What was installed before each meter (python-axolotl's or a fast path).
WRAPPED: dict[str, Any] = {}

_TARGETS: tuple[tuple[str, Any, str], ...] = (
    ("ChainKey.getMessageKeys", ChainKey, "getMessageKeys"),
    ("SenderChainKey.getSenderMessageKey", SenderChainKey, "getSenderMessageKey"),
    ("Curve.calculateAgreement", Curve, "calculateAgreement"),
    ("Curve.generateKeyPair", Curve, "generateKeyPair"),
    ("Curve.verifySignature", Curve, "verifySignature"),
)


def _metered(function: Callable[..., Any], units: int) -> Callable[..., Any]:
    local = _LOCAL

    def metered(*args: Any) -> Any:
        meter = local.meter
        if meter is not None:
            meter.charge(units)  # before the work: an overdraft never runs
        return function(*args)

    metered.__name__ = getattr(function, "__name__", "metered")
    metered.__doc__ = function.__doc__
    return metered


def install() -> None:
    """Wrap the metered primitives (whatever implementation is installed); idempotent.

    Call after the fast paths are installed, or they would replace the meters.
    """
    for name, owner, attr in _TARGETS:
        if name in WRAPPED:
            continue
        current = inspect.getattr_static(owner, attr)
        WRAPPED[name] = current
        units = UNIT_COSTS[name]
        if isinstance(current, staticmethod):
            setattr(owner, attr, staticmethod(_metered(current.__func__, units)))
        else:
            setattr(owner, attr, _metered(current, units))
