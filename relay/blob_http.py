# Invariant: a blob is sent in chunks straight from its BlobReader (never whole in memory), with
# the Range semantics of aiohttp's FileResponse (one range; 206 + Content-Range; 416 when the
# range starts past the end), so a client sees the same answers whichever blob store serves.
"""HTTP download of a blob from any ``BlobStore`` (files use aiohttp's sendfile path)."""

from __future__ import annotations

from aiohttp import web

from relay.blobs import BlobReader

__all__ = ["blob_response"]

_TYPE = "application/octet-stream"


def _range(request: web.Request, size: int) -> tuple[int, int] | None:
    """The requested ``[start, end)``, or None for the whole blob.

    Raises:
        web.HTTPRequestRangeNotSatisfiable: malformed, several ranges, or starting past the end.
    """
    unsatisfiable = web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    try:
        rng = request.http_range
    except ValueError:
        raise unsatisfiable from None
    start, stop = rng.start, rng.stop
    if start is None and stop is None:
        return None
    if start is not None and start < 0 and stop is None:  # suffix: the last -start bytes
        return max(size + start, 0), size
    start = start or 0
    end = size if stop is None else min(stop, size)
    if start >= size or start >= end:
        raise unsatisfiable
    return start, end


async def blob_response(request: web.Request, reader: BlobReader) -> web.StreamResponse:
    """Stream a blob (or the requested range of it) as the response to a GET.

    Args:
        request: the download request (its Range header is honoured).
        reader: the stored blob.

    Returns:
        The prepared and finished response.

    Raises:
        web.HTTPRequestRangeNotSatisfiable: see ``_range``.
        relay.errors.StorageError: the backend failed before the first byte was sent.
    """
    size = reader.size
    span = _range(request, size)
    resp = web.StreamResponse(status=200 if span is None else 206)
    start, end = (0, size) if span is None else span
    resp.headers["Content-Type"] = _TYPE
    resp.headers["Accept-Ranges"] = "bytes"
    if span is not None:
        resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    resp.content_length = end - start
    chunks = reader.read(start, end)
    first = await anext(chunks, b"")  # a failure here is still an error response
    await resp.prepare(request)
    if first:
        await resp.write(first)
    async for chunk in chunks:
        await resp.write(chunk)
    await resp.write_eof()
    return resp
