"""The relay link: what the client needs from the relay, and its real implementation.

Invariants:

* The client talks to the relay only through :class:`RelayLink`; every method
  raises :class:`~e2ee.errors.TransportError` subclasses on failure.
* :class:`TransportLink` imports aiohttp only on first use, so a program that
  only reads local history never pays for it.
* The live connection never reconnects on its own: the client's connection
  loop (:mod:`e2ee.client.connection`) owns the one reconnect policy.
* Several URLs are nodes of one relay: a call that meets a dead node repeats the same
  request (same message id, same bytes) at the next one (:mod:`e2ee.transport.failover`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from e2ee.errors import TransportError
from e2ee.media import Progress
from e2ee.transport.auth import DeviceSigner
from e2ee.transport.backoff import Backoff
from e2ee.transport.errors import ConnectionLost, RelayRejected, UsernameTaken
from e2ee.transport.failover import RelayNodes, node_failed
from e2ee.transport.frames import Delivery, QueueEmpty
from e2ee.transport.provisioning_requests import ProvisionInfo, ProvisionOpened
from e2ee.transport.requests import DeviceInfo, Request

T = TypeVar("T")

if TYPE_CHECKING:
    import aiohttp

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

    async def add_device(self, device_id: int, auth_key: bytes, name: bytes | None = None) -> None:
        """Add a device of this user (``POST /v1/devices``, signed by this device), with its
        name as the relay keeps it (opaque bytes);
        ``RelayRejected`` ``device_exists``/``too_many_devices``, ``RateLimited``."""
        ...

    async def list_devices(self) -> tuple[DeviceInfo, ...]:
        """This user's devices at the relay, sorted by id (``GET /v1/devices``)."""
        ...

    async def remove_device(self, device_id: int) -> None:
        """Remove a device of this user (``DELETE /v1/devices/{id}``); ``NotFound``."""
        ...

    async def open_provisioning(self, auth_key: bytes) -> ProvisionOpened:
        """Open a provisioning slot for a new device with ``auth_key``
        (``POST /v1/provisioning``, unsigned)."""
        ...

    async def read_provisioning(self, slot_id: str) -> ProvisionInfo:
        """Read a provisioning slot (``GET /v1/provisioning/{id}``); ``NotFound`` when gone."""
        ...

    async def fill_provisioning(self, slot_id: str, grant: bytes) -> None:
        """Put an encrypted grant into a slot (``PUT /v1/provisioning/{id}``), once."""
        ...

    async def take_provisioning(self, slot_id: str, token: bytes) -> bytes | None:
        """Poll a slot (``POST /v1/provisioning/{id}/take``): the grant once, else None;
        ``NotFound`` when the slot expired or was taken."""
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
        self,
        message_id: bytes,
        recipients: Sequence[tuple[str, int]],
        body: bytes,
        *,
        after: bytes | None = None,
    ) -> None:
        """Send one body to the listed devices; returns once the relay committed it.

        Works without :meth:`connect` too (a send-only client). With ``after`` (the id
        of our previous message), the relay stores it only if that one is stored and
        raises ``PredecessorMissing`` otherwise: the outbox's order guard when it has
        several sends in flight.
        """
        ...

    async def ack(self, ids: Sequence[bytes], *, settled: Sequence[bytes] = ()) -> None:
        """Acknowledge deliveries (the relay deletes them from our mailbox).

        ``settled``: ids of our own sends that the relay answered 200 and that we will never
        send again, so the relay may forget their retry records now
        (:mod:`e2ee.client.settling`); ``ids`` may then be empty. The client passes it only
        when it has some, so a link written before settling still takes plain acks.
        """
        ...

    async def execute(self, req: Request[T]) -> T:
        """Perform one pure request (:mod:`e2ee.transport.sealed_requests`) over HTTP at the
        next working node; for the requests without a method of their own here."""
        ...

    async def upload_blob(self, path: Path, digest: bytes, progress: Progress | None) -> str:
        """Upload an encrypted file; returns the blob id."""
        ...

    async def download_blob(self, blob_id: str, path: Path, progress: Progress | None) -> None:
        """Download a blob into ``path`` (verifying its content address)."""
        ...

    async def delete_blob(self, blob_id: str) -> None:
        """Delete a blob this user uploaded (``DELETE /v1/blobs/{id}``)."""
        ...

    async def disconnect(self) -> None:
        """Close the live connection (deliveries end)."""
        ...

    async def aclose(self) -> None:
        """Release everything (HTTP session included)."""
        ...


