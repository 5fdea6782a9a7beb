# Invariants: the store holds only opaque bytes (ciphertext bodies, public keys); a write
# method's awaitable resolves only after its transaction is durably committed; a failed write
# changed nothing. Handlers depend on RelayStore alone, never on a concrete backend. Values on
# the hot path (one per message) are NamedTuples: immutable, and cheaper to build than frozen
# dataclasses.
"""The relay's storage contract (``RelayStore``) and the immutable values it exchanges."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, runtime_checkable

__all__ = [
    "Address",
    "Delivery",
    "DeviceBundle",
    "DeviceInfo",
    "EarlyDeliveryListener",
    "Envelope",
    "Invite",
    "KeyUpload",
    "OneTimePrekey",
    "ProvisionFill",
    "ProvisionSlot",
    "ProvisionTake",
    "RelayStore",
    "SendReceipt",
    "SenderKeyRow",
    "SignedPrekey",
    "StoreLimits",
    "StoreStats",
    "StoredMessage",
    "SupportsEarlyDelivery",
    "SweepReport",
]


class Address(NamedTuple):
    """A device address: username and device id."""

    user: str
    device: int


@dataclass(frozen=True, slots=True)
class SignedPrekey:
    """A signed prekey as uploaded (opaque to the relay)."""

    id: int
    public_key: bytes
    signature: bytes

    def __repr__(self) -> str:
        return f"SignedPrekey(id={self.id})"


@dataclass(frozen=True, slots=True)
class OneTimePrekey:
    """A one-time prekey as uploaded (opaque to the relay)."""

    id: int
    public_key: bytes

    def __repr__(self) -> str:
        return f"OneTimePrekey(id={self.id})"


@dataclass(frozen=True, slots=True)
class KeyUpload:
    """A validated ``PUT /v1/keys`` request."""

    identity_key: bytes
    registration_id: int
    signed_prekey: SignedPrekey | None
    one_time_prekeys: tuple[OneTimePrekey, ...]

    def __repr__(self) -> str:
        return f"KeyUpload(otpks={len(self.one_time_prekeys)})"


@dataclass(frozen=True, slots=True)
class DeviceBundle:
    """One device's prekey bundle as handed out to a requester."""

    device_id: int
    registration_id: int
    identity_key: bytes
    signed_prekey: SignedPrekey
    one_time_prekey: OneTimePrekey | None


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A registered device as listed to its own user."""

    device_id: int
    created_at: int
    has_keys: bool
    name: bytes | None = None  # opaque to the relay (the SDK encrypts it)
    last_seen: int | None = None  # coarse: see RelayStore.touch_device


@dataclass(frozen=True, slots=True)
class SenderKeyRow:
    """One of the relay's sender-certificate signing keys (relay.sealed): the Ed25519 seed,
    when it was made, and the previous key's signature over its public key (None for the
    first). Every node of a relay signs with the same rows."""

    key_id: int
    seed: bytes
    created_ms: int
    endorsement: bytes | None

    def __repr__(self) -> str:
        return f"SenderKeyRow(key_id={self.key_id}, created_ms={self.created_ms})"


class Envelope(NamedTuple):
    """A validated send request: 16-byte message id, recipient devices, opaque body.

    ``after`` (SEND_AFTER frames): the id of the sender's previous message; the store keeps
    this one only if that one is stored (or was delivered, within the dedupe window), and
    refuses it with :class:`~relay.errors.PredecessorMissing` otherwise, so a pipelining
    client's later messages never overtake an earlier one the relay refused.
    """

    message_id: bytes
    recipients: tuple[Address, ...]
    body: bytes
    after: bytes | None = None

    def __repr__(self) -> str:
        return (
            f"Envelope(id={self.message_id.hex()}, recipients={len(self.recipients)}, "
            f"size={len(self.body)})"
        )


class SendReceipt(NamedTuple):
    """The result of an accepted (or deduplicated) send; identical on every retry."""

    message_id: bytes
    recipients: int
    stored_at: int


class StoredMessage(NamedTuple):
    """A message as it sits in one mailbox."""

    seq: int
    message_id: bytes
    sender: Address
    stored_at: int
    body: bytes

    def __repr__(self) -> str:
        return f"StoredMessage(seq={self.seq}, id={self.message_id.hex()}, size={len(self.body)})"


class Delivery(NamedTuple):
    """A committed message for one recipient device, handed to the live-delivery listener."""

    recipient: Address
    message: StoredMessage


@dataclass(frozen=True, slots=True)
class Invite:
    """An invite code as the operator lists it (the code itself is never stored).

    ``id`` is the first 12 hex digits of the code's SHA-256.
    """

    id: str
    created_at: int
    expires_at: int
    used_by: str | None
    used_at: int | None


@dataclass(frozen=True, slots=True)
class ProvisionSlot:
    """A device-link provisioning slot (docs/relay-api.md, "Provisioning"): the new device's
    public auth key, when it expires, and whether an (encrypted) grant waits in it."""

    slot_id: bytes
    auth_key: bytes
    expires_ms: int
    filled: bool


#: ``fill_provision``'s outcome: stored, no live slot of that id, or a grant was there already.
ProvisionFill = Literal["stored", "missing", "filled"]


class ProvisionTake(NamedTuple):
    """``take_provision``'s outcome: ``found`` is False for no live slot with that id and
    token; ``grant`` is the ciphertext (the slot is gone then), None while none came yet."""

    found: bool
    grant: bytes | None


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one retention sweep removed: expired messages, blob ids, and (``dedupe``) the
    de-duplication records of delivered messages whose window had passed."""

    messages: int
    blobs: tuple[str, ...]
    dedupe: int = 0
    more: bool = False  # some limit of the call was reached: more may be due now


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """Quotas and retention every backend enforces.

    ``account_max_bytes``: what one account may keep stored: the bodies of its messages still
    waiting in some mailbox (each body once, whatever the number of recipients) plus the
    blobs it holds (``put_blob`` owner).

    ``sender_max_*`` / ``stranger_max_*``: the most one sending account may hold of one
    recipient device's mailbox (pending messages, bytes): ``sender_*`` when the recipient's
    account has ever sent to the sender's account, ``stranger_*`` otherwise (see
    ``rules.check_sender_share``).

    ``write_batch_max`` and ``write_batch_interval_ms`` concern batching backends only: at most
    that many write operations per transaction, and at least that many milliseconds between the
    starts of two transactions while writes keep arriving (a writer that has been idle for the
    interval commits at once). The interval trades at most that much latency for fewer, larger
    commits. The default 0 needs no pacing: the writer already groups every write that arrives
    while the previous transaction commits, so batches grow with the load by themselves; pacing
    only pays off where a commit's fixed cost is large against the CPU left for the messages
    (a slow disk). Measured both ways in docs/performance-relay-journal.md (fourth session).

    ``dedupe_window_ms``: how long after a message was first stored a retry of it (same
    sender device, same id) is still answered as a duplicate. While the message is queued its
    row answers; once every recipient acknowledged it, a de-duplication record that names
    neither sender nor time (relay.store.dedupe) answers, until the window (rounded up to a
    tenth of it) has passed, or until the sender settles the message (``ack``'s ``settled``:
    the SDK does once it recorded the send as done). The default covers the SDK's retries
    (docs/storage.md).

    ``checkpoint_commits`` (SQLite): every that many commits (and at least every 2 s while
    commits happen, however few: relay.store.sqlite) a background thread copies the
    write-ahead log into the database file, so the writer never pauses for that copy and its
    fsync; the writer then only copies the few pages committed meanwhile, and the log starts
    over (docs/performance-relay-journal.md, fifth session).

    ``pipelined_sync`` (SQLite): COMMIT only writes the log (``synchronous=NORMAL``) and a sync
    thread makes it durable (``fdatasync`` of the log) before the transaction's writers are
    answered, so the writer stages the next transaction while the last one is being synced,
    and one sync covers every commit made while the previous one ran. False: every COMMIT
    syncs itself (``synchronous=FULL``) and the writer waits for it.
    """

    max_devices_per_user: int = 127
    max_one_time_prekeys: int = 1000
    mailbox_max_messages: int = 10_000
    mailbox_max_bytes: int = 256 * 1024 * 1024
    sender_max_messages: int = 2500
    sender_max_bytes: int = 64 * 1024 * 1024
    stranger_max_messages: int = 1000
    stranger_max_bytes: int = 32 * 1024 * 1024
    account_max_bytes: int = 1024 * 1024 * 1024
    message_ttl_ms: int = 30 * 86400 * 1000
    blob_ttl_ms: int = 30 * 86400 * 1000
    dedupe_window_ms: int = 300 * 1000
    write_batch_max: int = 2000
    write_batch_interval_ms: float = 0.0
    checkpoint_commits: int = 512
    pipelined_sync: bool = True
    loop_staging: bool = True


