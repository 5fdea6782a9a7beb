"""The client SDK facade: an async messenger client over core, store and transport.

Invariants:

* The event loop never blocks: every SQLite access and every crypto call runs in
  ``asyncio.to_thread``; large files are encrypted and decrypted chunk by chunk.
* Inbox: a delivery is acknowledged to the relay, and its events emitted, only
  after its plaintext rows and the session state were committed together
  (``ProtocolEngine.decrypt(on_plaintext=...)``). Deliveries waiting together are
  committed in one transaction (group commit, ``SQLiteProtocolStore.batch()``),
  acknowledged only once that transaction stands. A redelivery after a crash is
  recognised by the ratchet as a duplicate and acknowledged without a second
  event. Undecryptable deliveries are acknowledged only after the problem was
  reported (an event) and, where possible, repaired (a bounded session reset).
* Lock order: the write lock, then the engine's per-peer locks, then the store's
  lock. Every engine call that takes a per-peer lock runs under the write lock
  (``_locked``), because a receive transaction holds the store's lock across
  several decrypts.
* Outbox: every outgoing message is first committed to the ``outbox`` table
  (with its history row), then sent in composition order, one at a time, under
  the same message id on every retry, so the relay stores it once.
* Sending to a device whose identity key changed is held until the user accepts
  the key; nothing is encrypted to an unaccepted key.
* Group membership changes are accepted only from a sender who is an admin in
  our committed group state (or a member leaving); they travel pairwise
  encrypted. Our Sender Key is rotated whenever a member is removed or leaves.
* All history writes happen under one write lock, so read-modify-write updates
  of a row (status, edits, receipts) never lose each other.
* Secrets (keys, plaintext) never reach a repr, a log line or an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import mimetypes
import os
import random
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, ParamSpec, Protocol, TypeVar

import nacl.encoding
import nacl.hash

from e2ee import envelope, payload
from e2ee.client_errors import (
    ClientClosed,
    IdentityHeld,
    NotAdmin,
    NotAMember,
    NotRegistered,
    SendFailed,
    StoreLocked,
    UnknownRecipient,
)
from e2ee.core import Ciphertext, PreKeyBundle, ProtocolEngine
from e2ee.core.fingerprint import SafetyNumber, compute_safety_number
from e2ee.errors import (
    DuplicateMessage,
    E2EEError,
    InvalidBundle,
    InvalidMessage,
    MissingKey,
    NoSession,
    StorageError,
    TransportError,
    UntrustedIdentity,
    UsageError,
)
from e2ee.events import (
    BacklogDrained,
    ConnectionStateChanged,
    DecryptionProblem,
    Event,
    GapDetected,
    GroupChanged,
    IdentityChanged,
    MessageChanged,
    MessageReceived,
    MessageStored,
    ReceiptUpdated,
    Typing,
)
from e2ee.history import (
    GroupInfo,
    History,
    Row,
    StoredMessage,
    direct_chat_id,
    dumps,
    group_chat_id,
    to_message,
)
from e2ee.media import MediaCorrupt, Progress, decrypt_file, encrypt_file
from e2ee.payload import (
    AttachmentPointer,
    GroupAction,
    GroupControl,
    Payload,
    PayloadType,
    Quote,
    ReceiptKind,
)
from e2ee.store import AccountRecord, Address, Changes, IdentityRecord, TrustLevel
from e2ee.store.sealing import KdfLimits
from e2ee.store.sqlite import SQLiteProtocolStore
from e2ee.transport.auth import DeviceSigner, check_username
from e2ee.transport.errors import (
    BlobDigestMismatch,
    ConnectionLost,
    DeviceRemoved,
    MismatchedDevices,
    NotFound,
    RelayRejected,
    Replaced,
)
from e2ee.transport.frames import Delivery, QueueEmpty

if TYPE_CHECKING:
    from e2ee.transport.http import RelayClient
    from e2ee.transport.ws import RelayConnection

__all__ = [
    "DB_FILE",
    "LOCK_FILE",
    "Client",
    "ClientOptions",
    "LinkFactory",
    "RelayLink",
    "TransportLink",
]

_log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_T = TypeVar("_T")

#: The database file inside the data directory.
DB_FILE: Final = "blindpost.db"
#: Held (``flock``) while a process has the data directory open.
LOCK_FILE: Final = "blindpost.lock"
_META_USER: Final = "sdk.username"
_META_RELAY: Final = "sdk.relay_url"
_META_REGISTERED: Final = "sdk.registered"
_META_ACCOUNT_CREATED: Final = "sdk.account_created"
_META_READ_RECEIPTS: Final = "sdk.read_receipts"
_META_STRICT: Final = "sdk.strict_trust"
_RECEIPT_BATCH: Final = 500
#: At most this many deliveries share one store transaction (one fsync). The
#: write lock is held meanwhile, so this also bounds how long a send waits.
_INBOX_BATCH: Final = 200
#: A typing indicator not sent within this time is dropped, not sent late.
_TYPING_TTL_MS: Final = 10_000
_ACTION_NAMES: Final[dict[GroupAction, Literal["create", "add", "remove", "leave", "rename"]]] = {
    GroupAction.CREATE: "create",
    GroupAction.ADD: "add",
    GroupAction.REMOVE: "remove",
    GroupAction.LEAVE: "leave",
    GroupAction.RENAME: "rename",
}
_MAX_SEND_ATTEMPTS: Final = 4


class RelayLink(Protocol):
    """What the client needs from the relay transport (one device's view).

    The real implementation wraps :mod:`e2ee.transport`; tests use an in-process
    fake. Every method raises :class:`~e2ee.errors.TransportError` subclasses
    (``MismatchedDevices``, ``NotFound``, ``ConnectionLost``...) on failure.
    """

    async def register(self) -> None:
        """Register this device's user and auth key (``POST /v1/accounts``)."""
        ...

    async def upload_keys(self, keys: Mapping[str, Any]) -> int:
        """Upload prekeys (``PUT /v1/keys``); returns the relay's one-time prekey count."""
        ...

    async def prekey_count(self) -> int:
        """One-time prekeys the relay holds for this device."""
        ...

    async def fetch_bundles(self, user: str) -> list[Mapping[str, Any]]:
        """Per-device bundle objects of ``user`` (``GET /v1/keys/{user}``)."""
        ...

    async def connect(self) -> None:
        """Open the live connection (the WebSocket); deliveries start flowing."""
        ...

    def deliveries(self) -> AsyncIterator[Delivery | QueueEmpty]:
        """Deliveries from the live connection, backlog first; ends when it closes.

        A :class:`QueueEmpty` marks the end of the backlog present at connect time.
        """
        ...

    async def send(
        self, message_id: bytes, recipients: Sequence[tuple[str, int]], body: bytes
    ) -> None:
        """Send one body to the listed devices; returns once the relay committed it.

        Works without :meth:`connect` too (a send-only client).
        """
        ...

    async def ack(self, ids: Sequence[bytes]) -> None:
        """Acknowledge deliveries (the relay deletes them from our mailbox)."""
        ...

    async def upload_blob(self, path: Path, digest: bytes, progress: Progress | None) -> str:
        """Upload an encrypted file; returns the blob id."""
        ...

    async def download_blob(self, blob_id: str, path: Path, progress: Progress | None) -> None:
        """Download a blob into ``path`` (verifying its content address)."""
        ...

    async def disconnect(self) -> None:
        """Close the live connection (deliveries end)."""
        ...

    async def aclose(self) -> None:
        """Release everything (HTTP session included)."""
        ...


#: Builds the link for a device: (signer, relay URL) -> link.
LinkFactory = Callable[[DeviceSigner, str], RelayLink]


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """Tunables; the defaults suit a real client, tests shorten the delays.

    Attributes:
        backoff_base: first reconnect delay in seconds (doubles per failure).
        backoff_max: reconnect delay cap in seconds.
        maintenance_interval: seconds between key-maintenance runs while connected.
        expiry_interval: seconds between disappearing-message sweeps.
        reset_interval_ms: at most one session reset per peer device in this time.
        ack_delay: seconds acks may wait to be batched.
    """

    backoff_base: float = 0.5
    backoff_max: float = 30.0
    maintenance_interval: float = 3600.0
    expiry_interval: float = 1.0
    reset_interval_ms: int = 60_000
    ack_delay: float = 0.02


@dataclass(slots=True)
class _Inbound:
    """What processing one delivery produced (committed already, when rows exist)."""

    events: list[Event] = field(default_factory=list)
    wake_outbox: bool = False
    reset: Address | None = None
    key_request: tuple[str, Address] | None = None
    resend_key: tuple[str, str] | None = None
    #: Ends the group-commit transaction after this delivery (it changed group state).
    barrier: bool = False


@dataclass(frozen=True, slots=True)
class _Opened:
    """Everything opening a data directory produced (built in a worker thread)."""

    folder: Path
    store: SQLiteProtocolStore
    engine: ProtocolEngine
    history: History
    account: AccountRecord
    relay_url: str
    registered: bool
    identity_key: bytes
    fingerprint: str
    lock_fd: int


def _lock_dir(folder: Path) -> int:
    """Take the data directory's exclusive lock (one process per directory).

    Raises:
        StoreLocked: another process holds it.
        StorageError: the lock file cannot be created.
    """
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot create the lock file: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise StoreLocked(f"{folder} is in use by another process") from exc
    return fd


def _open_dir(
    folder: Path,
    passphrase: str | None,
    kdf_limits: KdfLimits | None,
    now_ms: Callable[[], int],
    init: Callable[[SQLiteProtocolStore], None] | None,
) -> _Opened:
    """Lock the directory, open (and with ``init``, initialise) the store and history."""
    lock_fd = _lock_dir(folder)
    store: SQLiteProtocolStore | None = None
    try:
        path = folder / DB_FILE
        if kdf_limits is None:
            store = SQLiteProtocolStore.open(path, passphrase)
        else:
            store = SQLiteProtocolStore.open(path, passphrase, kdf_limits=kdf_limits)
        if init is not None:
            init(store)
        account = store.load_account()
        if account is None:
            raise UsageError(f"no account in {folder}")
        strict = store.get_meta(_META_STRICT) == "1"
        engine = ProtocolEngine(store, now_ms=now_ms, trust_on_first_use=not strict)
        key = engine.identity_key
        own = compute_safety_number(key, account.name, key, account.name).digits[:30]
        return _Opened(
            folder=folder,
            store=store,
            engine=engine,
            history=History.open(store),
            account=account,
            relay_url=store.get_meta(_META_RELAY) or "",
            registered=store.get_meta(_META_REGISTERED) == "1",
            identity_key=key,
            fingerprint=own,
            lock_fd=lock_fd,
        )
    except BaseException:
        if store is not None:
            store.close()
        os.close(lock_fd)
        raise


def _close_opened(opened: _Opened) -> None:
    opened.history.close()
    opened.store.close()
    os.close(opened.lock_fd)


def _system_ms() -> int:
    return time.time_ns() // 1_000_000


def _hex(mid: bytes) -> str:
    return mid.hex()


def _auth_seed(identity_key_pair: bytes) -> bytes:
    """The relay auth key seed, derived from the (sealed) identity key pair.

    A keyed BLAKE2b with a personalisation string separates it from every other
    use of the identity key; nothing new needs storing.
    """
    seed: bytes = nacl.hash.blake2b(
        b"blindpost relay auth v1",
        key=hashlib.sha256(identity_key_pair).digest(),
        person=b"bp-relay-auth",
        digest_size=32,
        encoder=nacl.encoding.RawEncoder,
    )
    return seed


class Client:
    """An end-to-end encrypted messenger client for one account on one device.

    Create one with :meth:`create` (new account) or :meth:`open` (existing); then
    ``async with client:`` connects to the relay and keeps the connection up
    (reconnecting with backoff) until the block ends. Everything else is a
    coroutine method; :meth:`events` yields what happens.
    """

    def __init__(
        self,
        opened: _Opened,
        link_factory: LinkFactory,
        *,
        now_ms: Callable[[], int],
        options: ClientOptions,
    ) -> None:
        """Use :meth:`open` or :meth:`create`."""
        self._dir = opened.folder
        self._store = opened.store
        self._engine = opened.engine
        self._history = opened.history
        self._now_ms = now_ms
        self._options = options
        account = opened.account
        relay_url = opened.relay_url
        self._me = Address(account.name, account.device_id)
        signer = DeviceSigner.from_seed(
            _auth_seed(account.identity_key_pair), account.name, account.device_id
        )
        self._link = link_factory(signer, relay_url)
        self._strict = False
        self._store_meta_cache: dict[str, str] = {}
        self._relay_url = relay_url
        self._lock_fd: int | None = opened.lock_fd
        self._identity_key = opened.identity_key
        self._fingerprint = opened.fingerprint
        self._registered = opened.registered
        self._wlock = threading.RLock()
        self._counters: dict[str, int] = {}
        self._chats: dict[str, dict[str, Any]] = {}
        self._known_links: set[str] = set()
        self._wake_pending = False
        self._inflight: asyncio.Future[list[_Inbound]] | None = None
        self._flush_started = 0
        self._flush_done = 0
        self._flush_cond = asyncio.Condition()
        self._subscribers: list[asyncio.Queue[Event]] = []
        self._sent_waiters: dict[str, asyncio.Future[None]] = {}
        self._outbox_wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._closing = False
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._acks: list[bytes] = []
        self._ack_wake = asyncio.Event()
        self._held: set[str] = set()
        self._receive = True
        # Inside a receive transaction: counter and chat rows, written once at its
        # end instead of with every message (they change with every message).
        self._deferred: dict[tuple[str, str], dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return f"Client(user={self._me.name!r}, device={self._me.device_id})"

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        data_dir: str | os.PathLike[str],
        username: str,
        relay_url: str,
        *,
        device_id: int = 1,
        passphrase: str | None = None,
        strict_trust: bool = False,
        link_factory: LinkFactory | None = None,
        now_ms: Callable[[], int] = _system_ms,
        options: ClientOptions | None = None,
        kdf_limits: KdfLimits | None = None,
    ) -> Client:
        """Create a new account in ``data_dir`` (not yet registered with the relay).

        Args:
            data_dir: a directory for the database (created if missing).
            username: the account name (``[a-z0-9_]{3,32}``).
            relay_url: the relay's base URL, e.g. ``http://127.0.0.1:8080``.
            device_id: this device's id (1..127).
            passphrase: protects the keys at rest; None relies on file permissions.
            strict_trust: if True, every new contact key must be verified or
                accepted before sending (no trust on first use).
            link_factory: builds the relay link (default: the aiohttp transport).
            now_ms: the clock.
            options: tunables.
            kdf_limits: Argon2id cost (tests pass a cheap one).

        Returns:
            The client, not connected. Call :meth:`register` next.

        Raises:
            UsageError: bad name, device id, or the directory already holds an account.
            StorageError: the database cannot be created.
        """
        if not 1 <= device_id <= 127:
            raise UsageError("device id must be in 1..127")
        folder = Path(data_dir)

        def setup() -> _Opened:
            try:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise StorageError(f"cannot create {folder}: {exc.strerror}") from exc

            def init(store: SQLiteProtocolStore) -> None:
                engine = ProtocolEngine(store, now_ms=now_ms, trust_on_first_use=not strict_trust)
                engine.create_account(username, device_id)
                store.commit(
                    Changes(
                        meta_put={
                            _META_USER: username,
                            _META_RELAY: relay_url,
                            _META_STRICT: "1" if strict_trust else "0",
                            _META_READ_RECEIPTS: "1",
                        }
                    )
                )

            return _open_dir(folder, passphrase, kdf_limits, now_ms, init)

        opened = await asyncio.to_thread(setup)
        return await cls._build(opened, link_factory, now_ms, options)

    @classmethod
    async def open(
        cls,
        data_dir: str | os.PathLike[str],
        passphrase: str | None = None,
        *,
        link_factory: LinkFactory | None = None,
        now_ms: Callable[[], int] = _system_ms,
        options: ClientOptions | None = None,
    ) -> Client:
        """Open the account in ``data_dir``.

        Args:
            data_dir: the directory given to :meth:`create`.
            passphrase: the passphrase given to :meth:`create`, if any.
            link_factory: builds the relay link (default: the aiohttp transport).
            now_ms: the clock.
            options: tunables.

        Returns:
            The client, not connected.

        Raises:
            WrongPassphrase: the passphrase does not open the store.
            UsageError: the directory holds no account.
            StorageError: the database cannot be opened.
        """
        folder = Path(data_dir)

        def setup() -> _Opened:
            if not (folder / DB_FILE).exists():
                raise UsageError(f"no account in {folder}")
            return _open_dir(folder, passphrase, None, now_ms, None)

        opened = await asyncio.to_thread(setup)
        return await cls._build(opened, link_factory, now_ms, options)

    @classmethod
    async def _build(
        cls,
        opened: _Opened,
        link_factory: LinkFactory | None,
        now_ms: Callable[[], int],
        options: ClientOptions | None,
    ) -> Client:
        try:
            return cls(
                opened,
                link_factory or _default_link_factory,
                now_ms=now_ms,
                options=options or ClientOptions(),
            )
        except BaseException:
            await asyncio.to_thread(_close_opened, opened)
            raise

    async def register(self) -> None:
        """Register the account with the relay and upload its prekeys.

        Raises:
            UsernameTaken: the name is registered already.
            TransportError: the relay cannot be reached or refused.
        """
        self._check_open()
        await asyncio.to_thread(self._load_state)
        if not self._registered and self._store_meta_cache.get(_META_ACCOUNT_CREATED) != "1":
            await self._link.register()
            # Recorded at once: names are never reused, so a retry after a failed
            # key upload must not register (and lose) the name again.
            await asyncio.to_thread(
                self._store.commit, Changes(meta_put={_META_ACCOUNT_CREATED: "1"})
            )
        upload = await asyncio.to_thread(self._locked, self._engine.key_upload)
        await self._link.upload_keys(upload.to_json())
        await asyncio.to_thread(self._store.commit, Changes(meta_put={_META_REGISTERED: "1"}))
        self._registered = True

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self, *, receive: bool = True) -> None:
        """Start the connection loop, the outbox and the timers (``async with`` does this).

        Args:
            receive: False makes a send-only client, for one-shot programs (a
                command that sends a message and exits): it opens no live
                connection and takes nothing from the mailbox, so deliveries,
                receipts and group changes wait on the relay for the next
                receiving client. Sends (and receipts from :meth:`mark_read`) go
                out over HTTP; "connected" then means the relay answered and
                accepted our credentials.

        Raises:
            NotRegistered: :meth:`register` was never called.
            ClientClosed: the client was closed.
        """
        self._check_open()
        if self._tasks:
            return
        self._receive = receive
        await asyncio.to_thread(self._load_state)
        if not self._registered:
            raise NotRegistered("register the account with a relay first")
        for runner in (self._connection_loop, self._outbox_loop, self._ack_loop, self._expiry_loop):
            self._tasks.append(asyncio.create_task(runner()))

    async def close(self) -> None:
        """Finish the delivery in progress, flush acknowledgements, disconnect, close files.

        Idempotent. Messages still in the outbox stay there for the next start.
        """
        if self._closed:
            return
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, E2EEError):
                await task
        self._tasks.clear()
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            with contextlib.suppress(E2EEError):
                await inflight
        # Everything committed so far is acknowledged; a delivery cut off mid-way
        # was not, and comes back as a duplicate next time.
        with contextlib.suppress(TransportError):
            await self._flush_acks()
        with contextlib.suppress(TransportError):
            await self._link.disconnect()
        with contextlib.suppress(TransportError):
            await self._link.aclose()
        self._closed = True
        for waiter in self._sent_waiters.values():
            if not waiter.done():
                waiter.set_exception(ClientClosed("the client was closed"))
        self._emit(ConnectionStateChanged("closed"))
        await asyncio.to_thread(self._close_files)

    def _close_files(self) -> None:
        with self._wlock:
            self._history.close()
            self._store.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the directory lock
                self._lock_fd = None

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise ClientClosed("the client was closed")

    # -- properties ------------------------------------------------------------------------

    @property
    def username(self) -> str:
        """Our user name."""
        return self._me.name

    @property
    def device_id(self) -> int:
        """This device's id."""
        return self._me.device_id

    @property
    def relay_url(self) -> str:
        """The relay this account registers with."""
        return self._relay_url

    @property
    def is_registered(self) -> bool:
        """True once :meth:`register` completed (account created and keys uploaded)."""
        return self._registered

    @property
    def identity_key(self) -> bytes:
        """Our identity public key (33 bytes; public, safe to show)."""
        return self._identity_key

    @property
    def fingerprint(self) -> str:
        """Our 30 digits: our half of every safety number with us."""
        return self._fingerprint

    @property
    def history(self) -> History:
        """Read access to local history (blocking: call it via ``asyncio.to_thread``)."""
        return self._history

    @property
    def connected(self) -> bool:
        """True while the live connection to the relay is up."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Wait until the live connection to the relay is up.

        Raises:
            ClientClosed: the client is closed.
        """
        self._check_open()
        await self._connected.wait()

    # -- events ----------------------------------------------------------------------------

    def events(self) -> AsyncIterator[Event]:
        """A new subscription to every event from now on.

        Returns:
            An async iterator; it ends when the client is closed.
        """
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.append(queue)
        return self._iterate(queue)

    async def _iterate(self, queue: asyncio.Queue[Event]) -> AsyncIterator[Event]:
        try:
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, ConnectionStateChanged) and event.state == "closed":
                    return
        finally:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(queue)

    def _emit(self, event: Event) -> None:
        for queue in self._subscribers:
            queue.put_nowait(event)

    # -- settings --------------------------------------------------------------------------

    async def set_read_receipts(self, enabled: bool) -> None:
        """Turn sending read receipts on or off (delivered receipts are always sent).

        Raises:
            StorageError: the setting cannot be stored.
        """
        value = "1" if enabled else "0"
        await asyncio.to_thread(self._store.commit, Changes(meta_put={_META_READ_RECEIPTS: value}))

    # -- counters (cached; only touched under the write lock) -------------------------

    def _load_state(self) -> None:
        with self._wlock:
            self._drop_caches()
            self._registered = self._store.get_meta(_META_REGISTERED) == "1"
            self._store_meta_cache = {
                _META_ACCOUNT_CREATED: self._store.get_meta(_META_ACCOUNT_CREATED) or ""
            }
            self._strict = self._store.get_meta(_META_STRICT) == "1"

    def _drop_caches(self) -> None:
        """Forget cached rows: they may describe a commit that failed.

        Rows deferred to the end of the current receive transaction stand (their
        messages committed), so the cache keeps them: the store has not seen them yet.
        """
        self._counters.clear()
        self._chats.clear()
        self._known_links.clear()
        for (table, key), row in (self._deferred or {}).items():
            if table == "counters":
                self._counters[key] = row["value"]
            else:
                self._chats[key] = row

    def _locked(self, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run an engine call under the write lock (blocking; use via ``to_thread``).

        Every engine call that takes one of the engine's per-peer locks runs under
        the write lock: a receive batch holds the write lock and the store's
        transaction while it decrypts, so an engine call holding a peer lock while
        waiting for the store would deadlock with it.
        """
        with self._wlock:
            return call(*args, **kwargs)

    def _counter_or_none(self, name: str) -> int | None:
        value = self._counters.get(name)
        if value is None:
            value = self._history.counter_value(name)
            if value is not None:
                self._counters[name] = value
        return value

    def _counter(self, name: str) -> int:
        value = self._counters.get(name)
        if value is None:
            value = self._history.counter_value(name) or 0
            self._counters[name] = value
        return value

    def _commit(self, rows: Sequence[Row], counters: Mapping[str, int]) -> None:
        all_rows = tuple(rows) + tuple(
            History.row("counters", id=k, value=v) for k, v in counters.items()
        )
        try:
            self._store.commit(Changes(app_rows=all_rows))
        except BaseException:
            self._drop_caches()  # cached chat rows may describe this failed write
            raise
        self._counters.update(counters)

    # -- composing -------------------------------------------------------------------------

    def _chat_for(self, to: str) -> tuple[str, str, list[str]]:
        """(chat id, mode, targets) for a user name or a chat id."""
        if to.startswith("group:"):
            gid = to[len("group:") :]
            group = self._history.group(gid)
            if group is None or not group["member"]:
                raise NotAMember(gid)
            return to, "group", []
        peer = to[len("dm:") :] if to.startswith("dm:") else to
        if not peer or peer == self._me.name:
            raise UsageError("send to another user (or a group chat id)")
        return direct_chat_id(peer), "pairwise", [peer]

    def _ensure_chat_rows(
        self, chat_id: str, now: int, pending: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        chat = pending.get(chat_id) or self._chats.get(chat_id)
        if chat is None:
            chat = self._history.current("chats", chat_id)
        if chat is None:
            if chat_id.startswith("dm:"):
                peer = chat_id[3:]
                chat = History.row(
                    "chats", id=chat_id, kind="direct", peer=peer, timer_seconds=0, created_at=now
                )[1]
            else:
                gid = chat_id[len("group:") :]
                chat = History.row(
                    "chats", id=chat_id, kind="group", group_id=gid, timer_seconds=0, created_at=now
                )[1]
        chat = dict(chat)
        chat["last_message_at"] = now
        pending[chat_id] = chat
        self._chats[chat_id] = chat  # written under the write lock; dropped on failure
        return chat

    def _notice_rows(
        self,
        rows: list[Row],
        chat_id: str,
        sender: Address,
        notice_id: str,
        kind: str,
        text: str,
        now: int,
    ) -> StoredMessage:
        """Append a notice row (see ``NOTICE_TYPES``) and its chat's rows to ``rows``.

        The notice takes the next ``seq``, so it stands before whatever this
        operation stores after it. Called under the write lock; the caller commits.
        """
        existing = self._history.current("messages", notice_id)
        if existing is not None:  # the same delivery processed again after a crash
            return to_message(existing)
        pending: dict[str, dict[str, Any]] = {}
        self._ensure_chat_rows(chat_id, now, pending)
        seq = self._counter("seq:messages") + 1
        self._counters["seq:messages"] = seq  # committed with ``rows`` (or dropped)
        table, row = History.row(
            "messages",
            id=notice_id,
            chat_id=chat_id,
            group_id=chat_id[len("group:") :] if chat_id.startswith("group:") else None,
            sender=sender.name,
            sender_device=sender.device_id,
            outgoing=0,
            type=kind,
            text=text,
            counter=0,
            sent_at=now,
            received_at=now,
            read_at=now,
            status="received",
            edited=0,
            deleted=0,
            expire_seconds=0,
            seq=seq,
        )
        rows.append((table, row))
        self._defer_or_add(rows, [("chats", c) for c in pending.values()])
        self._defer_or_add(rows, [History.row("counters", id="seq:messages", value=seq)])
        return to_message(row)

    def _compose(
        self,
        to: str,
        kind: PayloadType,
        *,
        text: str = "",
        quote: Quote | None = None,
        targets_ids: tuple[bytes, ...] = (),
        reaction: str = "",
        attachment: AttachmentPointer | None = None,
        group: GroupControl | None = None,
        group_targets: Sequence[str] | None = None,
        timer_seconds: int = 0,
        typing: bool = False,
        store_row: bool = True,
        extra_rows: Sequence[Row] = (),
    ) -> tuple[str, StoredMessage | None]:
        """Commit a payload to the outbox (and its history row); return its id and row."""
        with self._wlock:
            chat_id, mode, targets = self._chat_for(to)
            if group_targets is not None:
                mode, targets = "pairwise", list(group_targets)
            now = self._now_ms()
            mid = os.urandom(payload.MESSAGE_ID_BYTES)
            chats: dict[str, dict[str, Any]] = {}
            if store_row:
                chat = self._ensure_chat_rows(chat_id, now, chats)
                if kind is PayloadType.TIMER:
                    chat["timer_seconds"] = timer_seconds
            else:
                chat = self._history.current("chats", chat_id) or {}
            counted = kind not in (PayloadType.TYPING, PayloadType.SESSION_RESET)
            counters: dict[str, int] = {}
            counter = 0
            if counted:
                counter = self._counter(f"out:{chat_id}") + 1
                counters[f"out:{chat_id}"] = counter
            timed = store_row and kind is not PayloadType.TIMER
            expire = int(chat.get("timer_seconds") or 0) if timed else 0
            body = Payload(
                type=kind,
                message_id=mid,
                sent_at_ms=now,
                counter=counter,
                group_id=chat_id[len("group:") :] if chat_id.startswith("group:") else "",
                text=text,
                quote=quote,
                target_ids=targets_ids,
                reaction=reaction,
                typing=typing,
                attachment=attachment,
                group=group,
                timer_seconds=timer_seconds,
                expire_seconds=expire,
            )
            data = payload.encode(body)
            seq = self._counter("seq:outbox") + 1
            counters["seq:outbox"] = seq
            rows: list[Row] = [
                History.row(
                    "outbox",
                    id=_hex(mid),
                    seq=seq,
                    chat_id=chat_id,
                    mode=mode,
                    targets=dumps(targets),
                    kind=kind.name.lower(),
                    payload=data,
                    state="queued",
                    attempts=0,
                    created_at=now,
                )
            ]
            if store_row:
                mseq = self._counter("seq:messages") + 1
                counters["seq:messages"] = mseq
                rows.append(
                    History.row(
                        "messages",
                        id=_hex(mid),
                        chat_id=chat_id,
                        group_id=body.group_id or None,
                        sender=self._me.name,
                        sender_device=self._me.device_id,
                        outgoing=1,
                        type=kind.name.lower(),
                        text=text or None,
                        reply_to=_hex(quote.message_id) if quote else None,
                        quote_text=quote.text if quote else None,
                        counter=counter,
                        sent_at=now,
                        status="pending",
                        edited=0,
                        deleted=0,
                        expire_seconds=expire,
                        expires_at=now + expire * 1000 if expire else None,
                        seq=mseq,
                    )
                )
                if attachment is not None:
                    rows.append(self._attachment_row(_hex(mid), attachment))
            rows.extend(("chats", c) for c in chats.values())
            rows.extend(extra_rows)
            self._commit(rows, counters)
            stored = to_message(rows[1][1]) if store_row else None
            return _hex(mid), stored

    @staticmethod
    def _attachment_row(message_id: str, a: AttachmentPointer) -> Row:
        return History.row(
            "attachments",
            id=message_id,
            message_id=message_id,
            blob_id=a.blob_id,
            key=a.key,
            digest=a.digest,
            size=a.size,
            mime_type=a.mime_type,
            file_name=a.file_name,
        )

    async def _queue(self, to: str, kind: PayloadType, *, wait: bool, **kw: Any) -> str:
        self._check_open()
        mid, stored = await asyncio.to_thread(self._compose, to, kind, **kw)
        if stored is not None:
            self._emit(MessageStored(stored))
        waiter: asyncio.Future[None] | None = None
        if wait:
            waiter = asyncio.get_running_loop().create_future()
            self._sent_waiters[mid] = waiter
        self._outbox_wake.set()
        if waiter is not None:
            try:
                await waiter
            finally:
                self._sent_waiters.pop(mid, None)
        return mid

    # -- public sending API ---------------------------------------------------------------

    async def send_text(
        self, to: str, text: str, *, reply_to: str | None = None, wait: bool = True
    ) -> str:
        """Send a text message to a user or a group chat.

        Args:
            to: a user name, or a chat id (``dm:<user>``, ``group:<id>``).
            text: the message.
            reply_to: id (hex) of a message in history to quote.
            wait: return only after the relay accepted it ("sent"). Offline,
                that is after reconnecting. With False, return once queued.

        Returns:
            The message id (hex).

        Raises:
            UsageError: empty text, unknown ``reply_to``, or sending to ourselves.
            NotAMember: ``to`` is a group we are not in.
            SendFailed: the relay refused the message for good.
            UnknownRecipient: the relay does not know the user.
            ClientClosed: the client was closed while waiting.
        """
        if not text:
            raise UsageError("text must not be empty")
        quote = await self._quote(reply_to) if reply_to else None
        return await self._queue(to, PayloadType.TEXT, wait=wait, text=text, quote=quote)

    async def _quote(self, message_id: str) -> Quote:
        found = await asyncio.to_thread(self._history.message, message_id)
        if found is None:
            raise UsageError("reply_to names no message in history")
        return Quote(bytes.fromhex(found.id), found.sender, (found.text or "")[:200])

    async def react(self, message_id: str, emoji: str, *, wait: bool = True) -> str:
        """React to a message (``emoji=""`` removes our reaction).

        Returns:
            The id of the reaction message.

        Raises:
            UsageError: the message is not in history.
        """
        target = await self._target(message_id)
        rows = [
            History.row(
                "reactions",
                id=f"{message_id}:{self._me.name}",
                message_id=message_id,
                user_id=self._me.name,
                emoji=emoji,
                updated_at=self._now_ms(),
            )
        ]
        return await self._queue(
            target.chat_id,
            PayloadType.REACTION,
            wait=wait,
            targets_ids=(bytes.fromhex(message_id),),
            reaction=emoji,
            store_row=False,
            extra_rows=rows,
        )

    async def edit(self, message_id: str, text: str, *, wait: bool = True) -> str:
        """Replace the text of one of our messages, for everyone.

        Raises:
            UsageError: not our message, deleted, or empty text.
        """
        target = await self._target(message_id, own=True)
        if not text:
            raise UsageError("text must not be empty")
        row = await asyncio.to_thread(
            self._history.updated, "messages", message_id, text=text, edited=1
        )
        return await self._queue(
            target.chat_id,
            PayloadType.EDIT,
            wait=wait,
            text=text,
            targets_ids=(bytes.fromhex(message_id),),
            store_row=False,
            extra_rows=[row] if row else [],
        )

    async def delete_for_everyone(self, message_id: str, *, wait: bool = True) -> str:
        """Delete one of our messages on every side (its text is cleared locally now).

        Raises:
            UsageError: not our message.
        """
        target = await self._target(message_id, own=True)
        row = await asyncio.to_thread(
            self._history.updated, "messages", message_id, text=None, quote_text=None, deleted=1
        )
        return await self._queue(
            target.chat_id,
            PayloadType.DELETE,
            wait=wait,
            targets_ids=(bytes.fromhex(message_id),),
            store_row=False,
            extra_rows=[row] if row else [],
        )

    async def _target(self, message_id: str, *, own: bool = False) -> StoredMessage:
        found = await asyncio.to_thread(self._history.message, message_id)
        if found is None or found.deleted:
            raise UsageError("no such message in history")
        if own and not found.outgoing:
            raise UsageError("only our own messages can be edited or deleted")
        return found

    async def send_typing(self, to: str, typing: bool = True) -> None:
        """Tell a chat we started (or stopped) typing. Dropped while offline.

        Raises:
            NotAMember: ``to`` is a group we are not in.
        """
        if not self.connected:
            return
        await self._queue(to, PayloadType.TYPING, wait=False, store_row=False, typing=typing)

    async def set_disappearing_timer(self, to: str, seconds: int, *, wait: bool = True) -> str:
        """Set a chat's disappearing-messages timer (0 turns it off), for both sides.

        Messages sent or received after this disappear ``seconds`` after they
        were sent (outgoing) or received (incoming).

        Raises:
            UsageError: negative seconds.
        """
        if seconds < 0:
            raise UsageError("seconds must not be negative")
        return await self._queue(
            to, PayloadType.TIMER, wait=wait, timer_seconds=seconds, text=f"timer {seconds}s"
        )

    async def mark_read(self, chat_id: str) -> int:
        """Mark every incoming message of a chat read; send read receipts if enabled.

        Returns:
            How many messages were newly marked read.

        Raises:
            StorageError: history cannot be written.
        """
        self._check_open()
        count = await asyncio.to_thread(self._mark_read_sync, chat_id)
        if count:
            self._outbox_wake.set()
        return count

    def _mark_read_sync(self, chat_id: str) -> int:
        with self._wlock:
            now = self._now_ms()
            send_receipts = self._store.get_meta(_META_READ_RECEIPTS) != "0"
            rows: list[Row] = []
            counters: dict[str, int] = {}
            for message_id, sender in self._history.unread(chat_id):
                updated = self._history.updated("messages", message_id, read_at=now)
                if updated:
                    rows.append(updated)
                if send_receipts:
                    rows.append(self._receipt_row(sender, message_id, "read", counters))
            if rows:
                self._commit(rows, counters)
            return sum(1 for t, _ in rows if t == "messages")

    def _receipt_row(self, user: str, message_id: str, kind: str, counters: dict[str, int]) -> Row:
        seq = counters.get("seq:outbox", self._counter("seq:outbox")) + 1
        counters["seq:outbox"] = seq
        return History.row(
            "outbox",
            id=f"r:{kind}:{message_id}",
            seq=seq,
            chat_id=direct_chat_id(user),
            mode="receipt",
            targets=dumps([user]),
            ref=message_id,
            kind=kind,
            state="queued",
            attempts=0,
            created_at=self._now_ms(),
        )

    # -- media -----------------------------------------------------------------------------

    async def send_file(
        self,
        to: str,
        path: str | os.PathLike[str],
        *,
        mime_type: str | None = None,
        caption: str = "",
        progress: Progress | None = None,
        wait: bool = True,
    ) -> str:
        """Encrypt a file, upload it to the relay's blob store, and send a pointer.

        Args:
            to: user or chat id.
            path: the file (any type, any size up to the relay's blob limit).
            mime_type: default: guessed from the file name.
            caption: optional text shown with it.
            progress: called with (bytes uploaded, total) during the upload, on
                the event loop's thread (never from a worker thread); it must not
                block.
            wait: as for :meth:`send_text`.

        Returns:
            The message id (hex).

        Raises:
            UsageError: the file cannot be read.
            TransportError: the upload failed (nothing was sent).
        """
        self._check_open()
        source = Path(path)
        enc = await asyncio.to_thread(encrypt_file, source, directory=self._dir)
        try:
            blob_id = await self._link.upload_blob(enc.path, enc.digest, progress)
        finally:
            with contextlib.suppress(OSError):
                enc.path.unlink()
        pointer = AttachmentPointer(
            blob_id=blob_id,
            key=enc.key,
            digest=enc.digest,
            size=enc.plaintext_size,
            mime_type=mime_type
            or mimetypes.guess_type(source.name)[0]
            or "application/octet-stream",
            file_name=source.name,
        )
        return await self._queue(
            to, PayloadType.ATTACHMENT, wait=wait, attachment=pointer, text=caption
        )

    async def forward_attachment(self, message_id: str, to: str, *, wait: bool = True) -> str:
        """Send an attachment we hold again, reusing its blob (no re-upload).

        Raises:
            UsageError: the message has no attachment.
        """
        row = await asyncio.to_thread(self._history.attachment, message_id)
        if row is None or not row["key"]:
            raise UsageError("that message has no attachment")
        pointer = AttachmentPointer(
            row["blob_id"],
            row["key"],
            row["digest"],
            row["size"],
            row["mime_type"] or "",
            row["file_name"] or "",
        )
        return await self._queue(to, PayloadType.ATTACHMENT, wait=wait, attachment=pointer)

    async def download_attachment(
        self,
        message_id: str,
        destination: str | os.PathLike[str],
        *,
        progress: Progress | None = None,
    ) -> Path:
        """Download, verify and decrypt a message's attachment into ``destination``.

        Args:
            message_id: the message (hex) whose attachment to fetch.
            destination: the file to write.
            progress: called with (bytes downloaded, total) on the event loop's
                thread (never from a worker thread); it must not block.

        Raises:
            UsageError: the message has no attachment.
            MediaCorrupt: the blob was tampered with or truncated (nothing written).
            TransportError: the download failed.
        """
        row = await asyncio.to_thread(self._history.attachment, message_id)
        if row is None or not row["key"]:
            raise UsageError("that message has no attachment")
        target = Path(destination)
        tmp = self._dir / f".download-{message_id}"
        try:
            try:
                await self._link.download_blob(row["blob_id"], tmp, progress)
            except BlobDigestMismatch as exc:
                # The transport checks the content address first: a blob changed on
                # the relay (or in transit) fails there, before it is decrypted.
                raise MediaCorrupt("the blob was tampered with or truncated") from exc
            await asyncio.to_thread(decrypt_file, tmp, target, row["key"], row["digest"])
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return target

    # -- groups ----------------------------------------------------------------------------

    async def create_group(self, name: str, members: Sequence[str]) -> str:
        """Create a group with us as its admin, and tell every member (pairwise).

        Returns:
            The group id; its chat id is ``group:<id>``.

        Raises:
            UsageError: no members, or an invalid name.
            UnknownRecipient: a member does not exist on the relay (checked when
                the relay can be reached); nothing was created.
        """
        others = sorted(set(members) - {self._me.name})
        if not others:
            raise UsageError("a group needs at least one other member")
        # Resolve every member first, so a group never holds a user that does not
        # exist. If the relay cannot be reached, the creation is queued as before and
        # the members are resolved when it is sent.
        for user in others:
            try:
                await self._devices(user)
            except TransportError:
                break
        gid = os.urandom(12).hex()
        everyone = tuple(sorted({*others, self._me.name}))
        control = GroupControl(
            GroupAction.CREATE, name=name, members=everyone, admins=(self._me.name,), revision=1
        )

        def commit_state() -> None:
            with self._wlock:
                self._commit(self._group_rows(gid, control, self._me.name), {})

        await asyncio.to_thread(commit_state)
        await self._queue(
            group_chat_id(gid), PayloadType.GROUP, wait=True, group=control, group_targets=others
        )
        return gid

    async def add_member(self, group_id: str, user: str) -> None:
        """Add a member (admins only); everyone, the new member included, is told.

        Args:
            group_id: the group.
            user: the user to add.

        Raises:
            NotAMember: we are not in the group.
            NotAdmin: we are not an admin of it.
            IdentityHeld: a member's key changed and is not accepted (the change
                stays queued).
        """
        await self._change_group(group_id, GroupAction.ADD, user)

    async def remove_member(self, group_id: str, user: str) -> None:
        """Remove a member (admins only) and rotate our Sender Key.

        Every remaining member rotates theirs when the change reaches them, so
        the removed member cannot read anything sent afterwards.

        Raises:
            NotAMember: we are not in the group.
            NotAdmin: we are not an admin of it.
            UsageError: ``user`` is not a member.
        """
        await self._change_group(group_id, GroupAction.REMOVE, user)

    async def rename_group(self, group_id: str, name: str) -> None:
        """Rename a group (admins only).

        Raises:
            NotAMember: we are not in the group.
            NotAdmin: we are not an admin of it.
        """
        await self._change_group(group_id, GroupAction.RENAME, None, name=name)

    async def leave_group(self, group_id: str) -> None:
        """Leave a group; the others rotate their Sender Keys.

        Raises:
            NotAMember: we are not in the group.
        """
        await self._change_group(group_id, GroupAction.LEAVE, self._me.name)

    async def _change_group(
        self, gid: str, action: GroupAction, user: str | None, *, name: str | None = None
    ) -> None:
        self._check_open()
        group = await asyncio.to_thread(self._history.group, gid)
        if group is None or not group["member"]:
            raise NotAMember(gid)
        members = await asyncio.to_thread(self._history.group_members, gid)
        admins = tuple(json.loads(group["admins"] or "[]"))
        if action is not GroupAction.LEAVE and self._me.name not in admins:
            raise NotAdmin(gid)
        new_members = set(members)
        targets: tuple[str, ...] = ()
        if action is GroupAction.ADD and user:
            new_members.add(user)
            targets = (user,)
        elif action in (GroupAction.REMOVE, GroupAction.LEAVE) and user:
            if user not in new_members:
                raise UsageError(f"{user} is not a member")
            new_members.discard(user)
            targets = (user,)
        new_admins = tuple(a for a in admins if a in new_members)
        control = GroupControl(
            action,
            name=name if name is not None else (group["name"] or ""),
            members=tuple(sorted(new_members)),
            admins=new_admins,
            revision=int(group["revision"] or 0) + 1,
            targets=targets,
        )
        recipients = sorted((set(members) | new_members) - {self._me.name})
        rows = await asyncio.to_thread(self._group_rows, gid, control, self._me.name)
        await self._queue(
            group_chat_id(gid),
            PayloadType.GROUP,
            wait=True,
            group=control,
            group_targets=recipients,
            extra_rows=rows,
        )
        if action in (GroupAction.REMOVE, GroupAction.LEAVE):
            await asyncio.to_thread(self._rotate_group_key, gid, targets)

    def _rotate_group_key(self, gid: str, gone: Sequence[str]) -> None:
        """Forget our Sender Key (a new one is made and distributed on next send)."""
        with self._wlock:
            self._engine.group_rotate(gid)
            for user in gone:
                for device in self._known_devices(user):
                    self._engine.group_forget_sender(gid, Address(user, device))
            generation = self._counter(f"keygen:{gid}") + 1
            self._commit([], {f"keygen:{gid}": generation})

    def _known_devices(self, user: str) -> list[int]:
        return self._engine.session_devices(user)

    def _group_rows(self, gid: str, control: GroupControl, by: str) -> list[Row]:
        """Rows for the group's state after ``control`` (members, admins, name)."""
        with self._wlock:
            now = self._now_ms()
            current = self._history.group(gid)
            am_member = self._me.name in control.members
            rows: list[Row] = [
                History.row(
                    "groups",
                    id=gid,
                    name=control.name,
                    admins=dumps(list(control.admins)),
                    revision=control.revision,
                    created_by=(current or {}).get("created_by") or by,
                    member=1 if am_member else 0,
                    created_at=(current or {}).get("created_at") or now,
                )
            ]
            previous = self._history.group_members(gid)
            for user in sorted(set(previous) | set(control.members)):
                role = "gone"
                if user in control.members:
                    role = "admin" if user in control.admins else "member"
                rows.append(
                    History.row(
                        "users_groups", id=f"{gid}:{user}", group_id=gid, user_id=user, role=role
                    )
                )
                rows.append(History.row("users", id=user, created_at=now))
            chat_id = group_chat_id(gid)
            if self._history.current("chats", chat_id) is None:
                rows.append(
                    History.row(
                        "chats",
                        id=chat_id,
                        kind="group",
                        group_id=gid,
                        timer_seconds=0,
                        last_message_at=now,
                        created_at=now,
                    )
                )
            return rows

    # -- trust -----------------------------------------------------------------------------

    async def safety_number(self, user: str) -> list[tuple[int, SafetyNumber]]:
        """Safety numbers with each known device of ``user`` (digits + QR payload).

        Raises:
            UsageError: we hold no identity key for that user yet.
        """

        def compute() -> list[tuple[int, SafetyNumber]]:
            out = []
            for address, record in sorted(self._store.identities(user).items()):
                out.append(
                    (
                        address.device_id,
                        compute_safety_number(
                            self._engine.identity_key, self._me.name, record.identity_key, user
                        ),
                    )
                )
            if not out:
                raise UsageError(f"no identity known for {user}")
            return out

        return await asyncio.to_thread(compute)

    async def groups(self) -> list[GroupInfo]:
        """Every group we know (``member`` is False for groups we left or were removed from).

        Raises:
            StorageError: history cannot be read.
        """
        return await asyncio.to_thread(self._history.groups)

    async def contacts(self) -> dict[str, dict[int, str]]:
        """Everyone we have a chat, a group or a key with: user -> device -> trust level.

        A user we never exchanged keys with maps to an empty dict.

        Raises:
            StorageError: the store or history cannot be read.
        """

        def collect() -> dict[str, dict[int, str]]:
            out: dict[str, dict[int, str]] = {}
            for user in self._history.users():
                if user == self._me.name:
                    continue
                found = self._store.identities(user)
                out[user] = {a.device_id: r.trust for a, r in sorted(found.items())}
            return out

        return await asyncio.to_thread(collect)

    async def trust_level(self, user: str) -> dict[int, str]:
        """How far each known device of a contact is trusted.

        Returns:
            device id -> ``tofu``, ``verified`` or ``untrusted`` (empty if unknown).

        Raises:
            StorageError: the store cannot be read.
        """
        found = await asyncio.to_thread(self._store.identities, user)
        return {a.device_id: r.trust for a, r in found.items()}

    async def held_users(self) -> set[str]:
        """Contacts whose identity key changed and was not accepted yet (sending is held).

        Read from the store (keys recorded as ``untrusted``), so it survives
        restarts; :meth:`accept_identity` or :meth:`verify` releases a user.

        Raises:
            StorageError: the store or history cannot be read.
        """

        def collect() -> set[str]:
            held = set(self._held)
            for user in self._history.users():
                found = self._store.identities(user)
                if any(r.trust == TrustLevel.UNTRUSTED for r in found.values()):
                    held.add(user)
            return held - {self._me.name}

        return await asyncio.to_thread(collect)

    async def user_exists(self, user: str) -> bool:
        """Whether the relay knows ``user`` (asks it when no session exists yet).

        Fetching their prekey bundles also sets up the session, as the first
        message to them would. A user whose changed key is held exists.

        Args:
            user: the user name.

        Returns:
            False if the relay has no such user.

        Raises:
            UsageError: not a valid user name.
            TransportError: the relay cannot be reached.
        """
        self._check_open()
        check_username(user)
        try:
            await self._devices(user)
        except UnknownRecipient:
            return False
        except IdentityHeld:
            return True
        return True

    async def queued_count(self) -> int:
        """Messages composed but not yet accepted by the relay (held ones included).

        Receipts, typing indicators and session resets are not counted.

        Raises:
            StorageError: history cannot be read.
        """
        return await asyncio.to_thread(self._history.queued_count)

    async def accept_identity(self, user: str, *, verified: bool = False) -> None:
        """Accept ``user``'s current (new) identity keys; held messages then go out.

        Args:
            user: the contact.
            verified: record the keys as verified (safety numbers compared).

        Raises:
            UsageError: nothing is known about that user.
        """

        def accept() -> None:
            level = TrustLevel.VERIFIED if verified else TrustLevel.TOFU
            known = self._store.identities(user)
            if not known:
                raise UsageError(f"no identity known for {user}")
            with self._wlock:
                for address, record in known.items():
                    self._engine.set_trust(address, record.identity_key, level)

        await asyncio.to_thread(accept)
        self._held.discard(user)
        self._outbox_wake.set()

    async def verify(self, user: str) -> None:
        """Mark ``user``'s current keys verified (after comparing safety numbers).

        Raises:
            UsageError: nothing is known about that user.
        """
        await self.accept_identity(user, verified=True)

    # -- the connection --------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        failures = 0
        while not self._closing:
            self._emit(ConnectionStateChanged("connecting"))
            reason = ""
            try:
                if self._receive:
                    await self._link.connect()
                else:
                    # The relay is reachable and accepts our credentials.
                    await self._link.prekey_count()
                failures = 0
                self._connected.set()
                self._emit(ConnectionStateChanged("connected"))
                self._outbox_wake.set()
                maintenance = asyncio.create_task(self._maintenance_loop())
                try:
                    if self._receive:
                        await self._receive_deliveries()
                    else:
                        # Send-only: nothing is taken from the mailbox; sends go over
                        # HTTP until close() cancels this wait.
                        await asyncio.Event().wait()
                finally:
                    maintenance.cancel()
                    with contextlib.suppress(asyncio.CancelledError, E2EEError):
                        await maintenance
                reason = "connection closed"
            except (Replaced, DeviceRemoved) as exc:
                # Another connection of this device took over, or the device was
                # removed: reconnecting would only fight over it.
                self._connected.clear()
                self._emit(ConnectionStateChanged("offline", None, type(exc).__name__))
                return
            except TransportError as exc:
                reason = type(exc).__name__
            except StorageError as exc:
                # Nothing was acknowledged; the relay delivers again after reconnecting.
                reason = f"storage: {type(exc).__name__}"
                _log.warning("storage error while receiving: %s", exc)
            except E2EEError as exc:
                reason = type(exc).__name__
                _log.warning("receiving stopped: %s", type(exc).__name__)
            finally:
                self._connected.clear()
            if self._closing:
                return
            with contextlib.suppress(TransportError):
                await self._link.disconnect()
            failures += 1
            delay = min(self._options.backoff_max, self._options.backoff_base * 2 ** (failures - 1))
            delay *= random.uniform(0.5, 1.0)  # noqa: S311  (jitter, not crypto)
            self._emit(ConnectionStateChanged("offline", retry_in=delay, reason=reason))
            await asyncio.sleep(delay)

    async def _maintenance_loop(self) -> None:
        while True:
            try:
                count = await self._link.prekey_count()
                upload = await asyncio.to_thread(self._locked, self._engine.maintain_keys, count)
                if upload is not None:
                    await self._link.upload_keys(upload.to_json())
            except TransportError as exc:
                _log.info("key maintenance postponed: %s", type(exc).__name__)
            await asyncio.sleep(self._options.maintenance_interval)

    async def _expiry_loop(self) -> None:
        while not self._closing:
            events = await asyncio.to_thread(self._expire_sync)
            for event in events:
                self._emit(event)
            await asyncio.sleep(self._options.expiry_interval)

    def _expire_sync(self) -> list[Event]:
        with self._wlock:
            events: list[Event] = []
            rows: list[Row] = []
            for mid in self._history.expired(self._now_ms()):
                row = self._history.updated("messages", mid, text=None, quote_text=None, deleted=2)
                if row is None:
                    continue
                rows.append(row)
                attachment = self._history.updated(
                    "attachments", mid, key=None, digest=None, local_path=None
                )
                if attachment:
                    rows.append(attachment)
                events.append(MessageChanged(mid, row[1]["chat_id"], "expired", row[1]["sender"]))
            if rows:
                self._commit(rows, {})
            return events

    async def _ack_loop(self) -> None:
        while not self._closing:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            await asyncio.sleep(self._options.ack_delay)
            # Unacknowledged messages are delivered again and seen as duplicates.
            with contextlib.suppress(TransportError):
                await self._flush_acks()

    async def _flush_acks(self) -> None:
        while self._acks:
            batch, self._acks = self._acks[:500], self._acks[500:]
            try:
                await self._link.ack(batch)
            except TransportError:
                self._acks = batch + self._acks
                raise

    # -- receiving -------------------------------------------------------------------------

    async def _receive_deliveries(self) -> None:
        """Process the live connection's deliveries in batches until it closes.

        A reader task moves deliveries into a queue; each round takes what is
        waiting (up to ``_INBOX_BATCH``), so a backlog is processed in large
        batches (one transaction each) and a live message alone, without delay.

        Raises:
            TransportError: the connection failed (after what arrived before
                the failure was processed).
        """
        queue: asyncio.Queue[Delivery | QueueEmpty | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for item in self._link.deliveries():
                    queue.put_nowait(item)
            finally:
                queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            processed = 0
            ended = False
            while not ended:
                batch: list[Delivery] = []
                drained = False
                item = await queue.get()
                while True:
                    if item is None:
                        ended = True
                        break
                    if isinstance(item, QueueEmpty):
                        drained = True
                        break
                    batch.append(item)
                    if len(batch) >= _INBOX_BATCH or queue.empty():
                        break
                    item = queue.get_nowait()
                if batch:
                    await self._handle_batch(batch)
                    processed += len(batch)
                if drained:
                    self._emit(BacklogDrained(processed))
            await reader  # re-raises what ended the connection
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransportError):
                    await reader

    async def _handle_batch(self, batch: Sequence[Delivery]) -> None:
        # Shielded: if the client is closed meanwhile, the batch still finishes
        # (commit, acks queued, events emitted) and close() waits for it.
        task = asyncio.ensure_future(self._receive_batch(batch))
        self._inflight = task
        inbounds = await asyncio.shield(task)
        # Acks go out from _ack_loop in batches; processing never waits for the
        # relay to commit them.
        self._ack_wake.set()
        wake = False
        for inbound in inbounds:
            if inbound.reset is not None:
                await self._session_reset(inbound.reset)
            if inbound.key_request is not None:
                gid, sender = inbound.key_request
                await self._request_sender_key(gid, sender)
            if inbound.resend_key:
                self._outbox_wake.set()
            wake = wake or inbound.wake_outbox
        if wake and not self._wake_pending:
            # Receipts for a burst of deliveries go out together, a moment later.
            self._wake_pending = True
            asyncio.get_running_loop().call_later(0.05, self._deferred_wake)

    async def _receive_batch(self, batch: Sequence[Delivery]) -> list[_Inbound]:
        """Process a batch; acknowledge and show what was committed.

        Raises:
            StorageError: a transaction failed; the deliveries from it on were
                neither acknowledged nor shown (the relay delivers them again).
        """
        inbounds, error = await asyncio.to_thread(self._process_batch, batch)
        # Committed: only now acknowledged, and only now shown.
        self._acks.extend(d.id for d in batch[: len(inbounds)])
        for inbound in inbounds:
            for event in inbound.events:
                self._emit(event)
        if error is not None:
            if inbounds:
                self._ack_wake.set()
            raise error
        return [i for i in inbounds if i.reset or i.key_request or i.resend_key or i.wake_outbox]

    def _process_batch(
        self, batch: Sequence[Delivery]
    ) -> tuple[list[_Inbound], StorageError | None]:
        """Decrypt and store deliveries in group-commit transactions.

        The deliveries share store transactions (one fsync per transaction instead
        of one per message). A transaction ends early after a group change,
        because group state is read through History's own connection, which sees
        only committed rows.

        Returns:
            What the committed deliveries produced (a prefix of ``batch``, all of
            it unless a transaction failed), and the error that stopped the rest.
        """
        done: list[_Inbound] = []
        with self._wlock:
            while len(done) < len(batch):
                pending: list[_Inbound] = []
                self._deferred = {}
                try:
                    with self._store.batch():
                        for delivery in batch[len(done) :]:
                            pending.append(self._process_delivery(delivery))
                            if pending[-1].barrier:
                                break
                        if self._deferred:
                            # In the same transaction as the messages that moved them.
                            rows = tuple((t, row) for (t, _), row in self._deferred.items())
                            self._store.commit(Changes(app_rows=rows))
                except StorageError as exc:
                    # Nothing of this transaction stands; the relay delivers it again.
                    self._deferred = None
                    self._drop_caches()  # cached rows may describe the rolled-back rows
                    return done, exc
                except BaseException:
                    self._deferred = None
                    self._drop_caches()
                    raise
                self._deferred = None
                done.extend(pending)
        return done, None

    def _process_delivery(self, delivery: Delivery) -> _Inbound:
        sender = Address(delivery.sender, delivery.device)
        out = _Inbound()
        with self._wlock:
            try:
                env = envelope.parse(delivery.body)
                if isinstance(env, envelope.GroupEnvelope):
                    self._engine.group_decrypt(
                        env.group_id,
                        sender,
                        env.body,
                        on_plaintext=lambda p: self._on_plaintext(sender, p, out, env.group_id),
                    )
                else:
                    entry = env.entry_for(self._me.name, self._me.device_id)
                    if entry is None:
                        raise InvalidMessage("no ciphertext for this device in the envelope")
                    result = self._engine.decrypt(
                        sender,
                        Ciphertext(entry.kind, entry.body),
                        on_plaintext=lambda p: self._on_plaintext(sender, p, out, None),
                    )
                    change = result.identity_change
                    if change is not None:
                        held = not change.first_use or self._strict
                        # Before the message itself, so a UI can flag it.
                        out.events.insert(
                            0,
                            IdentityChanged(sender.name, sender.device_id, change.first_use, held),
                        )
                        if held:
                            self._held.add(sender.name)
            except DuplicateMessage:
                return _Inbound()  # already stored: acknowledge, show nothing twice
            except StorageError:
                self._drop_caches()  # rows computed for a failed commit are void
                raise
            except E2EEError as exc:
                # Reported (and repaired if possible), then acknowledged: a message
                # that can never be read must not block the mailbox.
                self._drop_caches()
                return self._problem(sender, delivery, exc)
        return out

    def _problem(self, sender: Address, delivery: Delivery, exc: E2EEError) -> _Inbound:
        out = _Inbound()
        group_id: str | None = None
        with contextlib.suppress(InvalidMessage):
            env = envelope.parse(delivery.body)
            if isinstance(env, envelope.GroupEnvelope):
                group_id = env.group_id
        error = type(exc).__name__
        repair: Literal["session_reset", "sender_key_request", "none"] = "none"
        if group_id is not None and isinstance(exc, NoSession | MissingKey):
            explanation = (
                "we do not hold this member's current group key; asked them to send it, "
                "so their later messages can be read"
            )
            if self._may_repair(sender, group_id):
                repair = "sender_key_request"
                out.key_request = (group_id, sender)
        elif isinstance(exc, payload.UnsupportedPayload):
            explanation = "the sender uses a newer message format; update this app"
        elif group_id is None and isinstance(exc, NoSession | MissingKey | InvalidMessage):
            explanation = (
                "the message could not be decrypted (our session with the sender is out of "
                "step); a new session is being set up; ask them to send it again"
            )
            if self._may_repair(sender, ""):
                repair = "session_reset"
                out.reset = sender
        else:
            explanation = f"the message was rejected: {exc}"
        notice: StoredMessage | None = None
        if group_id is None or self._history.group(group_id) is not None:
            # Recorded in its chat (in this delivery's transaction), so every client
            # shows it where it happened, also after a restart.
            chat_id = group_chat_id(group_id) if group_id else direct_chat_id(sender.name)
            rows: list[Row] = []
            notice = self._notice_rows(
                rows,
                chat_id,
                sender,
                f"{_hex(delivery.id)}.undecryptable",
                "undecryptable",
                f"a message from {sender.name} could not be read: {explanation}",
                self._now_ms(),
            )
            if rows:  # a new notice (not the same delivery again after a crash)
                unreadable_key = f"unreadable:{sender}:{chat_id}"
                unreadable = (self._counter_or_none(unreadable_key) or 0) + 1
                self._commit(rows, {unreadable_key: unreadable})
        out.events.append(
            DecryptionProblem(
                sender.name,
                sender.device_id,
                error,
                explanation,
                repair,
                group_id=group_id,
                notice=notice,
            )
        )
        return out

    def _may_repair(self, sender: Address, scope: str) -> bool:
        """At most one repair per sender device (and scope) per ``reset_interval_ms``."""
        name = f"repair:{sender}:{scope}"
        now = self._now_ms()
        if now - self._counter(name) < self._options.reset_interval_ms:
            return False
        self._commit([], {name: now})
        return True

    async def _session_reset(self, peer: Address) -> None:
        """Start a fresh session with ``peer`` and tell them (bounded by _may_repair)."""
        try:
            bundles = await self._link.fetch_bundles(peer.name)
            for data in bundles:
                bundle = PreKeyBundle.from_json(data)
                if bundle.device_id == peer.device_id:
                    await asyncio.to_thread(
                        self._locked, self._engine.process_bundle, peer.name, bundle
                    )
        except (TransportError, InvalidBundle, UntrustedIdentity) as exc:
            _log.info("session reset with %s postponed: %s", peer, type(exc).__name__)
            return
        await self._queue(peer.name, PayloadType.SESSION_RESET, wait=False, store_row=False)

    async def _request_sender_key(self, gid: str, sender: Address) -> None:
        with contextlib.suppress(E2EEError):
            await self._queue(
                group_chat_id(gid),
                PayloadType.SESSION_RESET,
                wait=False,
                store_row=False,
                group_targets=[sender.name],
            )

    def _on_plaintext(
        self, sender: Address, data: bytes, out: _Inbound, envelope_group: str | None
    ) -> list[Row]:
        body = payload.decode(data)
        if envelope_group is not None and body.group_id != envelope_group:
            raise InvalidMessage("group message names another group inside")
        return self._apply(sender, body, out, via_group=envelope_group is not None)

    def _apply(
        self, sender: Address, body: Payload, out: _Inbound, *, via_group: bool
    ) -> list[Row]:
        """Rows (and events into ``out``) for one decrypted payload; nothing committed here."""
        now = self._now_ms()
        gid = body.group_id
        chat_id = group_chat_id(gid) if gid else direct_chat_id(sender.name)
        mid = _hex(body.message_id)
        rows: list[Row] = []
        counters: dict[str, int] = {}
        if gid and body.type is not PayloadType.GROUP:
            group = self._history.group(gid)
            members = self._history.group_members(gid)
            if group is None or sender.name not in members:
                if body.type is PayloadType.SESSION_RESET:
                    return []
                raise InvalidMessage("group message from someone who is not a member")
        if body.counter:
            # A direct chat starts at 0; in a group we may join mid-stream, so the
            # first counter seen from a member is the baseline.
            key = f"in:{sender}:{chat_id}"
            last = self._counter_or_none(key)
            if last is None and not gid:
                last = 0
            # Messages that arrived but could not be read were reported as such
            # (``undecryptable``); they are not also "never arrived".
            unreadable_key = f"unreadable:{sender}:{chat_id}"
            unreadable = self._counter_or_none(unreadable_key) or 0
            if unreadable:
                counters[unreadable_key] = 0
            if last is not None and body.counter > last + 1 + unreadable:
                missed = body.counter - last - 1 - unreadable
                plural = "s" if missed != 1 else ""
                notice = self._notice_rows(
                    rows,
                    chat_id,
                    sender,
                    f"{mid}.gap",
                    "gap",
                    f"{missed} message{plural} from {sender.name} never arrived",
                    now,
                )
                out.events.append(
                    GapDetected(chat_id, sender.name, sender.device_id, missed, notice)
                )
            # A counter at or below the last one means the sender started over
            # (a reinstall): follow it rather than report a gap forever.
            counters[key] = body.counter
        kind = body.type
        if kind in (PayloadType.TEXT, PayloadType.ATTACHMENT, PayloadType.TIMER):
            if self._history.current("messages", mid) is not None:
                return self._finish(rows, counters)
            pending: dict[str, dict[str, Any]] = {}
            chat = self._ensure_chat_rows(chat_id, now, pending)
            if kind is PayloadType.TIMER:
                chat["timer_seconds"] = body.timer_seconds
            expire = body.expire_seconds
            mseq = self._counter("seq:messages") + 1
            counters["seq:messages"] = mseq
            first = len(rows)  # the message's row (a gap notice may come before it)
            rows.append(
                History.row(
                    "messages",
                    id=mid,
                    chat_id=chat_id,
                    group_id=gid or None,
                    sender=sender.name,
                    sender_device=sender.device_id,
                    outgoing=0,
                    type=kind.name.lower(),
                    text=body.text or None,
                    reply_to=_hex(body.quote.message_id) if body.quote else None,
                    quote_text=body.quote.text if body.quote else None,
                    counter=body.counter,
                    sent_at=body.sent_at_ms,
                    received_at=now,
                    status="received",
                    edited=0,
                    deleted=0,
                    expire_seconds=expire,
                    expires_at=now + expire * 1000 if expire else None,
                    seq=mseq,
                )
            )
            if body.attachment is not None:
                rows.append(self._attachment_row(mid, body.attachment))
            self._defer_or_add(rows, [("chats", c) for c in pending.values()])
            link_id = f"{chat_id}:{sender.name}"
            if link_id not in self._known_links:
                rows.append(History.row("users", id=sender.name, created_at=now))
                rows.append(
                    History.row("users_chats", id=link_id, chat_id=chat_id, user_id=sender.name)
                )
                self._known_links.add(link_id)
            # The delivered receipt needs no row of its own: every incoming message
            # above the "receipts sent" watermark gets one (see _flush_delivered).
            out.wake_outbox = True
            rows = self._finish(rows, counters)
            # The event is built after commit from the same values.
            out.events.append(MessageReceived(to_message(rows[first][1])))
            return rows
        if kind is PayloadType.RECEIPT:
            status: Literal["delivered", "read"] = (
                "delivered" if body.receipt is ReceiptKind.DELIVERED else "read"
            )
            for target in body.target_ids:
                tid = _hex(target)
                message = self._history.current("messages", tid)
                if message is None or not message["outgoing"]:
                    continue
                rid = f"{tid}:{sender.name}:{sender.device_id}"
                old = self._history.current("receipts", rid)
                new_status = History.status_at_least(old["status"] if old else None, status)
                rows.append(
                    History.row(
                        "receipts",
                        id=rid,
                        message_id=tid,
                        user_id=sender.name,
                        device_id=sender.device_id,
                        status=new_status,
                        updated_at=now,
                    )
                )
                field_name = "delivered_at" if status == "delivered" else "read_at"
                message[field_name] = message[field_name] or now
                message["status"] = History.status_at_least(message["status"], status)
                rows.append(("messages", message))
                out.events.append(
                    ReceiptUpdated(tid, message["chat_id"], status, sender.name, sender.device_id)
                )
            return self._finish(rows, counters)
        if kind is PayloadType.TYPING:
            out.events.append(Typing(chat_id, sender.name, sender.device_id, body.typing))
            return self._finish(rows, counters)
        if kind is PayloadType.REACTION:
            tid = _hex(body.target_ids[0])
            target_row = self._history.current("messages", tid)
            if target_row is not None and target_row["chat_id"] == chat_id:
                rows.append(
                    History.row(
                        "reactions",
                        id=f"{tid}:{sender.name}",
                        message_id=tid,
                        user_id=sender.name,
                        emoji=body.reaction,
                        updated_at=now,
                    )
                )
                out.events.append(MessageChanged(tid, chat_id, "reaction", sender.name))
            return self._finish(rows, counters)
        if kind in (PayloadType.EDIT, PayloadType.DELETE):
            tid = _hex(body.target_ids[0])
            target_row = self._history.current("messages", tid)
            # Only the author may edit or delete, and only in the same chat.
            if (
                target_row is not None
                and target_row["sender"] == sender.name
                and not target_row["outgoing"]
                and target_row["chat_id"] == chat_id
                and not target_row["deleted"]
            ):
                if kind is PayloadType.EDIT:
                    target_row.update(text=body.text, edited=1)
                    change: Literal["edited", "deleted"] = "edited"
                else:
                    target_row.update(text=None, quote_text=None, deleted=1)
                    change = "deleted"
                    attachment = self._history.updated("attachments", tid, key=None, digest=None)
                    if attachment:
                        rows.append(attachment)
                rows.append(("messages", target_row))
                out.events.append(MessageChanged(tid, chat_id, change, sender.name))
            return self._finish(rows, counters)
        if kind is PayloadType.GROUP:
            assert body.group is not None
            if via_group:
                raise InvalidMessage("group changes travel pairwise only")
            out.barrier = True
            rows.extend(self._apply_group(sender, gid, body.group, out))
            return self._finish(rows, counters)
        if kind is PayloadType.SESSION_RESET:
            if gid:
                # A member asks for our Sender Key again: redistribute to them.
                for device in self._known_devices(sender.name):
                    counters[f"dist:{gid}:{sender.name}.{device}"] = 0
                out.resend_key = (gid, sender.name)
            return self._finish(rows, counters)
        return self._finish(rows, counters)

    def _finish(self, rows: list[Row], counters: Mapping[str, int]) -> list[Row]:
        # Counter rows ride along in the decrypt's transaction (or are deferred to
        # its end); the cache is updated right away because the commit follows
        # immediately under the write lock (if it fails, the cache is dropped).
        self._counters.update(counters)
        self._defer_or_add(
            rows, [History.row("counters", id=k, value=v) for k, v in counters.items()]
        )
        return rows

    def _defer_or_add(self, rows: list[Row], more: Sequence[Row]) -> None:
        """Add ``more`` to ``rows``, or inside a receive transaction defer them to its end.

        Only rows that every later message overwrites (counters, a chat's
        ``last_message_at``) are deferred: the transaction commits all or nothing,
        so they still stand exactly when the messages that moved them do.
        """
        if self._deferred is None:
            rows.extend(more)
            return
        for table, row in more:
            self._deferred[(table, row["id"])] = row

    def _apply_group(
        self, sender: Address, gid: str, control: GroupControl, out: _Inbound
    ) -> list[Row]:
        group = self._history.group(gid)
        action = control.action
        if action is GroupAction.SENDER_KEY:
            if group is None or sender.name not in self._history.group_members(gid):
                raise InvalidMessage("sender key from someone who is not a member")
            self._engine.group_process_distribution(gid, sender, control.distribution)
            return []
        revision = int(group["revision"] or 0) if group else 0
        admins = set(json.loads(group["admins"] or "[]")) if group else set()
        members: set[str] = set(self._history.group_members(gid)) if group else set()
        if group is None:
            # We learn about a group by being created into it or added to it; the
            # sender must be an admin of the state it sends.
            joining = action in (GroupAction.CREATE, GroupAction.ADD)
            if not joining or sender.name not in control.admins:
                return []
            if self._me.name not in control.members:
                return []
        elif action is GroupAction.CREATE:
            return []  # a group id is created once
        elif action is GroupAction.LEAVE:
            if control.targets != (sender.name,) or sender.name not in members:
                return []
        elif sender.name not in admins or control.revision <= revision:
            return []  # only admins change a group, and never backwards
        if not set(control.admins) <= set(control.members) and action is not GroupAction.LEAVE:
            return []
        if action is GroupAction.LEAVE:
            control = dataclasses.replace(
                control,
                members=tuple(sorted(members - {sender.name})),
                admins=tuple(sorted(admins - {sender.name})),
                name=group["name"] if group else control.name,
                revision=max(revision + 1, control.revision),
            )
        rows = self._group_rows(gid, control, sender.name)
        gone = [u for u in members if u not in control.members]
        if gone:
            # A member left or was removed: they must not read what we send next.
            self._engine.group_rotate(gid)
            rows.append(
                History.row(
                    "counters", id=f"keygen:{gid}", value=self._counter(f"keygen:{gid}") + 1
                )
            )
            self._counters[f"keygen:{gid}"] = self._counter(f"keygen:{gid}") + 1
            for user in gone:
                for device in self._known_devices(user):
                    self._engine.group_forget_sender(gid, Address(user, device))
        if self._me.name not in control.members:
            for user in members:
                for device in self._known_devices(user):
                    self._engine.group_forget_sender(gid, Address(user, device))
        out.events.append(
            GroupChanged(
                gid,
                _ACTION_NAMES[action],
                sender.name,
                control.name,
                control.members,
                control.admins,
                control.targets,
            )
        )
        return rows

    # -- the outbox ------------------------------------------------------------------------

    async def flush(self, timeout: float | None = None) -> int:
        """Wait until every outbox entry that can be sent now was sent.

        Held chats (an identity key to accept) and failed entries do not count.
        Offline, this waits for the connection (bounded by ``timeout``).

        Args:
            timeout: seconds to wait at most; None waits as long as it takes.

        Returns:
            How many outbox entries are still queued (held, or not sent in time).

        Raises:
            ClientClosed: the client is closed.
        """
        self._check_open()
        target = self._flush_started + 1
        self._outbox_wake.set()

        async def done() -> None:
            async with self._flush_cond:
                await self._flush_cond.wait_for(lambda: self._flush_done >= target)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done(), timeout)
        pending = await asyncio.to_thread(self._history.pending_outbox)
        return len(pending)

    async def _outbox_loop(self) -> None:
        while not self._closing:
            await self._outbox_wake.wait()
            self._outbox_wake.clear()
            if not self._connected.is_set():
                continue
            self._flush_started += 1
            try:
                await self._flush_outbox()
            except TransportError as exc:
                _log.info("outbox paused: %s", type(exc).__name__)
                # Connection problems wake the outbox on reconnect; a busy relay
                # (429, 5xx) needs a timer.
                asyncio.get_running_loop().call_later(1.0, self._outbox_wake.set)
            except StorageError as exc:
                _log.warning("outbox storage error: %s", exc)
                asyncio.get_running_loop().call_later(1.0, self._outbox_wake.set)
            finally:
                async with self._flush_cond:
                    self._flush_done += 1
                    self._flush_cond.notify_all()

    async def _flush_outbox(self) -> None:
        entries = await asyncio.to_thread(self._history.pending_outbox)
        blocked_chats: dict[str, str] = {}  # chat id -> the held user
        receipts: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for entry in entries:
            if self._closing or not self._connected.is_set():
                return
            if entry["mode"] == "receipt":
                receipts.setdefault((json.loads(entry["targets"])[0], entry["kind"]), []).append(
                    entry
                )
                continue
            if entry["chat_id"] in blocked_chats:
                held = blocked_chats[entry["chat_id"]]
                self._fail_waiter(entry["id"], IdentityHeld(held, entry["id"]))
                continue
            if entry["kind"] == "typing" and self._now_ms() - entry["created_at"] > _TYPING_TTL_MS:
                await self._finish_entry(entry, "dropped")  # stale after an outage
                continue
            try:
                await self._send_entry(entry)
            except IdentityHeld as exc:
                # Stays queued (and later ones of this chat, to keep order) until
                # the key is accepted; a caller waiting for "sent" learns why.
                blocked_chats[entry["chat_id"]] = exc.user
                self._fail_waiter(entry["id"], IdentityHeld(exc.user, entry["id"]))
            except (TransportError, StorageError):
                raise
            except E2EEError as exc:
                # UnknownRecipient, SendFailed, NotAMember, or a payload that cannot be
                # built: the message is marked failed in history, never retried.
                await self._finish_entry(entry, "failed")
                if isinstance(exc, UnknownRecipient):
                    exc = UnknownRecipient(exc.user, entry["id"])
                elif isinstance(exc, SendFailed):
                    exc = SendFailed(str(exc), entry["id"])
                self._fail_waiter(entry["id"], exc)
        for (user, kind), batch in receipts.items():
            for start in range(0, len(batch), _RECEIPT_BATCH):
                chunk = batch[start : start + _RECEIPT_BATCH]
                try:
                    await self._send_receipts(user, kind, chunk)
                except (IdentityHeld, UnknownRecipient, SendFailed):
                    break
        await self._flush_delivered()

    async def _flush_delivered(self) -> None:
        """Send delivered receipts for incoming messages above the watermark.

        The watermark (a counter row) moves only after the relay accepted the
        receipts; a crash in between sends some receipts twice, which is harmless.
        """
        while not self._closing and self._connected.is_set():
            mark = await asyncio.to_thread(self._locked_counter, "rcpt:delivered")
            pending = await asyncio.to_thread(self._history.undelivered, mark, 2000)
            if not pending:
                return
            by_sender: dict[str, list[tuple[str, int]]] = {}
            for mid, sender, seq in pending:
                by_sender.setdefault(sender, []).append((mid, seq))
            stop = pending[-1][2]
            for sender, items in by_sender.items():
                for start in range(0, len(items), _RECEIPT_BATCH):
                    chunk = items[start : start + _RECEIPT_BATCH]
                    try:
                        await self._send_receipt_payload(
                            sender, ReceiptKind.DELIVERED, [m for m, _ in chunk]
                        )
                    except (IdentityHeld, UnknownRecipient, SendFailed):
                        stop = min(stop, chunk[0][1] - 1)
                        break
            if stop <= mark:
                return

            def advance(value: int = stop) -> None:
                with self._wlock:
                    self._commit(
                        [], {"rcpt:delivered": max(value, self._counter("rcpt:delivered"))}
                    )

            await asyncio.to_thread(advance)
            if len(pending) < 2000:
                return

    def _locked_counter(self, name: str) -> int:
        with self._wlock:
            return self._counter(name)

    async def _send_receipt_payload(
        self, user: str, kind: ReceiptKind, message_ids: Sequence[str]
    ) -> None:
        body = Payload(
            type=PayloadType.RECEIPT,
            message_id=os.urandom(16),
            sent_at_ms=self._now_ms(),
            target_ids=tuple(bytes.fromhex(m) for m in message_ids),
            receipt=kind,
        )
        await self._send_pairwise(body.message_id, [user], payload.encode(body))

    def _deferred_wake(self) -> None:
        self._wake_pending = False
        self._outbox_wake.set()

    def _fail_waiter(self, mid: str, exc: Exception) -> None:
        waiter = self._sent_waiters.get(mid)
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def _send_receipts(self, user: str, kind: str, entries: list[dict[str, Any]]) -> None:
        receipt = ReceiptKind.DELIVERED if kind == "delivered" else ReceiptKind.READ
        await self._send_receipt_payload(user, receipt, [e["ref"] for e in entries])

        def done() -> None:
            with self._wlock:
                rows = [
                    r
                    for e in entries
                    if (r := self._history.updated("outbox", e["id"], state="sent")) is not None
                ]
                self._commit(rows, {})

        await asyncio.to_thread(done)

    async def _send_entry(self, entry: dict[str, Any]) -> None:
        mid = bytes.fromhex(entry["id"])
        data: bytes = entry["payload"]
        chat_id: str = entry["chat_id"]
        if entry["mode"] == "group":
            recipients = await self._send_group(mid, chat_id[len("group:") :], data)
        else:
            recipients = await self._send_pairwise(mid, json.loads(entry["targets"]), data)
        await self._finish_entry(entry, "sent", recipients)
        waiter = self._sent_waiters.get(entry["id"])
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if entry["kind"] not in ("typing", "session_reset", "receipt"):
            self._emit(ReceiptUpdated(entry["id"], chat_id, "sent"))

    async def _finish_entry(
        self, entry: dict[str, Any], state: str, recipients: Sequence[tuple[str, int]] = ()
    ) -> None:
        def commit() -> None:
            with self._wlock:
                rows: list[Row] = []
                outbox = self._history.updated("outbox", entry["id"], state=state, payload=None)
                if outbox:
                    rows.append(outbox)
                message = self._history.current("messages", entry["id"])
                if message is not None:
                    message["status"] = History.status_at_least(message["status"], state)
                    rows.append(("messages", message))
                    now = self._now_ms()
                    for user, device in recipients:
                        rows.append(
                            History.row(
                                "receipts",
                                id=f"{entry['id']}:{user}:{device}",
                                message_id=entry["id"],
                                user_id=user,
                                device_id=device,
                                status="sent",
                                updated_at=now,
                            )
                        )
                self._commit(rows, {})

        await asyncio.to_thread(commit)

    async def _devices(self, user: str, *, refresh: bool = False) -> list[int]:
        """Device ids of ``user`` we hold sessions with, fetching bundles if needed."""
        devices = await asyncio.to_thread(self._engine.session_devices, user)
        if devices and not refresh:
            return devices
        try:
            bundles = await self._link.fetch_bundles(user)
        except NotFound as exc:
            raise UnknownRecipient(user) from exc
        if not bundles:
            raise UnknownRecipient(user)
        for data in bundles:
            try:
                bundle = PreKeyBundle.from_json(data)
            except InvalidBundle:
                continue
            if bundle.device_id in devices:
                continue
            try:
                await asyncio.to_thread(self._locked, self._engine.process_bundle, user, bundle)
            except UntrustedIdentity as exc:
                # The bundle names a new key: record it as untrusted (kept across
                # restarts) and drop the session made for the old key, so nothing
                # is encrypted to either until the user decides.
                address = Address(user, bundle.device_id)
                await asyncio.to_thread(self._record_untrusted, address, bundle.identity_key)
                self._hold(user, bundle.device_id)
                raise IdentityHeld(user) from exc
        return await asyncio.to_thread(self._engine.session_devices, user)

    def _record_untrusted(self, address: Address, key: bytes) -> None:
        with self._wlock:
            self._store.commit(
                Changes(
                    identities_put={
                        address: IdentityRecord(key, TrustLevel.UNTRUSTED, self._now_ms())
                    },
                    sessions_delete=frozenset({address}),
                )
            )

    def _hold(self, user: str, device: int) -> None:
        if user not in self._held:
            self._held.add(user)
            self._emit(IdentityChanged(user, device, False, True))

    async def _fix_devices(self, exc: MismatchedDevices) -> None:
        for user in exc.unknown_users:
            raise UnknownRecipient(user)

        def drop() -> None:
            stale = frozenset(Address(u, d) for u, devs in exc.stale_devices.items() for d in devs)
            if stale:
                self._store.commit(Changes(sessions_delete=stale))

        await asyncio.to_thread(drop)
        for user in exc.missing_devices:
            await self._devices(user, refresh=True)

    async def _send_pairwise(
        self, mid: bytes, users: Sequence[str], data: bytes
    ) -> list[tuple[str, int]]:
        for _attempt in range(_MAX_SEND_ATTEMPTS):
            entries: list[envelope.Entry] = []
            for user in users:
                if user in self._held:
                    raise IdentityHeld(user)
                for device in await self._devices(user):
                    address = Address(user, device)
                    try:
                        ct = await asyncio.to_thread(
                            self._locked, self._engine.encrypt, address, data
                        )
                    except UntrustedIdentity as exc:
                        self._hold(user, device)
                        raise IdentityHeld(user) from exc
                    entries.append(envelope.Entry(user, device, ct.kind, ct.body))
            recipients = [(e.user, e.device) for e in entries]
            try:
                await self._link.send(mid, recipients, envelope.build_pairwise(entries))
                return recipients
            except MismatchedDevices as exc:
                await self._fix_devices(exc)
            except RelayRejected as exc:
                if exc.retryable:
                    raise
                raise SendFailed(f"relay refused message: {exc.code}") from exc
        raise SendFailed("the recipients' device list kept changing")

    async def _send_group(self, mid: bytes, gid: str, data: bytes) -> list[tuple[str, int]]:
        members = await asyncio.to_thread(self._history.group_members, gid)
        others = sorted(u for u in members if u != self._me.name)
        if self._me.name not in members:
            raise NotAMember(gid)
        for _attempt in range(_MAX_SEND_ATTEMPTS):
            recipients: list[tuple[str, int]] = []
            for user in others:
                if user in self._held:
                    raise IdentityHeld(user)
                recipients.extend((user, d) for d in await self._devices(user))
            await self._distribute_key(gid, recipients)
            body = await asyncio.to_thread(self._locked, self._engine.group_encrypt, gid, data)
            try:
                await self._link.send(mid, recipients, envelope.build_group(gid, body))
                return recipients
            except MismatchedDevices as exc:
                await self._fix_devices(exc)
            except RelayRejected as exc:
                if exc.retryable:
                    raise
                raise SendFailed(f"relay refused message: {exc.code}") from exc
        raise SendFailed("the group's device list kept changing")

    async def _distribute_key(self, gid: str, recipients: Sequence[tuple[str, int]]) -> None:
        """Send our Sender Key (pairwise) to member devices that lack its current generation."""

        def missing() -> tuple[int, list[str]]:
            with self._wlock:
                generation = self._counter(f"keygen:{gid}") + 1
                users = sorted(
                    {u for u, d in recipients if self._counter(f"dist:{gid}:{u}.{d}") != generation}
                )
                return generation, users

        generation, users = await asyncio.to_thread(missing)
        if not users:
            return
        distribution = await asyncio.to_thread(self._locked, self._engine.group_distribution, gid)
        control = GroupControl(GroupAction.SENDER_KEY, distribution=distribution)
        body = Payload(
            type=PayloadType.GROUP,
            message_id=os.urandom(16),
            sent_at_ms=self._now_ms(),
            group_id=gid,
            group=control,
        )
        sent = await self._send_pairwise(body.message_id, users, payload.encode(body))

        def mark() -> None:
            with self._wlock:
                self._commit([], {f"dist:{gid}:{u}.{d}": generation for u, d in sent})

        await asyncio.to_thread(mark)


