"""Sealed sender in the client: our access key, the pinned relay keys, our certificate, the
contacts' access keys; sealing what we send and opening what arrives; the settings a user
changes (:class:`SealedSender`, ``client.sealed``).

Invariants:

* Everything sealed sender keeps lives in the store's meta table (encrypted at rest with the
  rest of the store): our access key (``sealed:access_key``), the verifier the relay last
  accepted for it, the pinned relay keys, our current certificate and its expiry, and one
  access key per contact (``sealed:peer:<user>``). A contact's key is learnt only from a
  payload that decrypted under that contact's session, in the transaction that stores it.
* Sealing is best effort and never loses a message. Every message goes in a sealed envelope
  (with our certificate when we hold one) as soon as we know the identity key of every
  recipient device; only without one (no session yet) does it go in a version 1 envelope.
  It goes without our name only when we hold a certificate and every recipient user's
  access key and our own other devices are not among the recipients; otherwise the
  authenticated way, still sealed inside (the group id stays hidden). A token the relay
  refuses is forgotten and the same message is sent authenticated at once. The outbox asks
  :meth:`Sealing.hideable` to send our other devices' copies apart, so that a message to
  contacts does not go with our name for their sake (e2ee.client.sync).
* One access key per account, the same on each of its devices (the relay keeps one
  verifier per account): derived from the identity key pair and a rotation epoch
  (``sealed:access_epoch``); a device takes a later epoch's key only from a payload of our
  own other device (:meth:`Sealing.learn`), and stamps its key on its copies to them.
* The relay holds our token verifier exactly while we accept sealed messages
  (``sealed:refuse`` unset): the choice and a new access key are committed first and the
  relay told after, so a failed request is repeated at the next :meth:`Sealing.refresh`.
  While we refuse, our payloads carry no access key.
* Our access key reaches only users we write to ourselves (the payloads we compose, and the
  group's Sender Key distributions), never through receipts or session resets, which we also
  send to strangers.
* :meth:`Sealing.send` says whether a message went with our name: only those ids are
  ever settled (e2ee.client.settling); settling one sent without it would name its sender.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from blindpost_wire.frames import WireError
from blindpost_wire.names import is_sealed_sender
from blindpost_wire.sealed import CertificateFields, parse_certificate, token_verifier
from e2ee import payload
from e2ee.core.sealed import (
    ACCESS_KEY_LENGTH,
    RelayKey,
    RelayKeyPins,
    SealedContent,
    SealedRecipient,
    account_access_key,
    delivery_token,
    is_sealed,
    seal,
    verify_certificate,
)
from e2ee.errors import (
    CertificateMismatch,
    E2EEError,
    InvalidMessage,
    StorageError,
    TransportError,
    UsageError,
)
from e2ee.store import Address, Changes
from e2ee.transport.errors import DeliveryTokenRefused
from e2ee.transport.sealed_requests import (
    issue_certificate,
    send_sealed,
    sender_keys,
    set_access,
)

if TYPE_CHECKING:
    from e2ee.client.context import ClientContext

__all__ = ["Opened", "SealedSender", "Sealing", "SealingBatch"]

_log = logging.getLogger("e2ee.client.sealing")

_META_ACCESS = "sealed:access_key"
_META_REGISTERED = "sealed:registered"
_META_PINS = "sealed:pins"
_META_CERT = "sealed:cert"
_META_CERT_EXPIRES = "sealed:cert_expires"
_META_PEER = "sealed:peer:"
_META_EPOCH = "sealed:access_epoch"  # the rotation epoch of our access key
_META_REFUSE = "sealed:refuse"  # "1": we accept no sealed message (the relay holds no verifier)
#: A certificate with less than this left is renewed at the next maintenance run...
_RENEW_MS = 6 * 3600 * 1000
#: ...and one with less than this left is not put on a message (it could expire in flight).
_USABLE_MS = 5 * 60 * 1000
#: Messages under a relay key newer than every pinned one are deferred (not acknowledged),
#: with a refresh started, for at most this long after the key was first met; then refused.
_PIN_WAIT_MS = 30_000
#: How many rotations ahead of ours a key from our own other device may be (one message of
#: theirs per rotation is enough to keep up; a device offline through more rotations than
#: this keeps its key until it rotates itself).
_EPOCH_LOOKAHEAD = 64
#: Payload kinds that never carry our access key: we send them to strangers too.
_NO_ACCESS_KEY = frozenset({"receipt", "session_reset"})


class Opened:
    """A delivery after its sealed layer: who sent it, the version 1 envelope, and the
    verified certificate (None when the relay vouched for the sender)."""

    __slots__ = ("certificate", "envelope", "sender")

    def __init__(
        self, sender: Address, envelope: bytes, certificate: CertificateFields | None
    ) -> None:
        self.sender = sender
        self.envelope = envelope
        self.certificate = certificate

    def __repr__(self) -> str:
        return f"Opened(sender={self.sender}, sealed={self.certificate is not None})"


class Sealing:
    """Sealed sender for one open client (see the module's invariants)."""

    def __init__(self, ctx: ClientContext) -> None:
        self._ctx = ctx
        #: Set when a message names a relay key we may not have fetched yet.
        self.refresh_due = False
        self._waits: dict[int, int] = {}  # relay key id -> when a message first named it (ms)
        self._refreshing: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Sealing({self._ctx.me}, enabled={self.enabled})"

    @property
    def enabled(self) -> bool:
        """Whether we seal what we send (``ClientOptions.sealed_sender``)."""
        return self._ctx.options.sealed_sender

    # -- state ----------------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        return self._ctx.store.get_meta(key)

    def _put(self, values: Mapping[str, str]) -> None:
        with self._ctx.wlock:
            self._ctx.store.commit(Changes(meta_put=dict(values)))

    def access_key(self) -> bytes | None:
        """Our access key, or None before the first :meth:`refresh`."""
        value = self._meta(_META_ACCESS)
        return None if value is None else bytes.fromhex(value)

    def pins(self) -> RelayKeyPins:
        """The relay certificate keys we trust."""
        value = self._meta(_META_PINS)
        if not value:
            return RelayKeyPins()
        return RelayKeyPins({int(k): bytes.fromhex(v) for k, v in json.loads(value).items()})

    def peer_key(self, user: str) -> bytes | None:
        """The access key ``user`` shared with us, or None."""
        value = self._meta(_META_PEER + user)
        return bytes.fromhex(value) if value else None

    def _epoch(self) -> int | None:
        value = self._meta(_META_EPOCH)
        return int(value) if value else None

    def _derive(self, epoch: int) -> bytes:
        """Our access key of ``epoch`` (blocking: reads our identity key pair)."""
        account = self._ctx.store.load_account()
        if account is None:
            raise StorageError("the account is gone from the store")
        return account_access_key(account.identity_key_pair, epoch)

    def _stored_certificate(self) -> tuple[bytes, int] | None:
        """Our stored certificate and its expiry, if it names this device (a restored backup
        carries the old device's, which must not be used)."""
        cert, expires = self._meta(_META_CERT), self._meta(_META_CERT_EXPIRES)
        if not cert or not expires:
            return None
        data = bytes.fromhex(cert)
        try:
            fields = parse_certificate(data)
        except WireError:
            return None
        if (fields.user, fields.device) != tuple(self._ctx.me):
            return None
        return data, int(expires)

    def certificate(self) -> bytes | None:
        """Our certificate, if it names this device and is valid for a while yet."""
        stored = self._stored_certificate()
        if stored is None or stored[1] - self._ctx.now_ms() < _USABLE_MS:
            return None
        return stored[0]

    # -- with the relay -------------------------------------------------------------------

    async def ensure_pins(self) -> None:
        """Pin the relay's keys if nothing is pinned yet (before the first deliveries are
        read, so a short-lived client does not defer every sealed message it meets)."""
        if self.pins().keys:
            return
        try:
            await self._pin()
        except TransportError as exc:
            _log.info("relay keys not pinned yet: %s", type(exc).__name__)

    async def _pin(self) -> RelayKeyPins:
        announced = await self._ctx.link.execute(sender_keys())
        pins, refused = self.pins().update(
            RelayKey(k.key_id, k.public_key, k.endorsement) for k in announced
        )
        if refused:
            _log.warning(
                "relay certificate keys not pinned (no pinned key endorses them): %s", refused
            )
        doc = json.dumps({str(k): v.hex() for k, v in sorted(pins.keys.items())})
        if doc != self._meta(_META_PINS):
            await asyncio.to_thread(self._put, {_META_PINS: doc})
        return pins

    async def refresh(self) -> None:
        """Make our access key (once) and register its verifier, pin the relay's keys, and
        renew our certificate when it runs short. Transport failures are left for the next
        run (messages go authenticated meanwhile).

        Raises:
            TransportError: the relay could not be asked (nothing changed for that step).
        """
        ctx = self._ctx
        pins = await self._pin()
        await self._sync_access()
        if not self.enabled:
            return  # we still read sealed messages; we only send none
        stored = self._stored_certificate()
        if stored is None or stored[1] - ctx.now_ms() < _RENEW_MS:
            issued = await ctx.link.execute(issue_certificate())
            try:
                verify_certificate(issued.certificate, pins, ctx.now_ms())
            except E2EEError as exc:
                _log.warning("the relay issued a certificate we refuse: %s", type(exc).__name__)
                return
            await asyncio.to_thread(
                self._put,
                {_META_CERT: issued.certificate.hex(), _META_CERT_EXPIRES: str(issued.expires_ms)},
            )

    @property
    def accepting(self) -> bool:
        """Whether contacts may send to us without their name (:meth:`set_accepting`)."""
        return self._meta(_META_REFUSE) != "1"

    async def _sync_access(self) -> None:
        """Bring the relay's verifier in line with what we chose: our current access key's
        while we accept sealed messages (made on first use; only with sealing on), none
        while we refuse them. What we chose is committed before the relay is asked, so a
        failed request is repeated by the next :meth:`refresh`.

        Raises:
            TransportError: the relay could not be told (the next refresh tries again).
        """
        ctx = self._ctx
        registered = self._meta(_META_REGISTERED)
        if not self.accepting:
            if registered != "":  # a verifier, or never told
                await ctx.link.execute(set_access(None))
                await asyncio.to_thread(self._put, {_META_REGISTERED: ""})
            return
        if not self.enabled:
            return
        key = self.access_key()
        if key is None or self._epoch() is None:
            # First run, or a key made when each device drew its own: the account's epoch 0
            # key, the same on every device of the account.
            key = await asyncio.to_thread(self._derive, 0)
            await asyncio.to_thread(self._put, {_META_ACCESS: key.hex(), _META_EPOCH: "0"})
        verifier = token_verifier(delivery_token(key))
        if registered != verifier.hex():
            await ctx.link.execute(set_access(verifier))
            await asyncio.to_thread(self._put, {_META_REGISTERED: verifier.hex()})

    async def rotate_access_key(self) -> None:
        """Replace our access key by the next epoch's: every token a contact holds stops
        working at once (their next message to us is refused sealed and goes with their
        name); contacts learn the new key from our next message to them, our other devices
        from our next copy to them (:meth:`learn`).

        Raises:
            TransportError: the relay could not be told (it is told at the next refresh;
                until then the old key's tokens still work there).
        """
        epoch = (self._epoch() or 0) + 1
        key = await asyncio.to_thread(self._derive, epoch)
        await asyncio.to_thread(self._put, {_META_ACCESS: key.hex(), _META_EPOCH: str(epoch)})
        await self._sync_access()

    async def set_accepting(self, accept: bool) -> None:
        """Accept sealed messages from contacts (the default), or refuse them from everyone.

        Refusing removes our verifier from the relay, which then refuses every sealed send
        to us: contacts' messages come with their name again, and our messages stop
        carrying our access key. Accepting again registers the current key's verifier.
        Strangers never hold our access key (it travels only in what we send), so the
        relay refuses their sealed sends either way.

        Raises:
            TransportError: the relay could not be told (the choice is kept and the relay
                is told at the next refresh).
        """
        await asyncio.to_thread(self._put, {_META_REFUSE: "" if accept else "1"})
        await self._sync_access()

    def refresh_soon(self) -> None:
        """Run :meth:`refresh` in the background (once at a time), for a message that named
        a relay key we have not pinned yet."""
        self.refresh_due = False
        if self._refreshing is not None and not self._refreshing.done():
            return

        async def run() -> None:
            try:
                await self.refresh()
            except TransportError as exc:
                _log.info("sealed sender refresh postponed: %s", type(exc).__name__)

        self._refreshing = asyncio.create_task(run())

    def may_pin_later(self, key_id: int) -> bool:
        """Whether a message under unpinned relay key ``key_id`` is worth keeping for a while:
        the key is newer than every pinned one (a rotation we have not fetched, or nothing
        pinned yet), and it was first met less than ``_PIN_WAIT_MS`` ago."""
        pinned = self.pins().keys
        if pinned and key_id <= max(pinned):
            return False
        now = self._ctx.now_ms()
        if len(self._waits) >= 1000:  # forged key ids: bounded memory
            self._waits.clear()
        first = self._waits.setdefault(key_id, now)
        if now - first >= _PIN_WAIT_MS:
            return False
        self.refresh_due = True
        return True

    # -- sending --------------------------------------------------------------------------

    def stamp(self, data: bytes, kind: str) -> bytes:
        """``data`` (an encoded payload of ``kind``) with our access key, when it may carry it."""
        return SealingBatch(self).stamp(data, kind)

    def _wrap(
        self, recipients: Sequence[tuple[str, int]], inner: bytes
    ) -> tuple[bytes, dict[str, bytes] | None]:
        """The body to send and, when it may go without our name, the tokens (blocking)."""
        return SealingBatch(self).wrap(recipients, inner)

    def hideable(self, recipients: Sequence[tuple[str, int]]) -> bool:
        """Whether a send to ``recipients`` would go without our name (blocking): sealing on,
        a usable certificate, an access key of every recipient user and the identity key of
        every recipient device, and none of our own devices among them.

        The outbox asks this to send our own other devices' copy of a message as a message
        of its own, so the peers' part can go without our name.
        """
        return SealingBatch(self).hideable(recipients)

    def authenticated_body(
        self, recipients: Sequence[tuple[str, int]], inner: bytes
    ) -> bytes | None:
        """The body of a send of ``inner`` that goes with our name (blocking; the caller holds
        the write lock): sealed when we can, ``inner`` itself with sealing off.

        The outbox's pipelined sends go with our name (each names the message before it, so
        the relay must know whose it is); a message that could go without our name returns
        None and is sent one at a time by :meth:`send`, so pipelining never costs a contact
        the hiding of its sender.
        """
        return SealingBatch(self).authenticated_body(recipients, inner)

    def batch(self) -> SealingBatch:
        """:meth:`stamp`, :meth:`hideable` and :meth:`authenticated_body` for the messages of
        one store transaction (the outbox's encrypting batch; the caller holds the write lock
        throughout, so nothing they read can change in between)."""
        return SealingBatch(self)

    async def send(self, mid: bytes, recipients: Sequence[tuple[str, int]], inner: bytes) -> bool:
        """Send a version 1 envelope (``inner``) to ``recipients``: sealed when we can.

        Returns:
            True when the relay stored it under our name (an authenticated send, whose
            retry record this device may settle: :mod:`e2ee.client.settling`); False when
            it went without our name (its record is not ours to settle).

        Raises:
            TransportError: as :meth:`RelayLink.send` (``MismatchedDevices`` and the rest).
        """
        if not self.enabled:
            await self._ctx.link.send(mid, recipients, inner)
            return True
        body, tokens = await asyncio.to_thread(self._ctx.locked, self._wrap, recipients, inner)
        if tokens is not None:
            try:
                await self._ctx.link.execute(send_sealed(mid, recipients, body, tokens))
                return False
            except DeliveryTokenRefused:
                # A contact rotated its key or stopped accepting sealed mail: forget the
                # keys, send this one with our name (still sealed inside).
                await asyncio.to_thread(self._put, {_META_PEER + user: "" for user in tokens})
        await self._ctx.link.send(mid, recipients, body)
        return True

    # -- receiving ------------------------------------------------------------------------

    def open(self, sender: Address, body: bytes) -> Opened | None:
        """Take the sealed layer off a delivery (inside the receive transaction).

        Returns:
            The sender and the version 1 envelope; None for our own copy of a message we
            sent (acknowledge it, nothing to show). A version 1 body comes back unchanged.

        Raises:
            InvalidMessage: not addressed to us, not authentic, or sealed without a
                certificate and without a sender the relay vouches for.
            InvalidCertificate: (and its leaves) the certificate is refused, or it names
                someone other than the sender the relay delivered it as.
        """
        anonymous = is_sealed_sender(sender.name, sender.device_id)
        if not is_sealed(body):
            if anonymous:  # a clear envelope from nobody: nothing can vouch for a sender
                raise InvalidMessage("a message without a sender and without a seal")
            return Opened(sender, body, None)
        ctx = self._ctx
        content = ctx.engine.open_sealed(body)
        if content.certificate is None:
            if anonymous:
                raise InvalidMessage("a sealed message without a sender certificate")
            return Opened(sender, content.envelope, None)
        cert = verify_certificate(content.certificate, self.pins(), ctx.now_ms())
        claimed = Address(cert.user, cert.device)
        if not anonymous and claimed != sender:
            raise CertificateMismatch(cert.user, f"delivered as coming from {sender.name}")
        if claimed == ctx.me:
            return None
        return Opened(claimed, content.envelope, cert)

    def learn(self, user: str, key: bytes) -> None:
        """Remember ``user``'s access key (inside the receive transaction: the caller is in
        the store's batch, so it commits with the message that carried it)."""
        if len(key) != ACCESS_KEY_LENGTH:
            return
        if user == self._ctx.me.name:
            self._take_rotation(key)
            return
        if self.peer_key(user) != key:
            self._ctx.store.commit(Changes(meta_put={_META_PEER + user: key.hex()}))

    def _take_rotation(self, key: bytes) -> None:
        """Take ``key``, from a payload of our own other device, if it is our access key of a
        later epoch than ours (inside the receive transaction). The relay already holds its
        verifier (that device registered it); our next refresh registers it again, which
        changes nothing there."""
        epoch = self._epoch()
        if key == self.access_key():
            return
        account = self._ctx.store.load_account()
        if account is None:
            return
        start = -1 if epoch is None else epoch
        for ahead in range(start + 1, start + 1 + _EPOCH_LOOKAHEAD):
            if account_access_key(account.identity_key_pair, ahead) == key:
                self._ctx.store.commit(
                    Changes(meta_put={_META_ACCESS: key.hex(), _META_EPOCH: str(ahead)})
                )
                return

    def stamp_own(self, data: bytes) -> bytes:
        """A copy for our own other devices (an encoded payload) with our access key, so that
        they follow a rotation made here; unchanged when it would not fit."""
        try:
            return self.stamp(data, "transcript")
        except UsageError:
            return data


class SealedSender:
    """Sealed sender settings of one open account (``client.sealed``).

    Contacts that wrote to each other send without their name by default: each message we
    compose carries our access key, from which a contact derives the delivery token the
    relay asks for (docs/protocol.md, "Sealed sender"). Strangers never get the key, so
    the relay refuses their sealed sends: they come with their name.
    """

    def __init__(self, sealing: Sealing) -> None:
        self._sealing = sealing

    def __repr__(self) -> str:
        return f"SealedSender(sending={self.sending}, accepting={self.accepting})"

    @property
    def sending(self) -> bool:
        """Whether we seal what we send (``ClientOptions.sealed_sender``)."""
        return self._sealing.enabled

    @property
    def accepting(self) -> bool:
        """Whether contacts may send to us without their name (the default: True)."""
        return self._sealing.accepting

    async def refuse(self) -> None:
        """Refuse sealed messages from everyone: the relay holds no verifier for us, so each
        contact's next sealed send is refused and goes with their name; our messages stop
        carrying our access key. Kept across restarts, on this device: make the same choice
        on the account's other devices (one that accepts registers the verifier again when
        its key changes).

        Raises:
            TransportError: the relay could not be told now (it is told at the next key
                maintenance after connecting; the choice is kept).
        """
        await self._sealing.set_accepting(False)

    async def accept(self) -> None:
        """Accept sealed messages from contacts again (undoes :meth:`refuse`).

        Raises:
            TransportError: as :meth:`refuse`.
        """
        await self._sealing.set_accepting(True)

    async def rotate_access_key(self) -> None:
        """Replace our access key: the tokens every contact holds stop working at once (so
        does a token that leaked). A contact learns the new key from our next message to
        them; until then their messages to us go with their name. We do not send every
        contact a message at once: a burst right after the rotation would show the relay
        our contact list.

        Raises:
            TransportError: the relay could not be told now (it is told at the next key
                maintenance; until then the old tokens still work).
        """
        await self._sealing.rotate_access_key()


class SealingBatch:
    """Sealing what we send, reading the store at most once per value (:meth:`Sealing.batch`).

    Every value is read on first use and kept: our access key and certificate, the contacts'
    access keys and the recipients' identity keys. One instance lives for one call, or for
    one batch under the write lock; the cryptography stays per message (:func:`seal` with
    a fresh ephemeral key and content key each time).
    """

    def __init__(self, sealing: Sealing) -> None:
        self._sealing = sealing
        self._ctx = sealing._ctx
        self._access: bytes | None = None
        self._access_read = False
        self._cert: bytes | None = None
        self._cert_read = False
        self._accepting: bool | None = None
        self._peers: dict[str, bytes | None] = {}
        self._identities: dict[tuple[str, int], bytes | None] = {}

    def _access_key(self) -> bytes | None:
        if not self._access_read:
            self._access, self._access_read = self._sealing.access_key(), True
        return self._access

    def _certificate(self) -> bytes | None:
        if not self._cert_read:
            self._cert, self._cert_read = self._sealing.certificate(), True
        return self._cert

    def _peer_key(self, user: str) -> bytes | None:
        if user not in self._peers:
            self._peers[user] = self._sealing.peer_key(user)
        return self._peers[user]

    def _identity(self, user: str, device: int) -> bytes | None:
        address = (user, device)
        if address not in self._identities:
            record = self._ctx.engine.identity(Address(user, device))
            self._identities[address] = None if record is None else record.identity_key
        return self._identities[address]

    def _is_accepting(self) -> bool:
        if self._accepting is None:
            self._accepting = self._sealing.accepting
        return self._accepting

    def stamp(self, data: bytes, kind: str) -> bytes:
        """See :meth:`Sealing.stamp`."""
        key = self._access_key() if self._sealing.enabled and self._is_accepting() else None
        if key is None or kind in _NO_ACCESS_KEY:
            return data
        return payload.with_access_key(data, key)

    def _tokens(self, users: set[str], cert: bytes | None) -> dict[str, bytes] | None:
        """The delivery tokens when a message to ``users`` may go without our name."""
        if cert is None or self._ctx.me.name in users:
            return None
        keys = {user: self._peer_key(user) for user in users}
        if not all(keys.values()):
            return None
        return {user: delivery_token(key) for user, key in keys.items() if key}

    def _seal(
        self, recipients: Sequence[tuple[str, int]], inner: bytes, cert: bytes | None
    ) -> bytes | None:
        """``inner`` sealed to ``recipients``; None when an identity key is unknown."""
        sealed_to = []
        for user, device in recipients:
            key = self._identity(user, device)
            if key is None:
                return None  # cannot seal to it
            sealed_to.append(SealedRecipient(user, device, key))
        return seal(
            sealed_to,
            SealedContent(cert, inner),
            ephemeral_private=self._ctx.random_bytes(32),
            content_key=self._ctx.random_bytes(32),
        )

    def wrap(
        self, recipients: Sequence[tuple[str, int]], inner: bytes
    ) -> tuple[bytes, dict[str, bytes] | None]:
        """See :meth:`Sealing._wrap`."""
        cert = self._certificate()
        body = self._seal(recipients, inner, cert)
        if body is None:
            return inner, None  # the version 1 envelope, in clear
        # No certificate; or our own other devices are listed (the relay would see which
        # device sends); or someone never shared an access key (a stranger): the
        # authenticated way (no tokens), still sealed inside.
        return body, self._tokens({u for u, _ in recipients}, cert)

    def hideable(self, recipients: Sequence[tuple[str, int]]) -> bool:
        """See :meth:`Sealing.hideable`."""
        users = {u for u, _ in recipients}
        if not self._sealing.enabled or not users:
            return False
        if self._tokens(users, self._certificate()) is None:
            return False  # no certificate, our own devices listed, or a stranger
        return all(self._identity(u, d) is not None for u, d in recipients)

    def authenticated_body(
        self, recipients: Sequence[tuple[str, int]], inner: bytes
    ) -> bytes | None:
        """See :meth:`Sealing.authenticated_body`."""
        if not self._sealing.enabled:
            return inner
        cert = self._certificate()
        if self._tokens({u for u, _ in recipients}, cert) is not None:
            # It may go without our name: that needs every identity key too, else it goes
            # in clear with our name, as one at a time would send it.
            if all(self._identity(u, d) is not None for u, d in recipients):
                return None
            return inner
        body = self._seal(recipients, inner, cert)
        return inner if body is None else body
