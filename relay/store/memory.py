# Invariants:
# * Same contract as SqliteRelayStore (one conformance suite runs against both): every write is
#   validated completely (relay.store.rules) before anything changes, so a failed write changed
#   nothing; futures resolve before the delivery listener runs, in commit order.
# * "Durable" means "in this object": data survives close()/open() of the same instance (a
#   restart in tests) and is lost with the object. For tests and for trying the relay; not for
#   production (docs/architecture.md).
# * Only opaque bytes are kept, as in every backend; a message every recipient acknowledged
#   leaves only its dedupe record (relay.store.dedupe), as in every backend.
"""In-memory twin of the relay store: ``MemoryRelayStore``."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from relay.errors import (
    AccountQuotaExceeded,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PredecessorMissing,
    RelayError,
    StorageError,
)
from relay.store.base import (
    Address,
    Delivery,
    DeliveryListener,
    DeviceBundle,
    DeviceInfo,
    Envelope,
    Invite,
    KeyUpload,
    OneTimePrekey,
    ProvisionFill,
    ProvisionSlot,
    ProvisionTake,
    SenderKeyRow,
    SendReceipt,
    SignedPrekey,
    StoredMessage,
    StoreLimits,
    StoreStats,
    SweepReport,
)
from relay.store.dedupe import SWEEP_CHUNK, DedupeRules, new_secret
from relay.store.rules import check_quota, check_sender_share, resolve_recipients

__all__ = ["MemoryRelayStore"]

_SWEEP_CHUNK = 5000


@dataclass(slots=True)
class _Device:
    auth_key: bytes
    created_ms: int
    name: bytes | None = None
    seen_ms: int | None = None
    registration_id: int | None = None
    identity_key: bytes | None = None
    signed_prekey: SignedPrekey | None = None
    otpks: dict[int, bytes] = field(default_factory=dict)
    mailbox: dict[int, bytes] = field(default_factory=dict)  # seq -> message id, seq order
    seq_of: dict[bytes, int] = field(default_factory=dict)  # message id -> seq
    usage: list[int] = field(default_factory=lambda: [0, 0])  # [count, bytes]
    by_sender: dict[str, list[int]] = field(default_factory=dict)  # sender -> [count, bytes]


@dataclass(slots=True)
class _Message:
    message_id: bytes
    sender: Address
    stored_ms: int
    n_recipients: int
    body: bytes
    dedupe_key: bytes
    holders: set[Address] = field(default_factory=set)
    settled: bool = False  # its sender settled it: it leaves no dedupe record


class MemoryRelayStore:
    """``RelayStore`` held in dicts, for tests and experiments.

    Args:
        limits: quotas and retention (``write_batch_max`` is ignored: nothing is batched).
    """

    def __init__(self, limits: StoreLimits | None = None) -> None:
        self._limits = limits or StoreLimits()
        self._users: dict[str, dict[int, _Device]] = {}
        self._messages: dict[bytes, _Message] = {}
        self._rules = DedupeRules(new_secret(), self._limits.dedupe_window_ms)
        self._delivered: dict[bytes, tuple[int, int]] = {}  # digest -> (expires, recipients)
        self._blobs: dict[str, tuple[int, int]] = {}  # id -> (size, stored_ms)
        self._wrote_to: set[tuple[str, str]] = set()  # (user, peer): user has sent to peer
        # code hash -> [created_ms, expires_ms, used_by, used_ms]
        self._invites: dict[bytes, list[int | str | None]] = {}
        self._banned: set[str] = set()
        self._recovery: dict[str, bytes] = {}  # user -> recovery verifier
        # slot id -> [slot, token hash, grant]
        self._provisions: dict[bytes, tuple[ProvisionSlot, bytes, bytes | None]] = {}
        self._access: dict[str, bytes] = {}  # user -> delivery-token verifier
        self._sender_keys: dict[int, SenderKeyRow] = {}
        self._blob_owners: dict[str, dict[str, int]] = {}  # blob id -> {user: size}
        self._sent_bytes: dict[str, int] = {}  # user -> pending bodies it sent
        self._held_bytes: dict[str, int] = {}  # user -> blobs it holds
        self._seq = 0
        self._queued = 0
        self._accepted = 0
        self._blob_bytes = 0
        self._listener: DeliveryListener | None = None
        self._open = False

    # -- lifecycle -----------------------------------------------------------------------

    def set_delivery_listener(self, listener: DeliveryListener | None) -> None:
        """See ``RelayStore.set_delivery_listener``."""
        self._listener = listener

    async def open(self) -> None:
        """See ``RelayStore.open`` (reopening keeps the data)."""
        self._open = True

    async def close(self) -> None:
        """See ``RelayStore.close``."""
        self._open = False

    def stats(self) -> StoreStats:
        """See ``RelayStore.stats``."""
        return StoreStats(self._queued, self._accepted, self._blob_bytes)

    def _check_open(self) -> None:
        if not self._open:
            raise StorageError("store is closed")

    def _device(self, addr: Address) -> _Device | None:
        devices = self._users.get(addr.user)
        return None if devices is None else devices.get(addr.device)

    # -- accounts ------------------------------------------------------------------------

    async def create_account(
        self, addr: Address, auth_key: bytes, now_ms: int, invite: bytes | None = None
    ) -> None:
        """See ``RelayStore.create_account``."""
        self._check_open()
        if addr.user in self._users:
            raise Conflict("username is taken", code="username_taken")
        if invite is not None:
            row = self._invites.get(invite)
            if row is None or row[2] is not None or int(row[1] or 0) < now_ms:
                raise Forbidden("unknown, used or expired invite code", code="invite_invalid")
            row[2], row[3] = addr.user, now_ms
        self._users[addr.user] = {addr.device: _Device(auth_key, now_ms)}

    async def set_banned(self, user: str, banned: bool, now_ms: int) -> bool:
        """See ``RelayStore.set_banned``."""
        self._check_open()
        if user not in self._users:
            return False
        if banned:
            self._banned.add(user)
        else:
            self._banned.discard(user)
        return True

    async def banned_users(self) -> frozenset[str]:
        """See ``RelayStore.banned_users``."""
        self._check_open()
        return frozenset(self._banned)

    async def create_invite(self, code_hash: bytes, now_ms: int, expires_ms: int) -> None:
        """See ``RelayStore.create_invite``."""
        self._check_open()
        self._invites[code_hash] = [now_ms, expires_ms, None, None]

    async def list_invites(self) -> list[Invite]:
        """See ``RelayStore.list_invites``."""
        self._check_open()
        out = [
            Invite(
                h.hex()[:12],
                int(r[0] or 0),
                int(r[1] or 0),
                None if r[2] is None else str(r[2]),
                None if r[3] is None else int(r[3]),
            )
            for h, r in self._invites.items()
        ]
        return sorted(out, key=lambda i: (i.created_at, i.id))

    async def set_recovery_verifier(self, user: str, verifier: bytes) -> bool:
        """See ``RelayStore.set_recovery_verifier``."""
        self._check_open()
        if user not in self._users:
            return False
        self._recovery[user] = bytes(verifier)
        return True

    async def recovery_verifier(self, user: str) -> bytes | None:
        """See ``RelayStore.recovery_verifier``."""
        self._check_open()
        return self._recovery.get(user)

    async def identity_key(self, addr: Address) -> bytes | None:
        """See ``RelayStore.identity_key``."""
        self._check_open()
        dev = self._users.get(addr.user, {}).get(addr.device)
        return None if dev is None else dev.identity_key

    async def sender_keys(self) -> list[SenderKeyRow]:
        """See ``RelayStore.sender_keys``."""
        self._check_open()
        return [self._sender_keys[k] for k in sorted(self._sender_keys)]

    async def add_sender_key(self, row: SenderKeyRow) -> bool:
        """See ``RelayStore.add_sender_key``."""
        self._check_open()
        if row.key_id in self._sender_keys:
            return False
        self._sender_keys[row.key_id] = row
        return True

    async def set_access_verifier(self, user: str, verifier: bytes | None) -> bool:
        """See ``RelayStore.set_access_verifier``."""
        self._check_open()
        if user not in self._users:
            return False
        if verifier is None:
            self._access.pop(user, None)
        else:
            self._access[user] = bytes(verifier)
        return True

    async def access_verifiers(self, users: Sequence[str]) -> dict[str, bytes]:
        """See ``RelayStore.access_verifiers``."""
        self._check_open()
        return {u: self._access[u] for u in users if u in self._access}

    async def open_provision(
        self, slot: ProvisionSlot, token_hash: bytes, now_ms: int, max_live: int
    ) -> bool:
        """See ``RelayStore.open_provision``."""
        self._check_open()
        await self.sweep_provisions(now_ms)
        if len(self._provisions) >= max_live:
            return False
        if slot.slot_id in self._provisions:
            raise Conflict("provisioning slot exists", code="provisioning_exists")
        self._provisions[slot.slot_id] = (slot, bytes(token_hash), None)
        return True

    def _live_provision(
        self, slot_id: bytes, now_ms: int
    ) -> tuple[ProvisionSlot, bytes, bytes | None] | None:
        found = self._provisions.get(slot_id)
        if found is None or found[0].expires_ms <= now_ms:
            return None
        return found

    async def provision(self, slot_id: bytes, now_ms: int) -> ProvisionSlot | None:
        """See ``RelayStore.provision``."""
        self._check_open()
        found = self._live_provision(slot_id, now_ms)
        return None if found is None else replace(found[0], filled=found[2] is not None)

    async def fill_provision(self, slot_id: bytes, grant: bytes, now_ms: int) -> ProvisionFill:
        """See ``RelayStore.fill_provision``."""
        self._check_open()
        found = self._live_provision(slot_id, now_ms)
        if found is None:
            return "missing"
        if found[2] is not None:
            return "filled"
        self._provisions[slot_id] = (found[0], found[1], bytes(grant))
        return "stored"

    async def take_provision(self, slot_id: bytes, token_hash: bytes, now_ms: int) -> ProvisionTake:
        """See ``RelayStore.take_provision``."""
        self._check_open()
        found = self._live_provision(slot_id, now_ms)
        if found is None or not hmac.compare_digest(found[1], token_hash):
            return ProvisionTake(False, None)
        if found[2] is None:
            return ProvisionTake(True, None)
        del self._provisions[slot_id]
        return ProvisionTake(True, found[2])

    async def sweep_provisions(self, now_ms: int) -> int:
        """See ``RelayStore.sweep_provisions``."""
        self._check_open()
        gone = [k for k, v in self._provisions.items() if v[0].expires_ms <= now_ms]
        for key in gone:
            del self._provisions[key]
        return len(gone)

    async def touch_device(self, addr: Address, seen_ms: int) -> None:
        """See ``RelayStore.touch_device``."""
        self._check_open()
        device = self._users.get(addr.user, {}).get(addr.device)
        if device is not None:
            device.seen_ms = seen_ms

    async def add_device(
        self, addr: Address, auth_key: bytes, now_ms: int, name: bytes | None = None
    ) -> None:
        """See ``RelayStore.add_device``."""
        self._check_open()
        devices = self._users.get(addr.user)
        if devices is None:
            raise NotFound("unknown user", code="unknown_user")
        if addr.device in devices:
            raise Conflict("device id already registered", code="device_exists")
        if len(devices) >= self._limits.max_devices_per_user:
            raise Conflict("too many devices", code="too_many_devices")
        devices[addr.device] = _Device(auth_key, now_ms, None if name is None else bytes(name))

    async def list_devices(self, user: str) -> list[DeviceInfo]:
        """See ``RelayStore.list_devices``."""
        self._check_open()
        devices = self._users.get(user, {})
        return [
            DeviceInfo(dev_id, d.created_ms, d.signed_prekey is not None, d.name, d.seen_ms)
            for dev_id, d in sorted(devices.items())
        ]

    async def remove_device(self, addr: Address) -> None:
        """See ``RelayStore.remove_device``."""
        self._check_open()
        dev = self._device(addr)
        if dev is None:
            raise NotFound("unknown device", code="unknown_device")
        self._drop_entries(addr, dev, list(dev.mailbox.values()))
        del self._users[addr.user][addr.device]

    async def auth_key(self, addr: Address) -> bytes | None:
        """See ``RelayStore.auth_key``."""
        self._check_open()
        dev = self._device(addr)
        return None if dev is None else dev.auth_key

    # -- keys ----------------------------------------------------------------------------

    async def upload_keys(self, addr: Address, upload: KeyUpload) -> int:
        """See ``RelayStore.upload_keys``."""
        self._check_open()
        dev = self._device(addr)
        if dev is None:
            raise NotFound("unknown device", code="unknown_device")
        if dev.identity_key is not None and dev.identity_key != upload.identity_key:
            raise Conflict("a different identity key is registered", code="identity_mismatch")
        if dev.signed_prekey is None and upload.signed_prekey is None:
            raise BadRequest("the first upload must include signed_prekey")
        new_ids = {k.id for k in upload.one_time_prekeys}
        total = len(dev.otpks) + len(new_ids - set(dev.otpks))
        if total > self._limits.max_one_time_prekeys:
            raise Conflict("too many one-time prekeys stored", code="prekey_pool_full")
        dev.identity_key = upload.identity_key
        dev.registration_id = upload.registration_id
        if upload.signed_prekey is not None:
            dev.signed_prekey = upload.signed_prekey
        for k in upload.one_time_prekeys:
            dev.otpks[k.id] = k.public_key
        return total

    async def prekey_count(self, addr: Address) -> int:
        """See ``RelayStore.prekey_count``."""
        self._check_open()
        dev = self._device(addr)
        return 0 if dev is None else len(dev.otpks)

    async def fetch_bundles(
        self, user: str, device: int | None, one_time: bool = True
    ) -> list[DeviceBundle]:
        """See ``RelayStore.fetch_bundles``."""
        self._check_open()
        devices = self._users.get(user)
        if devices is None:
            raise NotFound("unknown user", code="unknown_user")
        if device is not None:
            targets = [(device, devices[device])] if device in devices else []
        else:
            targets = sorted(devices.items())
        bundles: list[DeviceBundle] = []
        for dev_id, dev in targets:
            spk = dev.signed_prekey
            if dev.identity_key is None or spk is None:
                continue
            otpk = None
            if one_time and dev.otpks:
                key_id = min(dev.otpks)
                otpk = OneTimePrekey(key_id, dev.otpks.pop(key_id))
            bundles.append(
                DeviceBundle(dev_id, dev.registration_id or 0, dev.identity_key, spk, otpk)
            )
        if device is not None and not bundles:
            raise NotFound("unknown device or no keys uploaded", code="unknown_device")
        return bundles

    # -- messages ------------------------------------------------------------------------

    def submit_send(
        self, sender: Address, envelope: Envelope, now_ms: int
    ) -> asyncio.Future[SendReceipt]:
        """See ``RelayStore.submit_send``."""
        self._check_open()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[SendReceipt] = loop.create_future()
        try:
            receipt, deliveries = self._send(sender, envelope, now_ms)
        except RelayError as exc:  # MismatchedDevices, Conflict, MailboxFull
            fut.set_exception(exc)
            return fut
        fut.set_result(receipt)
        if deliveries and self._listener is not None:
            loop.call_soon(self._deliver, deliveries)  # after the future's callbacks
        return fut

    def _deliver(self, deliveries: list[Delivery]) -> None:
        if self._listener is not None:
            self._listener(deliveries)

    def _stored_by(self, sender: Address, message_id: bytes) -> bool:
        """Whether ``sender``'s message ``message_id`` is stored (queued, or delivered)."""
        known = self._messages.get(message_id)
        if known is not None:
            return known.sender == sender
        return self._rules.digest(sender, message_id) in self._delivered

    def _send(
        self, sender: Address, env: Envelope, now_ms: int
    ) -> tuple[SendReceipt, list[Delivery]]:
        dkey = self._rules.digest(sender, env.message_id)
        done = self._delivered.get(dkey)
        if done is not None:
            return self._rules.receipt(env.message_id, done[1], done[0]), []
        known = self._messages.get(env.message_id)
        if known is not None:
            if known.sender != sender:
                raise Conflict("message id used by another sender", code="message_id_conflict")
            return SendReceipt(env.message_id, known.n_recipients, known.stored_ms), []
        if env.after is not None and not self._stored_by(sender, env.after):
            raise PredecessorMissing()
        targets = resolve_recipients(sender, env.recipients, self._users.get)
        size = len(env.body)
        lim = self._limits
        user = sender.user
        check_sender_share(
            user,
            targets,
            lambda d: d.by_sender.get(user, (0, 0)),
            lambda peer: (peer, user) in self._wrote_to,
            size,
            lim,
        )
        check_quota(
            targets, lambda d: d.usage, size, lim.mailbox_max_messages, lim.mailbox_max_bytes
        )
        if self._usage(user) + size > lim.account_max_bytes:
            raise AccountQuotaExceeded(lim.account_max_bytes)
        self._sent_bytes[user] = self._sent_bytes.get(user, 0) + size
        sealed = user not in self._users  # a sealed send's pseudonym (relay.sealed)
        for addr, _ in targets:
            if addr.user != user and not sealed:
                self._wrote_to.add((user, addr.user))
        msg = _Message(env.message_id, sender, now_ms, len(targets), env.body, dkey)
        self._messages[env.message_id] = msg
        deliveries = []
        for addr, dev in targets:
            self._seq += 1
            dev.mailbox[self._seq] = env.message_id
            dev.seq_of[env.message_id] = self._seq
            msg.holders.add(addr)
            dev.usage[0] += 1
            dev.usage[1] += size
            share = dev.by_sender.setdefault(user, [0, 0])
            share[0] += 1
            share[1] += size
            stored = StoredMessage(self._seq, env.message_id, sender, now_ms, env.body)
            deliveries.append(Delivery(addr, stored))
        self._queued += len(targets)
        self._accepted += 1
        return SendReceipt(env.message_id, len(targets), now_ms), deliveries

    def _drop_entries(self, addr: Address, dev: _Device, message_ids: Sequence[bytes]) -> int:
        """Remove mailbox entries (ack, device removal, expiry); drop bodies nobody holds."""
        removed = 0
        for mid in message_ids:
            seq = dev.seq_of.pop(mid, None)
            if seq is None:
                continue
            del dev.mailbox[seq]
            removed += 1
            msg = self._messages[mid]
            dev.usage[0] -= 1
            dev.usage[1] -= len(msg.body)
            share = dev.by_sender[msg.sender.user]
            share[0] -= 1
            share[1] -= len(msg.body)
            if not share[0]:
                del dev.by_sender[msg.sender.user]
            msg.holders.discard(addr)
            if not msg.holders:
                self._forget(msg)
        self._queued -= removed
        return removed

    def _forget(self, msg: _Message) -> None:
        """Replace a message no mailbox holds any more by its dedupe record."""
        user = msg.sender.user
        left = self._sent_bytes.get(user, 0) - len(msg.body)
        if left:
            self._sent_bytes[user] = left
        else:
            self._sent_bytes.pop(user, None)
        del self._messages[msg.message_id]
        if not msg.settled:
            expires = self._rules.expires(msg.stored_ms)
            self._delivered.setdefault(msg.dedupe_key, (expires, msg.n_recipients))

    def _settle(self, addr: Address, message_ids: Sequence[bytes]) -> None:
        """``addr`` will not send these again: drop their records (``RelayStore.ack``)."""
        for mid in message_ids:
            key = self._rules.digest(addr, mid)
            msg = self._messages.get(mid)
            if msg is not None and msg.dedupe_key == key:
                msg.settled = True
            self._delivered.pop(key, None)

    async def ack(
        self, addr: Address, message_ids: Sequence[bytes], settled: Sequence[bytes] = ()
    ) -> int:
        """See ``RelayStore.ack``."""
        return await self.submit_ack(addr, message_ids, settled)

    def submit_ack(
        self, addr: Address, message_ids: Sequence[bytes], settled: Sequence[bytes] = ()
    ) -> asyncio.Future[int]:
        """See ``RelayStore.submit_ack``."""
        self._check_open()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._settle(addr, settled)
        dev = self._device(addr)
        unique = list(dict.fromkeys(message_ids))
        fut.set_result(0 if dev is None else self._drop_entries(addr, dev, unique))
        return fut

    async def fetch_mailbox(
        self, addr: Address, after_seq: int, limit: int, max_bytes: int
    ) -> list[StoredMessage]:
        """See ``RelayStore.fetch_mailbox``."""
        self._check_open()
        dev = self._device(addr)
        out: list[StoredMessage] = []
        if dev is None:
            return out
        total = 0
        for seq, mid in dev.mailbox.items():
            if seq <= after_seq:
                continue
            if len(out) >= limit:
                break
            msg = self._messages[mid]
            body = msg.body
            if out and total + len(body) > max_bytes:
                break
            total += len(body)
            out.append(StoredMessage(seq, mid, msg.sender, msg.stored_ms, body))
        return out

    async def mailbox_count(self, addr: Address) -> int:
        """See ``RelayStore.mailbox_count``."""
        self._check_open()
        dev = self._device(addr)
        return 0 if dev is None else len(dev.mailbox)

    # -- blobs and retention -------------------------------------------------------------

    def _usage(self, user: str) -> int:
        return self._sent_bytes.get(user, 0) + self._held_bytes.get(user, 0)

    async def account_usage(self, user: str) -> int:
        """See ``RelayStore.account_usage``."""
        self._check_open()
        return self._usage(user)

    async def put_blob(
        self, blob_id: str, size: int, now_ms: int, owner: str | None = None
    ) -> bool:
        """See ``RelayStore.put_blob``."""
        self._check_open()
        old = self._blobs.get(blob_id)
        held = size if old is None else old[0]
        if owner is not None:
            owners = self._blob_owners.setdefault(blob_id, {})
            if owner not in owners:
                limit = self._limits.account_max_bytes
                if self._usage(owner) + held > limit:
                    if not owners:
                        del self._blob_owners[blob_id]
                    raise AccountQuotaExceeded(limit)
                owners[owner] = held
                self._held_bytes[owner] = self._held_bytes.get(owner, 0) + held
        self._blobs[blob_id] = (size if old is None else old[0], now_ms)
        if old is None:
            self._blob_bytes += size
        return old is None

    async def blob_exists(self, blob_id: str) -> bool:
        """See ``RelayStore.blob_exists``."""
        self._check_open()
        return blob_id in self._blobs

    async def delete_blob(self, blob_id: str, owner: str) -> bool:
        """See ``RelayStore.delete_blob``."""
        self._check_open()
        owners = self._blob_owners.get(blob_id, {})
        if owner not in owners:
            raise NotFound("unknown blob", code="unknown_blob")
        self._held_bytes[owner] -= owners.pop(owner)
        if owners:
            return False
        del self._blob_owners[blob_id]
        self._blob_bytes -= self._blobs.pop(blob_id)[0]
        return True

    async def sweep(self, now_ms: int) -> SweepReport:
        """See ``RelayStore.sweep`` (the same bounded chunks as the SQLite store)."""
        self._check_open()
        lim = self._limits
        cutoff = now_ms - lim.message_ttl_ms
        expired = sorted(
            (m for m in self._messages.values() if m.stored_ms < cutoff),
            key=lambda m: m.stored_ms,
        )[:_SWEEP_CHUNK]
        for msg in expired:
            for holder in list(msg.holders):
                dev = self._device(holder)
                if dev is not None:
                    self._drop_entries(holder, dev, [msg.message_id])
            if msg.message_id in self._messages:  # held by no mailbox (no recipients)
                self._forget(msg)
        due = self._rules.current(now_ms)
        forgotten = [k for k, (exp, _) in self._delivered.items() if exp <= due][:SWEEP_CHUNK]
        for key in forgotten:
            del self._delivered[key]
        blob_cutoff = now_ms - lim.blob_ttl_ms
        blobs = [b for b, (_, stored) in self._blobs.items() if stored < blob_cutoff]
        blobs = blobs[:_SWEEP_CHUNK]
        for blob_id in blobs:
            self._blob_bytes -= self._blobs.pop(blob_id)[0]
            for user, held in self._blob_owners.pop(blob_id, {}).items():
                self._held_bytes[user] -= held
        more = _SWEEP_CHUNK in (len(expired), len(blobs)) or len(forgotten) == SWEEP_CHUNK
        return SweepReport(len(expired), tuple(blobs), len(forgotten), more)
