"""Attachments: uploading a file, re-sending a stored one, and fetching one into a
file or into memory (image previews).

Invariants:

* A file is encrypted chunk by chunk into a temporary file in the account's
  folder, uploaded, and the temporary file removed whatever happens; only the
  pointer (blob id, key, digest) goes into a message.

* A blob is downloaded into a temporary file in the account's folder and
  removed afterwards, whatever happens; the content address is checked by the
  transport and every chunk (and the whole digest) by :mod:`e2ee.media` before
  a byte is handed out. A tampered blob raises ``MediaCorrupt`` and leaves no
  output.
* In memory, at most ``limit`` plaintext bytes are ever held (decryption stops
  past it), and ``limit`` is at most :data:`MAX_IN_MEMORY`; no plaintext copy is
  written to disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
from pathlib import Path
from typing import Final

from e2ee.client.context import ClientContext
from e2ee.errors import AttachmentTooLarge, UsageError
from e2ee.media import MediaCorrupt, Progress, decrypt_file, decrypt_to_bytes, encrypt_file
from e2ee.messaging.rows import AttachmentRow
from e2ee.payload import AttachmentPointer
from e2ee.transport.errors import BlobDigestMismatch

__all__ = [
    "MAX_IN_MEMORY",
    "attachment_bytes",
    "download_attachment",
    "stored_pointer",
    "upload_file",
]

#: The largest ``limit`` :func:`attachment_bytes` accepts (64 MiB).
MAX_IN_MEMORY: Final = 64 * 1024 * 1024


async def upload_file(
    ctx: ClientContext, source: Path, mime_type: str | None, progress: Progress | None
) -> AttachmentPointer:
    """Encrypt ``source``, upload it to the relay's blob store; the pointer to send.

    Raises:
        UsageError: the file cannot be read.
        TransportError: the upload failed.
    """
    enc = await asyncio.to_thread(encrypt_file, source, directory=ctx.folder)
    try:
        blob_id = await ctx.link.upload_blob(enc.path, enc.digest, progress)
    finally:
        with contextlib.suppress(OSError):
            enc.path.unlink()
    return AttachmentPointer(
        blob_id=blob_id,
        key=enc.key,
        digest=enc.digest,
        size=enc.plaintext_size,
        mime_type=mime_type or mimetypes.guess_type(source.name)[0] or "application/octet-stream",
        file_name=source.name,
    )


def stored_pointer(ctx: ClientContext, message_id: str) -> AttachmentPointer:
    """The pointer of an attachment we hold, to send again (blocking; no re-upload).

    Raises:
        UsageError: the message has no attachment.
    """
    row = ctx.view().get(AttachmentRow, message_id)
    if row is None or not row.key or not row.digest:
        raise UsageError("that message has no attachment")
    return AttachmentPointer(
        row.blob_id or "",
        row.key,
        row.digest,
        row.size or 0,
        row.mime_type or "",
        row.file_name or "",
    )


async def _row(ctx: ClientContext, message_id: str) -> tuple[AttachmentRow, bytes, bytes]:
    """The attachment row of a message with its key and digest."""
    row = await asyncio.to_thread(ctx.view().get, AttachmentRow, message_id)
    if row is None or not row.key or not row.digest:
        raise UsageError("that message has no attachment")
    return row, row.key, row.digest


async def _fetch(
    ctx: ClientContext, message_id: str, row: AttachmentRow, progress: Progress | None
) -> Path:
    """Download a message's blob into a temporary file; returns it (caller removes it)."""
    tmp = ctx.folder / f".download-{message_id}"
    try:
        await ctx.link.download_blob(row.blob_id or "", tmp, progress)
    except BlobDigestMismatch as exc:
        # The transport checks the content address first: a blob changed on the
        # relay (or in transit) fails there, before it is decrypted.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise MediaCorrupt("the blob was tampered with or truncated") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


async def download_attachment(
    ctx: ClientContext, message_id: str, target: Path, progress: Progress | None
) -> Path:
    """See :meth:`e2ee.client.Client.download_attachment`."""
    row, key, digest = await _row(ctx, message_id)
    tmp = await _fetch(ctx, message_id, row, progress)
    try:
        await asyncio.to_thread(decrypt_file, tmp, target, key, digest)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return target


async def attachment_bytes(ctx: ClientContext, message_id: str, limit: int) -> bytes:
    """See :meth:`e2ee.client.Client.attachment_bytes`."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_IN_MEMORY:
        raise UsageError(f"limit must be 1..{MAX_IN_MEMORY} bytes")
    row, key, digest = await _row(ctx, message_id)
    if (row.size or 0) > limit:
        raise AttachmentTooLarge(message_id, limit)  # as the sender declared it
    tmp = await _fetch(ctx, message_id, row, None)
    try:
        data = await asyncio.to_thread(decrypt_to_bytes, tmp, key, digest, limit=limit)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    if data is None:
        raise AttachmentTooLarge(message_id, limit)  # larger than it said
    return data