# Upper bounds (seconds) of the writer-pause histogram's buckets (``PauseStats``).
PAUSE_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.02, 0.1, 0.5, 2.0)


@dataclass(frozen=True, slots=True)
class PauseStats:
    """How long one of the writer's steps held everything behind it, as a histogram:
    ``counts[i]`` pauses of at most ``PAUSE_BUCKETS[i]`` seconds (and above the one before),
    the last entry those longer than every bound; ``seconds`` their sum."""

    step: str
    counts: tuple[int, ...]
    seconds: float


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Cheap counters for /metrics (``commits``/``committed_ops``: batching backends;
    ``loop_staged``: sends the event loop staged into an open transaction itself, SQLite's
    ``loop_staging``; ``writer_pauses``: SQLite's writer, per step)."""

    queued: int
    accepted: int
    blob_bytes: int
    commits: int = 0
    committed_ops: int = 0
    loop_staged: int = 0
    writer_pauses: tuple[PauseStats, ...] = ()


DeliveryListener = Callable[[Sequence[Delivery]], None]


class EarlyDeliveryListener(Protocol):
    """Told of accepted sends before their commit (a store that supports it: SQLite).

    ``staged`` gets a chunk's deliveries once every check of their sends passed and their seqs
    are assigned, while the transaction that stores them is still open; their senders are
    answered only after COMMIT, and the committed batch still goes to the ``DeliveryListener``
    afterwards. A staged delivery may never be committed (the commit fails, or the process
    dies): its sender then gets an error, or no answer, and sends it again with the same
    message id, so the recipient sees that message twice and drops the copy by its id. Seqs
    are never reused, not even after a crash (the store skips past every seq it may have
    shown). ``settled(seq)`` follows each transaction: every seq up to ``seq`` is now
    committed or never will be.
    """

    def staged(self, deliveries: Sequence[Delivery], push: bool = True) -> None:
        """Accepted, not yet committed deliveries, in increasing seq (called on the loop).

        With ``push`` False they must not be shown before their commit (the committed batch
        brings them), and nothing later may overtake them.
        """

    def settled(self, seq: int) -> None:
        """Every seq up to ``seq`` is committed or failed (called on the loop)."""


@runtime_checkable
class SupportsEarlyDelivery(Protocol):
    """A store that can tell of accepted sends before their commit (SQLite)."""

    def set_early_delivery_listener(self, listener: EarlyDeliveryListener | None) -> None:
        """Register the early listener; None pushes only after COMMIT."""


class RelayStore(Protocol):
    """Async storage for accounts, prekeys, mailboxes and blob metadata.

    Write methods resolve after a durable commit. Every method raises only ``RelayError``
    subclasses (``StorageError`` when the backend fails).
    """

    def set_delivery_listener(self, listener: DeliveryListener | None) -> None:
        """Register the callback that receives committed deliveries, on the event loop.

        Args:
            listener: called with each committed batch's deliveries, in commit order.
        """

    async def open(self) -> None:
        """Open the backend (create the schema if needed)."""

    async def close(self) -> None:
        """Commit every write already submitted, then release resources."""

    def stats(self) -> StoreStats:
        """Return current counters (no I/O)."""

    async def create_account(
        self, addr: Address, auth_key: bytes, now_ms: int, invite: bytes | None = None
    ) -> None:
        """Register ``addr.user`` with its first device.

        Args:
            addr: the user and its first device.
            auth_key: the device's Ed25519 public key.
            now_ms: unix ms.
            invite: SHA-256 of an invite code, consumed in the same transaction.

        Raises:
            Conflict: ``username_taken``.
            Forbidden: ``invite_invalid`` (unknown, used or expired; nothing changed).
        """

    async def set_banned(self, user: str, banned: bool, now_ms: int) -> bool:
        """Ban or unban a user; return False when the user does not exist."""

    async def banned_users(self) -> frozenset[str]:
        """Every banned username."""

    async def create_invite(self, code_hash: bytes, now_ms: int, expires_ms: int) -> None:
        """Store a new single-use invite (its code's SHA-256)."""

    async def list_invites(self) -> list[Invite]:
        """Every stored invite, oldest first."""

    async def set_recovery_verifier(self, user: str, verifier: bytes) -> bool:
        """Store (or replace) the verifier of ``user``'s recovery key (an Ed25519 public key;
        docs/protocol.md, "Account recovery"); return False when the user does not exist."""

    async def recovery_verifier(self, user: str) -> bytes | None:
        """The stored recovery verifier of ``user``, or None (unknown user, or none set)."""

    async def open_provision(
        self, slot: ProvisionSlot, token_hash: bytes, now_ms: int, max_live: int
    ) -> bool:
        """Create a provisioning slot (``slot.filled`` is False) whose grant only the holder of
        the token hashing to ``token_hash`` may take. Expired slots are dropped first; returns
        False (nothing stored) when ``max_live`` live slots exist already.

        Raises:
            Conflict: a slot with this id exists (ids are random: practically never).
        """

    async def provision(self, slot_id: bytes, now_ms: int) -> ProvisionSlot | None:
        """The live (unexpired) slot with this id, or None."""

    async def fill_provision(self, slot_id: bytes, grant: bytes, now_ms: int) -> ProvisionFill:
        """Put the encrypted grant into a live, empty slot (at most once)."""

    async def take_provision(self, slot_id: bytes, token_hash: bytes, now_ms: int) -> ProvisionTake:
        """With the slot's token: its grant, deleting the slot in the same transaction (so a
        grant is handed out once), or None while it waits. An expired slot, an unknown id and a
        wrong token all read as not found."""

    async def sweep_provisions(self, now_ms: int) -> int:
        """Delete expired provisioning slots (with any grant in them); return how many."""

    async def touch_device(self, addr: Address, seen_ms: int) -> None:
        """Record that the device authenticated at ``seen_ms`` (callers round it down: the
        relay keeps a coarse last-seen only); nothing for an unknown device."""

    async def add_device(
        self, addr: Address, auth_key: bytes, now_ms: int, name: bytes | None = None
    ) -> None:
        """Add a device to an existing user, with an optional name (opaque bytes).

        Raises:
            NotFound: ``unknown_user``.
            Conflict: ``device_exists`` or ``too_many_devices``.
        """

    async def list_devices(self, user: str) -> list[DeviceInfo]:
        """List a user's devices sorted by id (empty for an unknown user)."""

    async def remove_device(self, addr: Address) -> None:
        """Remove a device with its mailbox and keys.

        Raises:
            NotFound: ``unknown_device``.
        """

    async def auth_key(self, addr: Address) -> bytes | None:
        """Return the device's Ed25519 public auth key, or None if it is not registered."""

    async def identity_key(self, addr: Address) -> bytes | None:
        """The identity key the device uploaded with its prekeys, or None (no such device, or
        no keys uploaded yet)."""

    async def sender_keys(self) -> list[SenderKeyRow]:
        """Every stored sender-certificate key, by key id."""

    async def add_sender_key(self, row: SenderKeyRow) -> bool:
        """Store a new sender-certificate key; False (nothing changed) when a key with that id
        exists already (another node made it first: read :meth:`sender_keys` again)."""

    async def set_access_verifier(self, user: str, verifier: bytes | None) -> bool:
        """Store (or replace, or with None remove) the verifier of ``user``'s delivery token
        (blindpost_wire.sealed.token_verifier); False when the user does not exist."""

    async def access_verifiers(self, users: Sequence[str]) -> dict[str, bytes]:
        """The stored delivery-token verifiers of those ``users`` that have one."""

    async def upload_keys(self, addr: Address, upload: KeyUpload) -> int:
        """Store prekeys for a device and return its one-time prekey count.

        Raises:
            BadRequest: first upload without a signed prekey.
            Conflict: ``identity_mismatch`` or ``prekey_pool_full``.
            NotFound: the device vanished.
        """

    async def prekey_count(self, addr: Address) -> int:
        """Return the number of one-time prekeys stored for a device."""

    async def fetch_bundles(
        self, user: str, device: int | None, one_time: bool = True
    ) -> list[DeviceBundle]:
        """Hand out bundles; each one-time prekey is removed as it is handed out.

        With ``one_time`` False the bundles carry no one-time prekey and the pool is left
        as it is (the target's one-time prekey budget is spent).

        Raises:
            NotFound: ``unknown_user`` or (for one device) ``unknown_device``.
        """

    def submit_send(
        self, sender: Address, envelope: Envelope, now_ms: int
    ) -> asyncio.Future[SendReceipt]:
        """Store a message once for all recipients; the future resolves after commit.

        A send also records that ``sender.user`` has written to each other recipient user
        (the "answered" relation ``rules.check_sender_share`` reads).

        Raises (through the future):
            MismatchedDevices, Conflict (``message_id_conflict``), SenderShareExceeded,
            MailboxFull, AccountQuotaExceeded, StorageError.
        """

    async def ack(
        self, addr: Address, message_ids: Sequence[bytes], settled: Sequence[bytes] = ()
    ) -> int:
        """Remove acknowledged messages from the device's own mailbox; return rows removed.

        ``settled``: ids of the device's own earlier sends that it will never send again (it
        saw their 200 and recorded them as sent): their de-duplication record goes now instead
        of at the end of ``dedupe_window_ms``, and one still queued leaves none when its last
        recipient acknowledges it. Ids the store does not know as this device's are ignored.
        Best effort across relay nodes: a record written by a concurrent batch on another
        node may stay until its window ends.
        """

    def submit_ack(
        self, addr: Address, message_ids: Sequence[bytes], settled: Sequence[bytes] = ()
    ) -> asyncio.Future[int]:
        """``ack`` as a future that resolves after commit (no task per ack on the hot path).

        Raises (through the future):
            StorageError.
        """

    async def fetch_mailbox(
        self, addr: Address, after_seq: int, limit: int, max_bytes: int
    ) -> list[StoredMessage]:
        """Return up to ``limit`` messages with seq > ``after_seq`` in seq order.

        At least one message is returned when any is waiting, even if it exceeds ``max_bytes``.
        """

    async def mailbox_count(self, addr: Address) -> int:
        """Return the number of messages waiting in a device's mailbox."""

    async def put_blob(
        self, blob_id: str, size: int, now_ms: int, owner: str | None = None
    ) -> bool:
        """Record (or refresh) blob metadata; return True when the blob is new.

        ``owner`` (the uploading user) then holds the blob: it counts against the owner's
        ``account_max_bytes`` and the owner may delete it. Several users may hold one blob.

        Raises:
            AccountQuotaExceeded: the owner does not hold it yet and it would not fit.
        """

    async def delete_blob(self, blob_id: str, owner: str) -> bool:
        """Drop ``owner``'s hold on a blob; return True when nobody holds it any more (its
        metadata is gone: the caller deletes the file).

        Raises:
            NotFound: ``unknown_blob`` (``owner`` does not hold it).
        """

    async def account_usage(self, user: str) -> int:
        """Bytes stored for ``user``: pending bodies it sent plus the blobs it holds."""

    async def blob_exists(self, blob_id: str) -> bool:
        """Return True when the blob's metadata is stored."""

    async def sweep(self, now_ms: int) -> SweepReport:
        """Delete expired messages, dedupe records past their window and blob metadata
        (bounded work per call)."""
