"""The data directory: one account's database, held by one process at a time.

Invariants:

* A directory is open in at most one process: :func:`lock_dir` takes an
  exclusive ``flock`` on :data:`LOCK_FILE` before the database is opened, and
  the lock is released only when the files are closed (:func:`close_opened`).
* Opening either yields a complete :class:`Opened` (store, engine, history,
  account) or closes whatever it opened and releases the lock.
* Nothing here talks to the relay.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.secret

from e2ee.client_errors import StoreLocked
from e2ee.core import ProtocolEngine
from e2ee.core.fingerprint import compute_safety_number
from e2ee.errors import E2EEError, StorageError, StoreCorrupt, UsageError
from e2ee.history import History
from e2ee.store import AccountRecord, Changes
from e2ee.store.sealing import KdfLimits
from e2ee.store.sqlite import SQLiteProtocolStore

__all__ = [
    "DB_FILE",
    "LOCK_FILE",
    "META_ACCOUNT_CREATED",
    "META_AUTH_SEED",
    "META_READ_RECEIPTS",
    "META_RECOVERY_SET",
    "META_REGISTERED",
    "META_RELAY",
    "META_RELAYS",
    "META_RELAY_LAST",
    "META_STRICT",
    "META_USER",
    "Opened",
    "auth_seed",
    "close_opened",
    "device_auth_seed",
    "lock_dir",
    "open_dir",
    "read_relay_urls",
    "relay_meta",
    "seal_auth_seed",
    "starting_at",
]

#: The database file inside the data directory.
DB_FILE: Final = "blindpost.db"
#: Held (``flock``) while a process has the data directory open.
LOCK_FILE: Final = "blindpost.lock"
META_USER: Final = "sdk.username"
#: The relay's first URL (the only one before several were kept; still written for readers
#: of older versions).
META_RELAY: Final = "sdk.relay_url"
#: All of the relay's URLs, a JSON list (absent in data directories from before: then the
#: one ``sdk.relay_url`` is the list).
META_RELAYS: Final = "sdk.relay_urls"
#: The relay URL that worked last (recorded on close), where the next open starts.
META_RELAY_LAST: Final = "sdk.relay_last"
META_REGISTERED: Final = "sdk.registered"
META_ACCOUNT_CREATED: Final = "sdk.account_created"
META_READ_RECEIPTS: Final = "sdk.read_receipts"
META_STRICT: Final = "sdk.strict_trust"
#: A linked device's own random relay auth seed, sealed (:func:`seal_auth_seed`); absent on
#: an account's first device, whose seed derives from the identity key (:func:`auth_seed`).
META_AUTH_SEED: Final = "sdk.auth_seed_sealed"
#: "1" once the relay holds the verifier of a recovery key shown to the user.
META_RECOVERY_SET: Final = "sdk.recovery_set"


@dataclass(frozen=True, slots=True)
class Opened:
    """Everything opening a data directory produced (built in a worker thread)."""

    folder: Path
    store: SQLiteProtocolStore
    engine: ProtocolEngine
    history: History
    account: AccountRecord
    relay_urls: tuple[str, ...]
    relay_last: str | None
    registered: bool
    identity_key: bytes
    fingerprint: str
    lock_fd: int


def lock_dir(folder: Path) -> int:
    """Take the data directory's exclusive lock (one process per directory).

    Returns:
        The lock file's descriptor; closing it releases the lock.

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


def open_dir(
    folder: Path,
    passphrase: str | None,
    kdf_limits: KdfLimits | None,
    now_ms: Callable[[], int],
    init: Callable[[SQLiteProtocolStore], None] | None,
) -> Opened:
    """Lock the directory, open (and with ``init``, initialise) the store and history.

    Raises:
        StoreLocked: another process has the directory open.
        WrongPassphrase: the passphrase does not open the store.
        UsageError: the store holds no account.
        StorageError: the database cannot be opened.
    """
    lock_fd = lock_dir(folder)
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
        strict = store.get_meta(META_STRICT) == "1"
        engine = ProtocolEngine(store, now_ms=now_ms, trust_on_first_use=not strict)
        key = engine.identity_key
        own = compute_safety_number(key, account.name, key, account.name).digits[:30]
        return Opened(
            folder=folder,
            store=store,
            engine=engine,
            history=History.open(store),
            account=account,
            relay_urls=read_relay_urls(store),
            relay_last=store.get_meta(META_RELAY_LAST),
            registered=store.get_meta(META_REGISTERED) == "1",
            identity_key=key,
            fingerprint=own,
            lock_fd=lock_fd,
        )
    except BaseException:
        if store is not None:
            store.close()
        os.close(lock_fd)
        raise