class TransportLink:
    """The :class:`RelayLink` over the real transport (:mod:`e2ee.transport`).

    HTTP calls go through one :class:`~e2ee.transport.http.RelayClient`; the live
    connection is a :class:`~e2ee.transport.ws.RelayConnection` per
    :meth:`connect`, with its own reconnecting turned off: the client's
    connection loop owns the backoff, so that it can flush the outbox and run
    key maintenance after every reconnect.
    """

    def __init__(self, signer: DeviceSigner, url: str) -> None:
        """Check the URL now (the HTTP client itself is made on first use).

        Raises:
            UsageError: not an http(s) URL with a host and no path.
        """
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError("the relay URL must be an http:// or https:// URL with a host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise UsageError("the relay URL must be the relay's root (no path or query)")
        self._signer = signer
        self._url = url
        self._http_client: RelayClient | None = None
        self._conn: RelayConnection | None = None

    @property
    def _http(self) -> RelayClient:
        # Made on first use: aiohttp costs about a third of a second to import, and
        # a program that only reads local history never needs it.
        if self._http_client is None:
            from e2ee.transport.http import RelayClient

            signer = self._signer
            self._http_client = RelayClient(self._url, signer.user, signer.device, signer)
        return self._http_client

    def __repr__(self) -> str:
        return f"TransportLink({self._url!r}, {self._signer.user!r}, {self._signer.device})"

    async def register(self) -> None:
        """``POST /v1/accounts`` (see :meth:`RelayLink.register`)."""
        await self._http.register()

    async def upload_keys(self, keys: Mapping[str, Any]) -> int:
        """``PUT /v1/keys``; returns the one-time prekey count."""
        return await self._http.upload_keys(keys)

    async def prekey_count(self) -> int:
        """``GET /v1/keys/count``."""
        return await self._http.key_count()

    async def fetch_bundles(self, user: str) -> list[Mapping[str, Any]]:
        """``GET /v1/keys/{user}``: one raw bundle object per device."""
        return list(await self._http.fetch_bundles(user))

    async def connect(self) -> None:
        """Open a fresh WebSocket and wait until it is up (see :meth:`RelayLink.connect`)."""
        from e2ee.transport.ws import RelayConnection

        await self.disconnect()
        conn = RelayConnection.from_client(self._http, reconnect=False)
        self._conn = conn
        await conn.start()
        await conn.wait_connected()

    async def deliveries(self) -> AsyncIterator[Delivery | QueueEmpty]:
        """Deliveries (and the end-of-backlog marker) of the open WebSocket.

        Raises the error that closed it.
        """
        from e2ee.transport.ws import ConnectionState

        conn = self._conn
        if conn is None:
            raise ConnectionLost("not connected")
        async for event in conn.events():
            if isinstance(event, Delivery | QueueEmpty):
                yield event
            elif isinstance(event, ConnectionState) and event.state == "closed":
                raise event.error or ConnectionLost("the relay connection closed")

    async def send(
        self, message_id: bytes, recipients: Sequence[tuple[str, int]], body: bytes
    ) -> None:
        """Send over the WebSocket and wait for the relay's ``send_result``.

        Without a live connection (a send-only client), ``PUT /v1/messages``.
        """
        conn = self._conn
        if conn is None:
            await self._http.send(message_id, recipients, body)
            return
        future = await conn.send(message_id, recipients, body)
        await future

    async def ack(self, ids: Sequence[bytes]) -> None:
        """Acknowledge over the WebSocket and wait until the relay committed it."""
        conn = self._conn
        if conn is None:
            raise ConnectionLost("not connected")
        future = await conn.ack(ids)
        await future

    async def upload_blob(self, path: Path, digest: bytes, progress: Progress | None) -> str:
        """Stream an encrypted file to ``POST /v1/blobs``; returns the blob id."""
        size = path.stat().st_size

        def report(done: int, total: int | None) -> None:
            if progress is not None:
                progress(done, total or size)

        info = await self._http.upload_blob(path, sha256=digest.hex(), size=size, progress=report)
        return str(info.id)

    async def download_blob(self, blob_id: str, path: Path, progress: Progress | None) -> None:
        """Stream a blob to ``path`` (resuming a partial file, verifying its address)."""

        def report(done: int, total: int | None) -> None:
            if progress is not None:
                progress(done, total or done)

        await self._http.download_blob(blob_id, path, progress=report)

    async def disconnect(self) -> None:
        """Close the WebSocket, if open."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def aclose(self) -> None:
        """Close the WebSocket and the HTTP session."""
        await self.disconnect()
        if self._http_client is not None:
            await self._http_client.close()


def _default_link_factory(signer: DeviceSigner, url: str) -> RelayLink:
    return TransportLink(signer, url)
