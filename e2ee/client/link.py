"""The relay link: what the client needs from the relay, and its real implementation.

Invariants:

* The client talks to the relay only through :class:`RelayLink`; every method
  raises :class:`~e2ee.errors.TransportError` subclasses on failure.
* :class:`TransportLink` imports aiohttp only on first use, so a program that
  only reads local history never pays for it.
* The live connection never reconnects on its own: the client's connection
  loop (:mod:`e2ee.client.connection`) owns the one reconnect policy.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from e2ee.errors import UsageError
from e2ee.media import Progress
from e2ee.transport.auth import DeviceSigner
from e2ee.transport.errors import ConnectionLost
from e2ee.transport.frames import Delivery, QueueEmpty

if TYPE_CHECKING:
    from e2ee.transport.http import RelayClient
    from e2ee.transport.ws import RelayConnection

__all__ = ["LinkFactory", "RelayLink", "TransportLink", "default_link_factory"]


class RelayLink(Protocol):
    """What the client needs from the relay transport (one device's view).

    The real implementation wraps :mod:`e2ee.transport`; tests use an in-process
    fake. Every method raises :class:`~e2ee.errors.TransportError` subclasses
    (``MismatchedDevices``, ``NotFound``, ``ConnectionLost``...) on failure.
    """

    async def register(self, invite: str | None = None) -> None:
        """Register this device's user and auth key (``POST /v1/accounts``), with an invite
        code when given (the transport handles the relay's registration mode)."""
        ...

    async def upload_keys(self, keys: Mapping[str, Any]) -> int:
        """Upload prekeys (``PUT /v1/keys``); returns the relay's one-time prekey count."""
        ...

    async def set_recovery(self, verifier: bytes) -> None:
        """Store the verifier of the account's recovery key (``PUT /v1/recovery``)."""
        ...

    async def recover(self, auth_key: bytes) -> None:
        """Re-claim the signer's username for the device (signer's device id, ``auth_key``)
        (``POST /v1/recovery``); the link's signer holds the recovery key's signing key.
        ``RecoveryRefused`` when the key is wrong, ``RateLimited`` after too many tries."""
        ...

    async def reset_devices(self, device_id: int, auth_key: bytes) -> None:
        """Make the device (``device_id``, ``auth_key``) the user's only device
        (``POST /v1/devices/reset``, signed by this device)."""
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

    async def register(self, invite: str | None = None) -> None:
        """``POST /v1/accounts`` (see :meth:`RelayLink.register`)."""
        await self._http.register(invite)

    async def upload_keys(self, keys: Mapping[str, Any]) -> int:
        """``PUT /v1/keys``; returns the one-time prekey count."""
        return await self._http.upload_keys(keys)

    async def set_recovery(self, verifier: bytes) -> None:
        """``PUT /v1/recovery`` (see :meth:`RelayLink.set_recovery`)."""
        await self._http.set_recovery(verifier)

    async def recover(self, auth_key: bytes) -> None:
        """``POST /v1/recovery`` (see :meth:`RelayLink.recover`)."""
        await self._http.recover(auth_key)

    async def reset_devices(self, device_id: int, auth_key: bytes) -> None:
        """``POST /v1/devices/reset`` (see :meth:`RelayLink.reset_devices`)."""
        await self._http.reset_devices(device_id, auth_key)

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


def default_link_factory(signer: DeviceSigner, url: str) -> RelayLink:
    """The :class:`TransportLink` for ``signer`` at ``url`` (the default link factory)."""
    return TransportLink(signer, url)