def relay_meta(urls: Sequence[str]) -> dict[str, str]:
    """The settings rows that record the relay's URLs (first URL kept on its own too)."""
    return {META_RELAY: urls[0], META_RELAYS: json.dumps(list(urls))}


def read_relay_urls(store: SQLiteProtocolStore) -> tuple[str, ...]:
    """The relay's URLs as recorded; a data directory from before keeps its one URL."""
    raw = store.get_meta(META_RELAYS)
    if raw is not None:
        try:
            urls = json.loads(raw)
        except ValueError:
            urls = None
        if isinstance(urls, list) and urls and all(isinstance(u, str) for u in urls):
            return tuple(urls)
    single = store.get_meta(META_RELAY)
    return (single,) if single else ()


def starting_at(urls: Sequence[str], first: str | None) -> tuple[str, ...]:
    """``urls`` in their round-robin order, beginning at ``first`` (if it is one of them)."""
    if first is None or first not in urls:
        return tuple(urls)
    i = list(urls).index(first)
    return (*urls[i:], *urls[:i])


def close_opened(opened: Opened, relay_in_use: str | None = None) -> None:
    """Close the history and the store, then release the directory lock.

    ``relay_in_use``: the relay URL the client ended on; if the link moved away from the
    one it started at, the next open starts there (best effort: nothing is lost if this
    write fails; a run that stayed put writes nothing).
    """
    started = starting_at(opened.relay_urls, opened.relay_last)
    if relay_in_use is not None and started and relay_in_use != started[0]:
        with contextlib.suppress(E2EEError):
            opened.store.commit(Changes(meta_put={META_RELAY_LAST: relay_in_use}))
    opened.history.close()
    opened.store.close()
    os.close(opened.lock_fd)


def auth_seed(identity_key_pair: bytes) -> bytes:
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


def _auth_seed_box(identity_key_pair: bytes) -> nacl.secret.SecretBox:
    key: bytes = nacl.hash.blake2b(
        b"blindpost auth seed wrap v1",
        key=hashlib.sha256(identity_key_pair).digest(),
        person=b"bp-auth-wrap",
        digest_size=nacl.secret.SecretBox.KEY_SIZE,
        encoder=nacl.encoding.RawEncoder,
    )
    return nacl.secret.SecretBox(key)


def seal_auth_seed(identity_key_pair: bytes, seed: bytes) -> str:
    """A linked device's random auth seed, sealed for the settings table (base64).

    Linked devices share the identity key pair, so a seed derived from it alone
    (:func:`auth_seed`) would let any of them, removed or not, sign as another. A
    linked device therefore draws its seed at random and keeps it here, encrypted
    (XSalsa20-Poly1305) under a key derived from the identity key pair: reading it
    takes the same secret (and, with a passphrase, the same unlock) as the identity
    key itself, and the seed never leaves this device.
    """
    if len(seed) != 32:
        raise UsageError("an auth seed is 32 bytes")
    sealed = _auth_seed_box(identity_key_pair).encrypt(seed)
    return nacl.encoding.Base64Encoder.encode(bytes(sealed)).decode("ascii")


def device_auth_seed(store: SQLiteProtocolStore, account: AccountRecord) -> bytes:
    """This device's relay auth seed: the sealed random one of a linked device, else the
    one derived from the identity key pair (an account's first device, as before).

    Raises:
        StoreCorrupt: the sealed seed does not open.
        StorageError: the store cannot be read.
    """
    sealed = store.get_meta(META_AUTH_SEED)
    if not sealed:
        return auth_seed(account.identity_key_pair)
    try:
        raw = nacl.encoding.Base64Encoder.decode(sealed.encode("ascii"))
        seed: bytes = _auth_seed_box(account.identity_key_pair).decrypt(raw)
    except (ValueError, nacl.exceptions.CryptoError) as exc:
        raise StoreCorrupt("the sealed auth seed does not open") from exc
    return seed
