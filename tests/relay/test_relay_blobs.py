"""Media blobs: streamed content-addressed upload, dedupe, Range resume, size limit cleanup."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import aiohttp
from relay_harness import RelayProcess
from relay_testclient import RelayClient

from relay.auth import H_CONTENT_SHA256


async def test_upload_is_content_addressed_and_stored_once(
    client: RelayClient, shared_relay: RelayProcess
) -> None:
    dev = await client.new_device()
    data = os.urandom(300_000)
    digest = hashlib.sha256(data).hexdigest()
    r1 = await client.upload_blob(dev, data)
    assert r1.status == 201 and r1.json() == {"id": digest, "size": len(data)}
    other = await client.new_device()
    r2 = await client.upload_blob(other, data)
    assert r2.status == 200 and r2.json() == r1.json()
    files = [p for p in (shared_relay.data_dir / "blobs").rglob(digest)]
    assert len(files) == 1 and files[0].read_bytes() == data


async def test_range_download_resumes(client: RelayClient) -> None:
    dev = await client.new_device()
    data = os.urandom(100_000)
    blob_id = (await client.upload_blob(dev, data)).json()["id"]
    reader = await client.new_device()
    target = f"/v1/blobs/{blob_id}"
    full = await client.request(reader, "GET", target)
    assert full.status == 200 and full.body == data
    part1 = await client.request(reader, "GET", target, headers={"Range": "bytes=0-39999"})
    assert part1.status == 206 and part1.body == data[:40000]
    assert part1.headers["Content-Range"] == f"bytes 0-39999/{len(data)}"
    rest = await client.request(reader, "GET", target, headers={"Range": "bytes=40000-"})
    assert rest.status == 206 and part1.body + rest.body == data
    bad = await client.request(reader, "GET", target, headers={"Range": "bytes=200000-"})
    assert bad.status == 416
    missing = await client.request(reader, "GET", "/v1/blobs/" + "0" * 64)
    assert missing.status == 404 and missing.json()["error"] == "unknown_blob"
    assert (await client.request(None, "GET", target)).status == 401


async def test_digest_mismatch_and_unauthenticated_upload(
    client: RelayClient, shared_relay: RelayProcess
) -> None:
    dev = await client.new_device()
    data = b"a" * 1000
    wrong = hashlib.sha256(b"b").hexdigest()
    headers = client.sign(dev, "POST", "/v1/blobs", body_sha256=wrong)
    headers[H_CONTENT_SHA256] = wrong
    async with client.session.post(client.base + "/v1/blobs", data=data, headers=headers) as r:
        assert r.status == 400 and (await r.json())["error"] == "digest_mismatch"
    async with client.session.post(client.base + "/v1/blobs", data=data) as r:
        assert r.status == 401
    assert list((shared_relay.data_dir / "blobs" / "tmp").iterdir()) == []


async def test_oversize_upload_is_413_and_partial_file_deleted(
    relay_factory, session: aiohttp.ClientSession
) -> None:
    relay = relay_factory({"max_blob_bytes": str(1024 * 1024)})
    client = RelayClient(relay.url, session)
    dev = await client.new_device()
    tmp_dir = relay.data_dir / "blobs" / "tmp"
    # Declared too large: refused before reading.
    big = os.urandom(1024 * 1024 + 1)
    r = await client.upload_blob(dev, big)
    assert r.status == 413 and r.json()["error"] == "too_large"
    # Streamed (chunked, no length): refused once the limit is crossed; temp file removed.
    digest = hashlib.sha256(b"z" * (3 * 1024 * 1024)).hexdigest()
    headers = client.sign(dev, "POST", "/v1/blobs", body_sha256=digest)
    headers[H_CONTENT_SHA256] = digest

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(48):
            yield b"z" * 65536

    status = None
    try:
        async with session.post(relay.url + "/v1/blobs", data=chunks(), headers=headers) as resp:
            status = resp.status
    except (aiohttp.ClientError, ConnectionError):
        status = "disconnected"
    assert status in (413, "disconnected")
    assert list(tmp_dir.iterdir()) == []
    assert [p for p in (relay.data_dir / "blobs").rglob("*") if p.is_file()] == []
    # The relay is still serving.
    assert (await client.request(dev, "GET", "/v1/keys/count")).status == 200


async def test_an_empty_blob_is_refused_and_nothing_is_stored(
    client: RelayClient, shared_relay: RelayProcess
) -> None:
    dev = await client.new_device()
    empty = hashlib.sha256(b"").hexdigest()
    r = await client.upload_blob(dev, b"")
    assert r.status == 400 and r.json()["error"] == "empty_blob"

    async def no_bytes() -> AsyncIterator[bytes]:  # chunked, no Content-Length
        return
        yield b""

    headers = client.sign(dev, "POST", "/v1/blobs", body_sha256=empty)
    headers[H_CONTENT_SHA256] = empty
    async with client.session.post(
        client.base + "/v1/blobs", data=no_bytes(), headers=headers
    ) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "empty_blob"
    assert not list((shared_relay.data_dir / "blobs").rglob(empty))
    missing = await client.request(dev, "GET", f"/v1/blobs/{empty}")
    assert missing.status == 404