#: Builds the link for a device: (signer, the relay's URLs) -> link. The URLs are one
#: relay (one URL, maybe behind a balancer, or the URLs of its nodes), in the account's order.
LinkFactory = Callable[[DeviceSigner, Sequence[str]], RelayLink]


class TransportLink:
    """The :class:`RelayLink` over the real transport (:mod:`e2ee.transport`).

    HTTP calls go through one :class:`~e2ee.transport.http.RelayClient` per relay URL
    (sharing one session); the live connection is a
    :class:`~e2ee.transport.ws.RelayConnection` per :meth:`connect`, with its own
    reconnecting turned off: the client's connection loop owns the backoff, so that it
    can flush the outbox and run key maintenance after every reconnect.

    Several URLs are the nodes of one relay: every call goes to the node in use and
    moves to the next one when that node fails (:class:`~e2ee.transport.failover.RelayNodes`:
    sticky, round robin, the same request again, signed afresh). A send or ack whose socket
    died goes out at once over HTTP to the next node, with the same message id and body.

    Args:
        signer: the device's signer.
        urls: the relay's URL, or the URLs of its nodes.
        rounds: rounds over all URLs one HTTP call makes before raising (a single URL
            behind a balancer is tried twice, after a short jittered wait).
        backoff: the wait between rounds (:class:`~e2ee.transport.backoff.Backoff`).
    """

    def __init__(
        self,
        signer: DeviceSigner,
        urls: str | Sequence[str],
        *,
        rounds: int = 2,
        backoff: Backoff | None = None,
    ) -> None:
        """Check the URLs now (the HTTP clients themselves are made on first use).

        Raises:
            UsageError: not http(s) URLs with a host and no path, or none, or too many.
        """
        self._signer = signer
        self._nodes = RelayNodes(urls, rounds=rounds, backoff=backoff)
        self._clients: dict[str, RelayClient] = {}
        self._session: aiohttp.ClientSession | None = None
        self._conn: RelayConnection | None = None
        self._conn_url = ""

    def _http(self, url: str) -> RelayClient:
        # Made on first use: aiohttp costs about a third of a second to import, and
        # a program that only reads local history never needs it.
        client = self._clients.get(url)
        if client is None:
            import aiohttp

            from e2ee.transport.http import RelayClient

            if self._session is None or self._session.closed:
                self._session = aiohttp.ClientSession()
            signer = self._signer
            client = RelayClient(url, signer.user, signer.device, signer, session=self._session)
            self._clients[url] = client
        return client

    @property
    def nodes(self) -> RelayNodes:
        """The relay's URLs and the one in use."""
        return self._nodes

    def __repr__(self) -> str:
        return (
            f"TransportLink({list(self._nodes.urls)!r}, {self._signer.user!r}, "
            f"{self._signer.device})"
        )

    async def register(self, invite: str | None = None) -> None:
        """``POST /v1/accounts`` (see :meth:`RelayLink.register`).

        A node may commit the account and fail before answering; asked again, the relay
        says ``username_taken``. The name is ours exactly when this device's key signs
        for it, so that answer is checked with a signed request before it is raised.
        """
        try:
            await self._nodes.call(lambda url: self._http(url).register(invite))
        except UsernameTaken as taken:
            try:
                await self._nodes.call(lambda url: self._http(url).key_count())
            except RelayRejected:
                raise taken from None

    async def upload_keys(self, keys: Mapping[str, Any]) -> int:
        """``PUT /v1/keys``; returns the one-time prekey count."""
        return await self._nodes.call(lambda url: self._http(url).upload_keys(keys))

    async def set_recovery(self, verifier: bytes) -> None:
        """``PUT /v1/recovery`` (see :meth:`RelayLink.set_recovery`)."""
        await self._nodes.call(lambda url: self._http(url).set_recovery(verifier))

    async def recover(self, auth_key: bytes) -> None:
        """``POST /v1/recovery`` (see :meth:`RelayLink.recover`)."""
        await self._nodes.call(lambda url: self._http(url).recover(auth_key))

    async def reset_devices(self, device_id: int, auth_key: bytes) -> None:
        """``POST /v1/devices/reset`` (see :meth:`RelayLink.reset_devices`)."""
        await self._nodes.call(lambda url: self._http(url).reset_devices(device_id, auth_key))

    async def add_device(self, device_id: int, auth_key: bytes, name: bytes | None = None) -> None:
        """``POST /v1/devices`` (see :meth:`RelayLink.add_device`)."""
        await self._nodes.call(lambda url: self._http(url).add_device(device_id, auth_key, name))

    async def list_devices(self) -> tuple[DeviceInfo, ...]:
        """``GET /v1/devices`` (see :meth:`RelayLink.list_devices`)."""
        return await self._nodes.call(lambda url: self._http(url).list_devices())

    async def remove_device(self, device_id: int) -> None:
        """``DELETE /v1/devices/{id}`` (see :meth:`RelayLink.remove_device`)."""
        await self._nodes.call(lambda url: self._http(url).remove_device(device_id))

    async def open_provisioning(self, auth_key: bytes) -> ProvisionOpened:
        """``POST /v1/provisioning`` (see :meth:`RelayLink.open_provisioning`)."""
        return await self._nodes.call(lambda url: self._http(url).open_provisioning(auth_key))

    async def read_provisioning(self, slot_id: str) -> ProvisionInfo:
        """``GET /v1/provisioning/{id}`` (see :meth:`RelayLink.read_provisioning`)."""
        return await self._nodes.call(lambda url: self._http(url).read_provisioning(slot_id))

    async def fill_provisioning(self, slot_id: str, grant: bytes) -> None:
        """``PUT /v1/provisioning/{id}`` (see :meth:`RelayLink.fill_provisioning`)."""
        await self._nodes.call(lambda url: self._http(url).fill_provisioning(slot_id, grant))

    async def take_provisioning(self, slot_id: str, token: bytes) -> bytes | None:
        """``POST /v1/provisioning/{id}/take`` (see :meth:`RelayLink.take_provisioning`)."""
        return await self._nodes.call(lambda url: self._http(url).take_provisioning(slot_id, token))

    async def prekey_count(self) -> int:
        """``GET /v1/keys/count``."""
        return await self._nodes.call(lambda url: self._http(url).key_count())

    async def fetch_bundles(self, user: str) -> list[Mapping[str, Any]]:
        """``GET /v1/keys/{user}``: one raw bundle object per device."""
        return list(await self._nodes.call(lambda url: self._http(url).fetch_bundles(user)))

    async def connect(self) -> None:
        """Open a fresh WebSocket and wait until it is up (see :meth:`RelayLink.connect`).

        Every URL is tried once, from the one in use; the connection loop's backoff
        decides when to try again.
        """
        from e2ee.transport.ws import RelayConnection

        await self.disconnect()

        async def open_at(url: str) -> RelayConnection:
            conn = RelayConnection.from_client(self._http(url), reconnect=False)
            try:
                await conn.start()
                await conn.wait_connected()
            except BaseException:
                await conn.close()
                raise
            return conn

        async def attempt(url: str) -> tuple[str, RelayConnection]:
            return url, await open_at(url)

        self._conn_url, self._conn = await self._nodes.call(attempt, rounds=1)

    async def deliveries(self) -> AsyncIterator[Delivery | QueueEmpty]:
        """Deliveries (and the end-of-backlog marker) of the open WebSocket.

        Raises the error that closed it; a socket its node dropped moves this link to
        the next node.
        """
        from e2ee.transport.ws import ConnectionState

        conn, at = self._conn, self._conn_url
        if conn is None:
            raise ConnectionLost("not connected")
        async for event in conn.events():
            if isinstance(event, Delivery | QueueEmpty):
                yield event
            elif isinstance(event, ConnectionState) and event.state == "closed":
                error = event.error or ConnectionLost("the relay connection closed")
                if node_failed(error) and conn is self._conn:  # not our own disconnect()
                    self._nodes.failed(at)
                raise error

    async def send(
        self,
        message_id: bytes,
        recipients: Sequence[tuple[str, int]],
        body: bytes,
        *,
        after: bytes | None = None,
    ) -> None:
        """Send over the WebSocket and wait for the relay's ``send_result``.

        Without a live connection (a send-only client), or when its node fails before
        answering, ``PUT /v1/messages`` at the next node: the same id, body and ``after``,
        which the relay stores once.
        """
        conn = self._conn
        if conn is not None and await self._on_socket(
            conn.send(message_id, recipients, body, after=after)
        ):
            return

        async def put(url: str) -> None:
            await self._http(url).send(message_id, recipients, body, after=after)

        await self._nodes.call(put)

    async def execute(self, req: Request[T]) -> T:
        """See :meth:`RelayLink.execute`."""
        return await self._nodes.call(lambda url: self._http(url).execute(req))

    async def ack(self, ids: Sequence[bytes], *, settled: Sequence[bytes] = ()) -> None:
        """Acknowledge over the WebSocket and wait until the relay committed it.

        When the socket's node fails first, ``POST /v1/messages/ack`` at the next node
        (acks are idempotent: a removed id stays removed; settling a forgotten id does
        nothing). Without a live connection, deliveries are not acknowledged
        (``ConnectionLost``), but an ack that only settles goes over HTTP: a send-only
        client settles its sends too.
        """
        conn = self._conn
        if conn is None and ids:
            raise ConnectionLost("not connected")
        if conn is not None and await self._on_socket(conn.ack(ids, settled=settled)):
            return

        async def post(url: str) -> None:
            await self._http(url).ack(ids, settled)

        await self._nodes.call(post)

    async def _on_socket(self, queued: Awaitable[Awaitable[object]]) -> bool:
        """Await a frame queued on the live socket, then the relay's answer to it.

        Returns:
            True when answered; False when the socket's node failed first (it is marked
            failed; the caller goes over HTTP to the next node).

        Raises:
            TransportError: any other failure.
        """
        at = self._conn_url
        try:
            await (await queued)
        except TransportError as exc:
            if not node_failed(exc):
                raise
            self._nodes.failed(at)
            return False
        return True

    async def upload_blob(self, path: Path, digest: bytes, progress: Progress | None) -> str:
        """Stream an encrypted file to ``POST /v1/blobs``; returns the blob id.

        After a node failure the whole file goes again to the next node (blobs are
        content-addressed: a second upload of the same bytes is the same blob).
        """
        size = path.stat().st_size

        def report(done: int, total: int | None) -> None:
            if progress is not None:
                progress(done, total or size)

        async def upload(url: str) -> str:
            info = await self._http(url).upload_blob(
                path, sha256=digest.hex(), size=size, progress=report
            )
            return str(info.id)

        return await self._nodes.call(upload)

    async def download_blob(self, blob_id: str, path: Path, progress: Progress | None) -> None:
        """Stream a blob to ``path`` (resuming a partial file, verifying its address).

        After a node failure the next node continues from the bytes already written.
        """

        def report(done: int, total: int | None) -> None:
            if progress is not None:
                progress(done, total or done)

        async def download(url: str) -> None:
            await self._http(url).download_blob(blob_id, path, progress=report)

        await self._nodes.call(download)

    async def delete_blob(self, blob_id: str) -> None:
        """``DELETE /v1/blobs/{id}`` (see :meth:`RelayLink.delete_blob`)."""
        await self._nodes.call(lambda url: self._http(url).delete_blob(blob_id))

    async def disconnect(self) -> None:
        """Close the WebSocket, if open."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def aclose(self) -> None:
        """Close the WebSocket and the HTTP session."""
        await self.disconnect()
        self._clients.clear()
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def default_link_factory(signer: DeviceSigner, urls: Sequence[str]) -> RelayLink:
    """The :class:`TransportLink` for ``signer`` at ``urls`` (the default link factory)."""
    return TransportLink(signer, urls)
