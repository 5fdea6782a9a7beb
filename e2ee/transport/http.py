"""The aiohttp adapter for the relay's HTTP API: :class:`RelayClient`.

Invariants:

* Thin: every call builds a pure :class:`~e2ee.transport.requests.Request`, signs it at
  the moment it is sent (fresh timestamp and nonce per attempt, never reused), performs
  it and lets :meth:`Request.handle` produce the typed result or error.
* The signed target is the raw path+query of the URL actually sent (yarl ``encoded=True``
  stops aiohttp from re-quoting it).
* Only typed errors escape: :class:`~e2ee.transport.errors.ConnectionFailed` /
  :class:`~e2ee.transport.errors.RelayTimeout` for the network,
  :class:`~e2ee.transport.errors.RelayRejected` subclasses for error statuses,
  :class:`~e2ee.transport.errors.MalformedResponse` for off-spec answers,
  :class:`~e2ee.errors.UsageError` for bad arguments and
  :class:`~e2ee.errors.StorageError` for local file failures during blob transfers.
  Messages hold method, target, status and sizes only: no body, key, signature or nonce.
* Blobs are streamed in both directions: at most ``chunk_size`` (upload) or
  ``write_buffer`` (download) bytes are held in memory, and every blocking file
  operation runs in a worker thread (``asyncio.to_thread``), never on the event loop.
* No retries here: a failed call raises; the SDK decides (sends are idempotent by id).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, TypeVar

import aiohttp
from yarl import URL

from blindpost_wire.registration import solve_pow
from e2ee.errors import StorageError, UsageError
from e2ee.transport import provisioning_requests as prq
from e2ee.transport import requests as rq
from e2ee.transport.auth import DeviceSigner, check_device_id, check_username
from e2ee.transport.errors import (
    BlobDigestMismatch,
    ConnectionFailed,
    InviteRequired,
    MalformedResponse,
    NotFound,
    RangeNotSatisfiable,
    RegistrationClosed,
    RelayTimeout,
)
from e2ee.transport.frames import Delivery
from e2ee.transport.requests import (
    BlobInfo,
    DeviceInfo,
    MessagePage,
    Registered,
    Request,
    Response,
    SendReceipt,
    origin_of,
)

__all__ = ["ProgressCallback", "RelayClient", "hash_file", "origin_of"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``progress(done_bytes, total_bytes_or_None)``, called after each chunk.
ProgressCallback = Callable[[int, int | None], None]

DEFAULT_CHUNK = 256 * 1024
DEFAULT_WRITE_BUFFER = 1024 * 1024


def hash_file(path: str | os.PathLike[str], chunk_size: int = DEFAULT_CHUNK) -> tuple[str, int]:
    """SHA-256 and size of a file, read in chunks (blocking: call it in a thread).

    Args:
        path: the file.
        chunk_size: read size.

    Returns:
        (lowercase hex digest, size in bytes).

    Raises:
        OSError: the file cannot be read.
    """
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            hasher.update(chunk)
            size += len(chunk)
    return hasher.hexdigest(), size


def _hash_prefix(path: Path, limit: int, hasher: Any, chunk_size: int) -> None:
    """Feed the first ``limit`` bytes of ``path`` into ``hasher`` (blocking)."""
    left = limit
    with open(path, "rb") as fh:
        while left > 0:
            chunk = fh.read(min(chunk_size, left))
            if not chunk:
                raise OSError("partial download shrank while being hashed")
            hasher.update(chunk)
            left -= len(chunk)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@contextlib.contextmanager
def _network_errors(method: str, target: str) -> Iterator[None]:
    """Translate aiohttp and timeout failures into transport errors (cause chained)."""
    try:
        yield
    except TimeoutError as exc:  # includes aiohttp's ServerTimeoutError
        raise RelayTimeout(f"{method} {target}: timed out") from exc
    except aiohttp.ClientError as exc:
        raise ConnectionFailed(f"{method} {target}: {type(exc).__name__}") from exc


@contextlib.contextmanager
def _file_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (aiohttp.ClientError, TimeoutError):
        raise  # both can be OSError subclasses, but they are the network's, not the disk's
    except OSError as exc:
        raise StorageError(f"{what}: {exc.strerror or type(exc).__name__}") from exc


class RelayClient:
    """Async client for the relay's HTTP API, signing every request as one device.

    Use as ``async with RelayClient(...) as client:`` or call :meth:`close`. A session
    passed in is borrowed (not closed); otherwise one is created on first use.

    Args:
        base_url: relay root URL, e.g. ``https://relay.example``.
        username: the device's username (must match ``signer.user``).
        device_id: the device id (must match ``signer.device``).
        signer: the device's :class:`~e2ee.transport.auth.DeviceSigner`.
        session: an aiohttp session to borrow.
        timeout: whole-request limit in seconds for API calls (not for blob transfers).
        connect_timeout: TCP/TLS connect limit in seconds.
        transfer_timeout: blob transfers fail if no byte moves for this many seconds.
        chunk_size: upload read size and download chunk size.
        clock_ms: returns unix ms for request timestamps (``time.time`` by default).

    Raises:
        UsageError: bad URL, or username/device id that differ from the signer's.
    """

    def __init__(
        self,
        base_url: str,
        username: str,
        device_id: int,
        signer: DeviceSigner,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        transfer_timeout: float = 60.0,
        chunk_size: int = DEFAULT_CHUNK,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._origin = origin_of(base_url)
        check_username(username)
        check_device_id(device_id)
        if not isinstance(signer, DeviceSigner):
            raise UsageError("signer must be a DeviceSigner")
        if (signer.user, signer.device) != (username, device_id):
            raise UsageError("the signer is bound to a different username or device id")
        if chunk_size < 1024:
            raise UsageError("chunk_size must be at least 1024 bytes")
        self.username = username
        self.device_id = device_id
        self._signer = signer
        self._session = session
        self._owns_session = session is None
        self._api_timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self._transfer_timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=transfer_timeout
        )
        self._chunk = chunk_size
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)

    def __repr__(self) -> str:
        return f"RelayClient({str(self._origin)!r}, {self.username!r}, {self.device_id})"

    @property
    def base_url(self) -> str:
        """The relay origin this client talks to."""
        return str(self._origin)

    @property
    def signer(self) -> DeviceSigner:
        """The signer (for opening a :class:`~e2ee.transport.ws.RelayConnection`)."""
        return self._signer

    async def __aenter__(self) -> RelayClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client created it (idempotent)."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        """Return the session, creating it on first use (must run inside the loop)."""
        if self._session is None or self._session.closed:
            if not self._owns_session:
                raise UsageError("the borrowed aiohttp session is closed")
            self._session = aiohttp.ClientSession()
        return self._session

    def url_for(self, target: str) -> URL:
        """The absolute URL of a request target, kept byte-for-byte (no re-quoting)."""
        return URL(str(self._origin) + target, encoded=True)

    def _headers(self, req: Request[Any]) -> dict[str, str]:
        return req.auth_headers(self._signer, now_ms=self._clock_ms())

    async def execute(self, req: Request[T]) -> T:
        """Perform one pure request (body in memory) and return its typed result.

        Args:
            req: from :mod:`e2ee.transport.requests`.

        Returns:
            ``req``'s result.

        Raises:
            ConnectionFailed: network failure (RelayTimeout for timeouts).
            RelayRejected: an error status (a subclass for known ones).
            MalformedResponse: an off-spec success body.
        """
        url = self.url_for(req.target)
        with _network_errors(req.method, req.target):
            async with self.session().request(
                req.method,
                url,
                data=req.body or None,
                headers=self._headers(req),
                timeout=self._api_timeout,
                allow_redirects=False,
            ) as resp:
                body = await resp.read()
                response = Response(resp.status, _lower(resp.headers), body)
        log.debug("%s %s -> %d (%d bytes)", req.method, req.target, response.status, len(body))
        return req.handle(response)

    # -- health, accounts, devices --------------------------------------------------------

    async def healthz(self) -> bool:
        """``GET /healthz``.

        Returns:
            True when the relay reports ok.

        Raises:
            ConnectionFailed, RelayRejected, MalformedResponse: as :meth:`execute`.
        """
        return await self.execute(rq.healthz())

    async def registration_info(self) -> rq.RegistrationInfo:
        """``GET /v1/registration``; a relay without the endpoint (404) counts as ``open``.

        Raises:
            ConnectionFailed, RelayRejected, MalformedResponse: as :meth:`execute`.
        """
        try:
            return await self.execute(rq.registration_info())
        except NotFound:
            return rq.RegistrationInfo("open")

    async def register(self, invite: str | None = None) -> Registered:
        """Register ``username`` with this device as its first device (auth key = signer's).

        Asks the relay for its registration mode first. In ``pow`` mode (without an invite)
        it solves the relay's proof of work in a worker thread (about a second of one core at
        the default difficulty); an invite is sent whenever one is given.

        Args:
            invite: an invite code from the relay's operator (required in ``invite`` mode).

        Returns:
            The registered (username, device id).

        Raises:
            RegistrationClosed: the relay registers nobody. InviteRequired: invite-only and
            no code given. InviteInvalid: the code is unknown, used or expired.
            RegistrationRefused: the proof of work was refused. UsernameTaken: the name
            exists. RateLimited, InvalidRequest, AuthFailed, ConnectionFailed: as
            :meth:`execute`.
        """
        info = await self.registration_info()
        if info.mode == "closed":
            raise RegistrationClosed(403, "registration_closed", "this relay is closed")
        if info.mode == "invite" and invite is None:
            raise InviteRequired(403, "invite_required", "this relay is invite-only")
        work = None
        if info.mode == "pow" and invite is None and info.challenge is not None:
            challenge = info.challenge
            nonce = await asyncio.to_thread(solve_pow, challenge, self.username, info.difficulty)
            work = (challenge, nonce)
        return await self.execute(
            rq.register(
                self.username, self.device_id, self._signer.public_key, pow=work, invite=invite
            )
        )

    async def add_device(
        self, device_id: int, auth_key: bytes, name: bytes | None = None
    ) -> Registered:
        """Add another device to this user (signed by this device).

        Args:
            device_id: the new device's id.
            auth_key: the new device's 32-byte Ed25519 public key.
            name: its name as the relay keeps it (opaque bytes).

        Returns:
            The new (username, device id).

        Raises:
            UsageError: bad arguments. RelayRejected: 409 ``device_exists`` /
            ``too_many_devices``. ConnectionFailed: network.
        """
        return await self.execute(rq.add_device(device_id, auth_key, name))

    async def reset_devices(self, device_id: int, auth_key: bytes) -> Registered:
        """Make a new device this user's only device (signed by this device).

        Raises:
            UsageError: bad arguments. RateLimited, AuthFailed, ConnectionFailed: as
            :meth:`execute`.
        """
        return await self.execute(rq.reset_devices(device_id, auth_key))

    async def set_recovery(self, verifier: bytes) -> bool:
        """Store the verifier of this account's recovery key (replacing an earlier one).

        Raises:
            UsageError: not 32 bytes. AuthFailed, ConnectionFailed: as :meth:`execute`.
        """
        return await self.execute(rq.set_recovery(verifier))

    async def recover(self, auth_key: bytes) -> Registered:
        """Re-claim this client's username for the device (``device_id``, ``auth_key``); this
        client's signer must hold the recovery key's signing key.

        Raises:
            RecoveryRefused: wrong key, none set, or no such account. RateLimited: too many
            attempts. AuthFailed, ConnectionFailed: as :meth:`execute`.
        """
        return await self.execute(rq.recover(self.device_id, auth_key))

    async def list_devices(self) -> tuple[DeviceInfo, ...]:
        """List this user's devices, sorted by id.

        Returns:
            The devices.

        Raises:
            AuthFailed, ConnectionFailed, MalformedResponse: as :meth:`execute`.
        """
        return await self.execute(rq.list_devices())

    async def remove_device(self, device_id: int) -> bool:
        """Remove a device of this user (its mailbox, keys and auth key are deleted).

        Args:
            device_id: the device (this one included).

        Returns:
            True.

        Raises:
            NotFound: no such device. AuthFailed, ConnectionFailed: as :meth:`execute`.
        """
        return await self.execute(rq.remove_device(device_id))

    # -- provisioning (linking a device) --------------------------------------------------

    async def open_provisioning(self, auth_key: bytes) -> prq.ProvisionOpened:
        """Open a provisioning slot for a new device (unsigned; see
        :func:`e2ee.transport.provisioning_requests.open_provisioning`)."""
        return await self.execute(prq.open_provisioning(auth_key))

    async def read_provisioning(self, slot_id: str) -> prq.ProvisionInfo:
        """Read a provisioning slot as an approver (signed; ``NotFound`` when gone)."""
        return await self.execute(prq.read_provisioning(slot_id))

    async def fill_provisioning(self, slot_id: str, grant: bytes) -> bool:
        """Put the encrypted grant into a slot (signed; once)."""
        return await self.execute(prq.fill_provisioning(slot_id, grant))

    async def take_provisioning(self, slot_id: str, token: bytes) -> bytes | None:
        """Poll a slot for its grant (unsigned; the grant once, then ``NotFound``)."""
        return await self.execute(prq.take_provisioning(slot_id, token))

    # -- prekeys --------------------------------------------------------------------------

    async def upload_keys(self, keys: Mapping[str, Any]) -> int:
        """Upload this device's identity key, signed prekey and one-time prekeys.

        Args:
            keys: the JSON object of docs/relay-api.md section 3 (built by the core).

        Returns:
            One-time prekeys now stored.

        Raises:
            UsageError: not a key-upload mapping. InvalidRequest, RelayRejected (409
            ``identity_mismatch`` / ``prekey_pool_full``), ConnectionFailed.
        """
        return await self.execute(rq.upload_keys(keys))

    async def key_count(self) -> int:
        """Number of one-time prekeys the relay still holds for this device.

        Returns:
            The count.

        Raises:
            AuthFailed, ConnectionFailed, MalformedResponse: as :meth:`execute`.
        """
        return await self.execute(rq.key_count())

    async def fetch_bundles(
        self, username: str, device_id: int | None = None
    ) -> list[dict[str, Any]]:
        """Fetch prekey bundles (raw JSON objects; the core parses and verifies them).

        Args:
            username: whose bundles.
            device_id: a single device, or all devices with keys when None.

        Returns:
            One object per device, sorted by ``device_id``.

        Raises:
            NotFound: unknown user or device. RateLimited, ConnectionFailed.
        """
        return await self.execute(rq.fetch_bundles(username, device_id))

    # -- messages -------------------------------------------------------------------------

    async def send(
        self,
        message_id: bytes,
        recipients: Sequence[tuple[str, int]],
        body: bytes,
        *,
        encoding: Literal["binary", "json"] = "binary",
        after: bytes | None = None,
    ) -> SendReceipt:
        """Store one message for every listed recipient device (idempotent per id).

        Args:
            message_id: 16 bytes; reuse it when retrying.
            recipients: (username, device id) pairs: every current device of each user.
            body: the ciphertext.
            encoding: wire encoding of the request body.
            after: store it only if our message with this id is stored (binary only).

        Returns:
            The receipt (``stored_at``, recipient count).

        Raises:
            UsageError: bad arguments. MismatchedDevices, TooLarge, MailboxFull,
            RateLimited, PredecessorMissing, RelayRejected, ConnectionFailed (outcome
            unknown: retry).
        """
        request = rq.send_message(message_id, recipients, body, encoding=encoding, after=after)
        return await self.execute(request)

    async def fetch_messages(self, after: int = 0, limit: int = 100) -> MessagePage:
        """Read (without removing) up to ``limit`` mailbox messages with ``seq > after``.

        Args:
            after: last ``seq`` already seen.
            limit: 1..1000.

        Returns:
            The page; ``page.more`` means call again with ``after=page.last_seq``.

        Raises:
            UsageError, AuthFailed, ConnectionFailed, MalformedResponse.
        """
        return await self.execute(rq.fetch_messages(after, limit))

    async def fetch_all_messages(self, limit: int = 100) -> AsyncIterator[Delivery]:
        """Iterate over the whole mailbox, page by page (nothing is removed).

        Args:
            limit: page size.

        Yields:
            Each message in increasing ``seq``.

        Raises:
            As :meth:`fetch_messages`.
        """
        after = 0
        while True:
            page = await self.fetch_messages(after, limit)
            for message in page.messages:
                yield message
            if not page.more or page.last_seq is None:
                return
            after = page.last_seq

    async def ack(self, ids: Sequence[bytes], settled: Sequence[bytes] = ()) -> int:
        """Remove messages from this device's mailbox (idempotent), and let the relay forget
        the retry records of this device's settled sends.

        Args:
            ids: 0..1000 message ids.
            settled: 0..1000 ids of this device's own sends that the relay answered 200 and
                that will never be sent again (:func:`~e2ee.transport.requests.ack_messages`);
                not both empty.

        Returns:
            Mailbox rows removed by this call (of ``ids``).

        Raises:
            UsageError, AuthFailed, ConnectionFailed.
        """
        return await self.execute(rq.ack_messages(ids, settled))

    # -- blobs ----------------------------------------------------------------------------

    async def upload_blob(
        self,
        source: str | os.PathLike[str] | AsyncIterable[bytes],
        *,
        sha256: str | None = None,
        size: int | None = None,
        progress: ProgressCallback | None = None,
        content_type: str = "application/octet-stream",
    ) -> BlobInfo:
        """Upload an (already encrypted) blob, streamed; never the whole file in memory.

        The SHA-256 is signed, so it must be known before the first byte is sent: for a
        file path it is computed in a first pass (in a thread) unless given; for an async
        iterator the caller must supply it.

        Args:
            source: a file path, or an async iterable of byte chunks (consumed once).
            sha256: lowercase hex SHA-256 of the bytes (required for an iterable).
            size: the byte count (optional; used for Content-Length with a path and for
                progress totals).
            progress: called as ``progress(sent, total_or_None)`` after each chunk.
            content_type: media type header.

        Returns:
            The blob's id (its SHA-256), size, and whether it was new.

        Raises:
            UsageError: an iterable without ``sha256``, or a malformed digest.
            StorageError: the file cannot be read.
            InvalidRequest: ``digest_mismatch`` (the bytes did not hash to ``sha256``).
            TooLarge, AuthFailed, RateLimited, ConnectionFailed: as :meth:`execute`.
        """
        headers_extra: dict[str, str] = {}
        if isinstance(source, str | os.PathLike):
            path = Path(source)
            with _file_errors("cannot read the upload source"):
                if sha256 is None:
                    digest, size = await asyncio.to_thread(hash_file, path, self._chunk)
                else:
                    digest = sha256
                    if size is None:
                        size = (await asyncio.to_thread(path.stat)).st_size
            headers_extra["Content-Length"] = str(size)
            chunks: AsyncIterable[bytes] = self._read_file(path)
        else:
            if sha256 is None:
                raise UsageError("an iterable upload needs its sha256 up front (it is signed)")
            digest = sha256
            chunks = source
        req = rq.upload_blob(digest, content_type=content_type)
        headers = self._headers(req)
        headers.update(headers_extra)
        url = self.url_for(req.target)
        body = _BodySource(chunks, progress, size)
        try:
            with _network_errors(req.method, req.target):
                async with self.session().post(
                    url,
                    data=body.iterate(),
                    headers=headers,
                    timeout=self._transfer_timeout,
                    allow_redirects=False,
                ) as resp:
                    response = Response(resp.status, _lower(resp.headers), await resp.read())
        except ConnectionFailed:
            # aiohttp reports a failing body iterator as a connection error; the source's
            # own error (unreadable file, bad chunk, the caller's exception) is the truth.
            if body.error is not None:
                raise body.error from None
            raise
        log.debug("POST /v1/blobs -> %d", response.status)
        return req.handle(response)

    async def _read_file(self, path: Path, start: int = 0) -> AsyncIterator[bytes]:
        with _file_errors("cannot read the upload source"):
            fh: IO[bytes] = await asyncio.to_thread(open, path, "rb")
        try:
            if start:
                await asyncio.to_thread(fh.seek, start)
            while True:
                with _file_errors("cannot read the upload source"):
                    chunk = await asyncio.to_thread(fh.read, self._chunk)
                if not chunk:
                    return
                yield chunk
        finally:
            await asyncio.to_thread(fh.close)

    async def delete_blob(self, blob_id: str) -> bool:
        """Delete a blob this account uploaded (``DELETE /v1/blobs/{id}``): it frees the
        account's storage quota; the relay deletes the file once nobody holds it.

        Returns:
            True.

        Raises:
            NotFound: this account holds no such blob. UsageError: malformed id.
            ConnectionFailed, RelayRejected: as :meth:`execute`.
        """
        return await self.execute(rq.delete_blob(blob_id))

    async def download_blob(
        self,
        blob_id: str,
        dest: str | os.PathLike[str],
        *,
        resume: bool = True,
        verify: bool = True,
        progress: ProgressCallback | None = None,
    ) -> int:
        """Download a blob to ``dest``, streamed to disk, resuming a partial file with Range.

        If ``dest`` exists and ``resume`` is true, only the missing tail is requested
        (``Range: bytes=<size>-``); if the relay answers 200 instead, the file is rewritten.
        A failure mid-transfer leaves the bytes received so far in ``dest`` for the next
        attempt. With ``verify``, the whole file must hash to ``blob_id`` (the blob's
        content address); otherwise it is deleted and :class:`BlobDigestMismatch` raised.

        Args:
            blob_id: the blob's lowercase hex SHA-256.
            dest: the destination file (its directory must exist).
            resume: continue an existing partial file.
            verify: check the SHA-256 of the complete file.
            progress: called as ``progress(bytes_in_file, total_or_None)``.

        Returns:
            The blob's size in bytes.

        Raises:
            UsageError: malformed id. NotFound: unknown blob. BlobDigestMismatch: the
            bytes do not match the id. StorageError: the file cannot be written.
            RangeNotSatisfiable, AuthFailed, ConnectionFailed, MalformedResponse.
        """
        path = Path(dest)
        rq.download_blob(blob_id)  # validates the id before touching the disk
        with _file_errors("cannot read the partial download"):
            offset = await asyncio.to_thread(_file_size, path) if resume else 0
        try:
            return await self._download(blob_id, path, offset, verify, progress)
        except RangeNotSatisfiable:
            if offset == 0:
                raise
            # The partial file is as long as (or longer than) the blob: start over.
            return await self._download(blob_id, path, 0, verify, progress)

    async def _download(
        self,
        blob_id: str,
        path: Path,
        offset: int,
        verify: bool,
        progress: ProgressCallback | None,
    ) -> int:
        req = rq.download_blob(blob_id, start=offset)
        hasher = hashlib.sha256()
        url = self.url_for(req.target)
        with _network_errors(req.method, req.target):
            async with self.session().get(
                url,
                headers=self._headers(req),
                timeout=self._transfer_timeout,
                allow_redirects=False,
            ) as resp:
                head = Response(resp.status, _lower(resp.headers))
                if resp.status not in req.accepted:
                    head = Response(resp.status, head.headers, await resp.read())
                    if (
                        resp.status == 416
                        and offset > 0
                        and (rq.unsatisfied_range_total(head) == offset)
                    ):
                        # The partial file is already complete: finish like a download.
                        if verify:
                            with _file_errors("cannot read the partial download"):
                                await asyncio.to_thread(
                                    _hash_prefix, path, offset, hasher, self._chunk
                                )
                        await self._remove_if_bad(path, blob_id, hasher, verify)
                        if progress is not None:
                            progress(offset, offset)
                        return offset
                info = req.handle(head)
                if info.status == 200:
                    offset = 0  # the relay ignored the range (or none was asked)
                elif verify:
                    with _file_errors("cannot read the partial download"):
                        await asyncio.to_thread(_hash_prefix, path, offset, hasher, self._chunk)
                total = info.total
                done = await self._stream_to_file(resp, path, offset, hasher, total, progress)
        if total is not None and done != total:
            raise MalformedResponse(f"blob download ended at {done} of {total} bytes")
        await self._remove_if_bad(path, blob_id, hasher, verify)
        return done

    async def _remove_if_bad(self, path: Path, blob_id: str, hasher: Any, verify: bool) -> None:
        if verify and hasher.hexdigest() != blob_id:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(path.unlink)
            raise BlobDigestMismatch("downloaded blob does not hash to its id; file removed")

    async def _stream_to_file(
        self,
        resp: aiohttp.ClientResponse,
        path: Path,
        offset: int,
        hasher: Any,
        total: int | None,
        progress: ProgressCallback | None,
    ) -> int:
        mode = "r+b" if offset else "wb"
        with _file_errors("cannot open the download destination"):
            fh: IO[bytes] = await asyncio.to_thread(open, path, mode)
        done = offset
        buffer: list[bytes] = []
        buffered = 0
        try:
            with _file_errors("cannot write the download destination"):
                if offset:
                    await asyncio.to_thread(fh.seek, offset)
                    await asyncio.to_thread(fh.truncate)
                # iter_any: consume bytes as they arrive, so a broken connection loses
                # nothing that was already received (it stays on disk for the resume).
                async for chunk in resp.content.iter_any():
                    hasher.update(chunk)
                    buffer.append(chunk)
                    buffered += len(chunk)
                    done += len(chunk)
                    if buffered >= DEFAULT_WRITE_BUFFER:
                        await asyncio.to_thread(fh.write, b"".join(buffer))
                        buffer.clear()
                        buffered = 0
                    if progress is not None:
                        progress(done, total)
        finally:
            # Keep whatever arrived, even on failure, so the next attempt resumes after it.
            with _file_errors("cannot write the download destination"):
                if buffer:
                    await asyncio.to_thread(fh.write, b"".join(buffer))
                await asyncio.to_thread(_flush_and_close, fh)
        return done


def _flush_and_close(fh: IO[bytes]) -> None:
    try:
        fh.flush()
        os.fsync(fh.fileno())
    finally:
        fh.close()


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


class _BodySource:
    """Wraps the upload chunks: type-checks them, reports progress, remembers a failure."""

    def __init__(
        self,
        chunks: AsyncIterable[bytes],
        progress: ProgressCallback | None,
        total: int | None,
    ) -> None:
        self._chunks = chunks
        self._progress = progress
        self._total = total
        self.error: BaseException | None = None

    async def iterate(self) -> AsyncIterator[bytes]:
        done = 0
        try:
            async for chunk in self._chunks:
                if not isinstance(chunk, bytes | bytearray | memoryview):
                    raise UsageError("upload chunks must be bytes")
                yield bytes(chunk)
                done += len(chunk)
                if self._progress is not None:
                    self._progress(done, self._total)
        except Exception as exc:
            self.error = exc
            raise
