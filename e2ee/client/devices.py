"""Linked devices: the link grant, the new device's keys, and ``client.devices``.

Invariants:

* A linked device shares the account's identity key pair (safety numbers do not change)
  and has its own registration id, signed prekey, one-time prekeys and a random relay
  auth seed that never leaves it (:func:`e2ee.client.datadir.seal_auth_seed`): a removed
  device knows the identity key, but cannot sign as any other device.
* The relay adds a device only on a request signed by an existing device of the account
  (``POST /v1/devices``); the approver registers the new device's public auth key, then
  hands it a :class:`LinkGrant`. The new device refuses a grant that names another auth
  key, so a grant cannot be redirected to a device its approver did not register.
* A :class:`LinkGrant` holds the identity key pair: its repr hides it, and its byte
  encoding (:meth:`LinkGrant.to_bytes`) travels only encrypted (docs/protocol.md,
  "Linking a device").
* Device ids are never handed out twice by one approver: a new id is above every id the
  relay lists and every id this device issued before (a removed id would otherwise meet
  the sessions other users still hold with the removed device).
* Creating the new device's data directory writes the account in one commit; nothing
  reaches the relay until :func:`create_linked_dir` returned.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from blindpost_wire.names import MAX_DEVICE_ID
from e2ee.client.context import ClientContext
from e2ee.client.datadir import (
    DB_FILE,
    META_ACCOUNT_CREATED,
    META_AUTH_SEED,
    META_READ_RECEIPTS,
    META_STRICT,
    META_USER,
    Opened,
    open_dir,
    read_relay_urls,
    relay_meta,
    seal_auth_seed,
)
from e2ee.core import ProtocolEngine
from e2ee.errors import (
    InvalidLinkGrant,
    NotRegistered,
    StorageError,
    StoreLocked,
    UsageError,
)
from e2ee.store import Changes
from e2ee.store.sealing import KdfLimits
from e2ee.store.sqlite import SQLiteProtocolStore
from e2ee.transport.auth import DeviceSigner, check_device_id, check_username
from e2ee.transport.failover import check_relay_urls

__all__ = [
    "GRANT_MAGIC",
    "GRANT_VERSION",
    "MAX_DEVICE_NAME",
    "DeviceRecord",
    "Devices",
    "LinkGrant",
    "NewDeviceKeys",
    "create_linked_dir",
]

#: The first bytes of an encoded grant.
GRANT_MAGIC: Final = b"BPGRANT"
#: The grant encoding's version (the byte after the magic).
GRANT_VERSION: Final = 1
#: The longest device name, in characters.
MAX_DEVICE_NAME: Final = 64
#: The highest device id this device handed out (so none is handed out twice).
META_DEVICE_ISSUED: Final = "sdk.device_issued"
# An encoded grant is small (an identity key pair, a name, <= 16 URLs); anything larger is
# not one.
_MAX_GRANT_BYTES: Final = 8192


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise InvalidLinkGrant(f"grant field {what!r} must be base64")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise InvalidLinkGrant(f"grant field {what!r} is not base64") from None
    if size is not None and len(raw) != size:
        raise InvalidLinkGrant(f"grant field {what!r} must be {size} bytes")
    return raw


_T = TypeVar("_T")


def _field(doc: dict[str, Any], name: str, kind: type[_T]) -> _T:
    value = doc.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidLinkGrant(f"grant field {name!r} must be a {kind.__name__}")
    return value


def check_device_name(name: str) -> str:
    """A device name: at most :data:`MAX_DEVICE_NAME` printable characters.

    Raises:
        UsageError: too long or not printable.
    """
    if len(name) > MAX_DEVICE_NAME or not name.isprintable():
        raise UsageError(f"a device name is at most {MAX_DEVICE_NAME} printable characters")
    return name


@dataclass(frozen=True, slots=True)
class LinkGrant:
    """What an existing device hands a new device of the same account.

    Built by :meth:`Devices.add` after the relay registered ``auth_key`` as device
    ``device_id``; consumed by :meth:`e2ee.client.Client.link_device`.
    """

    username: str
    device_id: int
    identity_key_pair: bytes = field(repr=False)
    relay_urls: tuple[str, ...]
    auth_key: bytes
    approver_device: int
    device_name: str = ""

    def __repr__(self) -> str:  # the identity key pair never reaches a repr
        return (
            f"LinkGrant(username={self.username!r}, device_id={self.device_id}, "
            f"approver_device={self.approver_device}, relay_urls={self.relay_urls!r}, "
            f"device_name={self.device_name!r}, identity_key_pair=<secret>)"
        )

    __str__ = __repr__

    def to_bytes(self) -> bytes:
        """The grant's encoding: :data:`GRANT_MAGIC`, the version byte, then UTF-8 JSON
        (docs/wire-format.md, "Link grant"). It holds the identity key pair: send it
        only encrypted."""
        doc = {
            "username": self.username,
            "device_id": self.device_id,
            "identity_key_pair": _b64(self.identity_key_pair),
            "relay_urls": list(self.relay_urls),
            "auth_key": _b64(self.auth_key),
            "approver_device": self.approver_device,
            "device_name": self.device_name,
        }
        return GRANT_MAGIC + bytes([GRANT_VERSION]) + json.dumps(doc).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> LinkGrant:
        """Decode and check a grant made by :meth:`to_bytes`.

        Raises:
            InvalidLinkGrant: not a grant, another version, or a field out of range.
        """
        head = len(GRANT_MAGIC)
        if len(data) > _MAX_GRANT_BYTES or not data.startswith(GRANT_MAGIC):
            raise InvalidLinkGrant("not a link grant")
        if len(data) <= head or data[head] != GRANT_VERSION:
            raise InvalidLinkGrant("unsupported link grant version")
        try:
            doc: Any = json.loads(data[head + 1 :].decode("utf-8"))
        except ValueError:
            raise InvalidLinkGrant("link grant is not valid JSON") from None
        if not isinstance(doc, dict):
            raise InvalidLinkGrant("link grant is not an object")
        try:
            username = check_username(_field(doc, "username", str))
            device_id = check_device_id(_field(doc, "device_id", int))
            approver = check_device_id(_field(doc, "approver_device", int))
            urls = doc.get("relay_urls")
            if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
                raise InvalidLinkGrant("grant field 'relay_urls' must be a list of URLs")
            relay_urls = check_relay_urls(urls)
            name = doc.get("device_name", "")
            if not isinstance(name, str):
                raise InvalidLinkGrant("grant field 'device_name' must be a string")
            check_device_name(name)
        except UsageError as exc:
            raise InvalidLinkGrant(f"link grant field out of range: {exc}") from None
        ikp = _unb64(doc.get("identity_key_pair"), "identity_key_pair")
        if not 1 <= len(ikp) <= 512:
            raise InvalidLinkGrant("grant field 'identity_key_pair' has a bad length")
        if device_id == approver:
            raise InvalidLinkGrant("a grant names a new device, not its approver")
        return cls(
            username=username,
            device_id=device_id,
            identity_key_pair=ikp,
            relay_urls=relay_urls,
            auth_key=_unb64(doc.get("auth_key"), "auth_key", 32),
            approver_device=approver,
            device_name=name,
        )


@dataclass(frozen=True, slots=True)
class NewDeviceKeys:
    """The secrets a new device draws before it is linked: its relay auth seed (kept, sealed,
    in its data directory) and an X25519 key for the provisioning channel (used once).

    Make one with :meth:`generate`; give the approver :attr:`auth_key` (the provisioning
    channel does that), then pass the grant and these keys to
    :meth:`e2ee.client.Client.link_device`.
    """

    auth_seed: bytes = field(repr=False)
    box_secret: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"NewDeviceKeys(auth_key={_b64(self.auth_key)!r}, <secret>)"

    __str__ = __repr__

    @classmethod
    def generate(cls, random_bytes: Callable[[int], bytes] = os.urandom) -> NewDeviceKeys:
        """Fresh keys from ``random_bytes`` (32 bytes each)."""
        return cls(auth_seed=random_bytes(32), box_secret=random_bytes(32))

    @property
    def auth_key(self) -> bytes:
        """The Ed25519 public auth key the relay will know this device by."""
        return DeviceSigner.from_seed(self.auth_seed, "linking", 1).public_key


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """One device of our account as the relay lists it (``client.devices.list()``)."""

    device_id: int
    created_at: int
    has_keys: bool
    this_device: bool


class Devices:
    """The devices of our account (``client.devices``): list, add (link), remove.

    Use the client's :attr:`~e2ee.client.Client.devices`; the client checks it is open.
    """

    def __init__(self, ctx: ClientContext) -> None:
        self._ctx = ctx

    def __repr__(self) -> str:
        return f"Devices(user={self._ctx.me.name!r}, device={self._ctx.me.device_id})"

    async def list(self) -> list[DeviceRecord]:
        """Our account's devices at the relay, sorted by id.

        Raises:
            TransportError: the relay cannot be reached or refused.
        """
        found = await self._ctx.link.list_devices()
        me = self._ctx.me.device_id
        return [
            DeviceRecord(d.device_id, d.created_at, d.has_keys, d.device_id == me) for d in found
        ]

    async def add(self, auth_key: bytes, *, name: str = "") -> LinkGrant:
        """Register a new device of our account at the relay (signed by this device) and
        return the grant that lets it set itself up (:meth:`Client.link_device`).

        Send the grant only encrypted to the new device (the provisioning channel does).

        Args:
            auth_key: the new device's 32-byte Ed25519 public auth key
                (:attr:`NewDeviceKeys.auth_key`).
            name: a name for the new device (at most :data:`MAX_DEVICE_NAME` characters).

        Returns:
            The grant, naming the new device's id.

        Raises:
            UsageError: a bad key or name, or no device id left.
            NotRegistered: this account is not registered.
            RelayRejected: ``too_many_devices`` (the relay's limit).
            RateLimited: devices were added too often.
            TransportError: the relay cannot be reached or refused.
        """
        if len(auth_key) != 32:
            raise UsageError("an auth key is 32 bytes")
        check_device_name(name)
        ctx = self._ctx
        await asyncio.to_thread(ctx.load_state)
        if not ctx.registered:
            raise NotRegistered("register the account with a relay first")
        listed = [d.device_id for d in await ctx.link.list_devices()]
        issued = await asyncio.to_thread(ctx.store.get_meta, META_DEVICE_ISSUED)
        device_id = next_device_id(listed, int(issued or "0"), ctx.me.device_id)
        # Recorded first: an id given to the relay is never offered again, even if the
        # request's answer is lost.
        await asyncio.to_thread(
            ctx.store.commit, Changes(meta_put={META_DEVICE_ISSUED: str(device_id)})
        )
        await ctx.link.add_device(device_id, auth_key)
        account = await asyncio.to_thread(ctx.store.load_account)
        if account is None:
            raise StorageError("the account is gone from the store")
        urls = await asyncio.to_thread(read_relay_urls, ctx.store)
        return LinkGrant(
            username=ctx.me.name,
            device_id=device_id,
            identity_key_pair=account.identity_key_pair,
            relay_urls=urls,
            auth_key=auth_key,
            approver_device=ctx.me.device_id,
            device_name=name,
        )

    async def remove(self, device_id: int) -> None:
        """Remove a device of our account (this one included) at the relay.

        The relay drops its auth key, mailbox and prekeys and closes its connection; our
        contacts' next sends leave it out (the relay's device list no longer has it), so
        it reads nothing sent afterwards.

        Raises:
            UsageError: a bad device id.
            NotFound: no such device.
            TransportError: the relay cannot be reached or refused.
        """
        check_device_id(device_id)
        await self._ctx.link.remove_device(device_id)


def next_device_id(listed: Sequence[int], issued: int, me: int) -> int:
    """The id for a new device: above every listed, issued and our own id; if that runs past
    the last id, the lowest id never listed (ids of removed devices come back only then).

    Raises:
        UsageError: every id is in use.
    """
    top = max([*listed, issued, me])
    if top < MAX_DEVICE_ID:
        return top + 1
    used = {*listed, me}
    for candidate in range(1, MAX_DEVICE_ID + 1):
        if candidate not in used:
            return candidate
    raise UsageError("every device id of this account is in use")


def create_linked_dir(
    folder: Path,
    grant: LinkGrant,
    keys: NewDeviceKeys,
    *,
    passphrase: str | None,
    now_ms: Callable[[], int],
    kdf_limits: KdfLimits | None,
) -> Opened:
    """Create a data directory for a linked device from its grant (blocking; in a thread).

    The account keeps the grant's identity key pair; this device gets its own
    registration id, signed prekey and one-time prekeys, and ``keys.auth_seed`` sealed.
    The relay account exists already (``sdk.account_created``), so registering only
    uploads the prekeys.

    Raises:
        InvalidLinkGrant: the grant names another auth key, or its identity key pair does
            not parse.
        UsageError: the directory already holds an account.
        StoreLocked: another process has the directory open.
        StorageError: the directory or database cannot be created.
    """
    if grant.auth_key != keys.auth_key:
        raise InvalidLinkGrant("the grant names another device's auth key")
    if (folder / DB_FILE).exists():
        raise UsageError(f"{folder} already holds an account")
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StorageError(f"cannot create {folder}: {exc.strerror}") from exc

    def init(store: SQLiteProtocolStore) -> None:
        engine = ProtocolEngine(store, now_ms=now_ms)
        try:
            engine.create_account(
                grant.username, grant.device_id, identity_key_pair=grant.identity_key_pair
            )
        except UsageError as exc:
            raise InvalidLinkGrant(f"the grant's account does not load: {exc}") from None
        store.commit(
            Changes(
                meta_put={
                    META_USER: grant.username,
                    **relay_meta(grant.relay_urls),
                    META_STRICT: "0",
                    META_READ_RECEIPTS: "1",
                    META_ACCOUNT_CREATED: "1",
                    META_AUTH_SEED: seal_auth_seed(grant.identity_key_pair, keys.auth_seed),
                }
            )
        )

    try:
        return open_dir(folder, passphrase, kdf_limits, now_ms, init)
    except StoreLocked:
        raise  # another process's directory: leave it alone
    except BaseException:
        # The account is written in two commits (the engine's, then the settings): a
        # directory left half-made must not open later with the identity-derived seed.
        for suffix in ("", "-wal", "-shm", "-journal", "-keyring"):
            with contextlib.suppress(OSError):
                (folder / (DB_FILE + suffix)).unlink()
        raise
