"""RelayClient against scripted in-process HTTP servers: error translation, streaming,
resume edge cases and what the relay sees on the wire."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from e2ee.errors import StorageError, UsageError
from e2ee.transport.auth import DeviceSigner, canonical_string
from e2ee.transport.errors import (
    ConnectionFailed,
    MalformedResponse,
    RelayRejected,
    RelayTimeout,
)
from e2ee.transport.http import RelayClient, origin_of

Handler = Callable[[web.Request], Any]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    servers: list[TestServer] = []

    async def start(routes: list[tuple[str, str, Handler]]) -> str:
        app = web.Application()
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("/")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


def signer() -> DeviceSigner:
    return DeviceSigner.from_seed(b"\x01" * 32, "alice", 1)


def client(url: str, **kw: Any) -> RelayClient:
    return RelayClient(url, "alice", 1, signer(), **kw)


def test_constructor_checks() -> None:
    with pytest.raises(UsageError):
        RelayClient("http://h", "bob", 1, signer())  # signer is alice's
    with pytest.raises(UsageError):
        RelayClient("http://h", "alice", 2, signer())
    with pytest.raises(UsageError):
        origin_of("http://h/prefix")
    with pytest.raises(UsageError):
        origin_of("ftp://h")
    assert str(origin_of("https://relay.example:8443/")) == "https://relay.example:8443"


async def test_request_on_the_wire_matches_the_signature(serve: Callable[..., Any]) -> None:
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.Response:
        seen["target"] = request.raw_path
        seen["headers"] = dict(request.headers)
        seen["body"] = await request.read()
        return web.json_response({"messages": [], "more": False})

    url = await serve([("GET", "/v1/messages", handler)])
    async with client(url, clock_ms=lambda: 1234) as c:
        page = await c.fetch_messages(after=3, limit=7)
    assert page.messages == ()
    h = seen["headers"]
    assert seen["target"] == "/v1/messages?after=3&limit=7"
    msg = canonical_string(
        "GET",
        seen["target"],
        "alice",
        1,
        1234,
        h["X-Blindpost-Nonce"],
        hashlib.sha256(b"").hexdigest(),
    )
    import base64

    from nacl.signing import VerifyKey

    VerifyKey(signer().public_key).verify(msg, base64.b64decode(h["X-Blindpost-Signature"]))
    assert h["X-Blindpost-Timestamp"] == "1234"


async def test_connection_refused_is_connection_failed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with client(f"http://127.0.0.1:{port}") as c:
        with pytest.raises(ConnectionFailed) as exc:
            await c.key_count()
    assert "GET /v1/keys/count" in str(exc.value)


async def test_timeout_is_relay_timeout(serve: Callable[..., Any]) -> None:
    release = asyncio.Event()

    async def slow(_request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"count": 1})

    url = await serve([("GET", "/v1/keys/count", slow)])
    async with client(url, timeout=0.2) as c:
        with pytest.raises(RelayTimeout):
            await c.key_count()
    release.set()


async def test_ack_posts_the_sends_to_settle(serve: Callable[..., Any]) -> None:
    """``RelayClient.ack`` puts ``settled`` in the signed body; an ack may settle only."""
    import base64
    import json

    bodies: list[Any] = []

    async def ack(request: web.Request) -> web.Response:
        bodies.append(json.loads(await request.read()))
        return web.json_response({"acked": len(bodies[-1].get("ids", []))})

    url = await serve([("POST", "/v1/messages/ack", ack)])
    mid, sent = b"\x01" * 16, b"\x02" * 16
    async with client(url) as c:
        assert await c.ack([mid], [sent]) == 1
        assert await c.ack([], settled=[sent]) == 0
        assert await c.ack([mid]) == 1
    m, s = base64.b64encode(mid).decode(), base64.b64encode(sent).decode()
    assert bodies == [{"ids": [m], "settled": [s]}, {"settled": [s]}, {"ids": [m]}]


async def test_errors_carry_no_secrets(serve: Callable[..., Any]) -> None:
    async def reject(_request: web.Request) -> web.Response:
        return web.json_response({"error": "auth_invalid", "message": "nope"}, status=401)

    url = await serve([("POST", "/v1/messages/ack", reject)])
    nonce = "secretnonce_1234567890"
    s = signer()
    async with client(url) as c:
        with pytest.raises(RelayRejected) as exc:
            await c.ack([b"\x00" * 16])
    text = str(exc.value) + repr(exc.value)
    assert "auth_invalid" in text
    for secret in (nonce, (b"\x01" * 32).hex()):
        assert secret not in text
    assert s.public_key_b64 not in text


async def test_redirects_are_not_followed(serve: Callable[..., Any]) -> None:
    async def redirect(_request: web.Request) -> web.Response:
        raise web.HTTPFound("http://elsewhere.invalid/")

    url = await serve([("GET", "/v1/keys/count", redirect)])
    async with client(url) as c:
        with pytest.raises(RelayRejected) as exc:
            await c.key_count()
    assert exc.value.status == 302


async def test_success_with_garbage_body(serve: Callable[..., Any]) -> None:
    async def garbage(_request: web.Request) -> web.Response:
        return web.Response(text="<html>", status=200)

    url = await serve([("GET", "/v1/keys/count", garbage)])
    async with client(url) as c:
        with pytest.raises(MalformedResponse):
            await c.key_count()


async def test_borrowed_session_is_not_closed(serve: Callable[..., Any]) -> None:
    import aiohttp

    async def count(_request: web.Request) -> web.Response:
        return web.json_response({"count": 2})

    url = await serve([("GET", "/v1/keys/count", count)])
    async with aiohttp.ClientSession() as session:
        async with client(url, session=session) as c:
            assert await c.key_count() == 2
        assert not session.closed


# -- blobs ------------------------------------------------------------------------------------


async def test_upload_streams_and_reports_source_errors(
    serve: Callable[..., Any], tmp_path: Path
) -> None:
    sizes: list[int] = []

    async def receive(request: web.Request) -> web.Response:
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        sizes.append(total)
        digest = request.headers["X-Blindpost-Content-SHA256"]
        return web.json_response({"id": digest, "size": total}, status=201)

    url = await serve([("POST", "/v1/blobs", receive)])
    async with client(url, chunk_size=4096) as c:
        src = tmp_path / "f"
        src.write_bytes(os.urandom(50_000))
        calls: list[tuple[int, int | None]] = []
        info = await c.upload_blob(src, progress=lambda d, t: calls.append((d, t)))
        assert info.size == 50_000 and info.id == hashlib.sha256(src.read_bytes()).hexdigest()
        assert len(calls) == 13 and calls[-1] == (50_000, 50_000)

        with pytest.raises(StorageError):
            await c.upload_blob(tmp_path / "missing")
        with pytest.raises(UsageError):
            await c.upload_blob(_chunks([b"x"]))  # no sha256 for an iterator

        async def text_chunks() -> AsyncIterator[Any]:
            yield "not bytes"

        with pytest.raises(UsageError):
            await c.upload_blob(text_chunks(), sha256="ab" * 32)

        class Boom(Exception):
            pass

        async def failing() -> AsyncIterator[bytes]:
            yield b"x" * 10
            raise Boom

        with pytest.raises(Boom):  # the caller's own error comes back unchanged
            await c.upload_blob(failing(), sha256="ab" * 32)


async def _chunks(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def test_download_when_the_relay_ignores_range(
    serve: Callable[..., Any], tmp_path: Path
) -> None:
    data = os.urandom(10_000)
    blob_id = hashlib.sha256(data).hexdigest()

    async def whole(request: web.Request) -> web.Response:
        assert request.headers.get("Range") == "bytes=100-"
        return web.Response(body=data)  # 200: the whole blob

    url = await serve([("GET", f"/v1/blobs/{blob_id}", whole)])
    dest = tmp_path / "d"
    dest.write_bytes(data[:100])
    async with client(url) as c:
        assert await c.download_blob(blob_id, dest) == len(data)
    assert dest.read_bytes() == data


async def test_interrupted_download_keeps_the_prefix(
    serve: Callable[..., Any], tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    blob_id = hashlib.sha256(data).hexdigest()
    calls: list[str | None] = []
    consumed = asyncio.Event()

    async def flaky(request: web.Request) -> web.StreamResponse:
        calls.append(request.headers.get("Range"))
        if len(calls) == 1:  # promise everything, send 100 kB, then drop the connection
            resp = web.StreamResponse(headers={"Content-Length": str(len(data))})
            await resp.prepare(request)
            await resp.write(data[:100_000])
            await consumed.wait()  # the client has read these bytes
            assert request.transport is not None
            request.transport.close()
            return resp
        start = int(request.headers["Range"].removeprefix("bytes=").rstrip("-"))
        return web.Response(
            status=206,
            body=data[start:],
            headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
        )

    url = await serve([("GET", f"/v1/blobs/{blob_id}", flaky)])
    dest = tmp_path / "d"
    async with client(url) as c:
        with pytest.raises(ConnectionFailed):
            await c.download_blob(
                blob_id, dest, progress=lambda d, _t: d >= 100_000 and consumed.set()
            )
        kept = dest.stat().st_size
        assert kept == 100_000 and dest.read_bytes() == data[:kept]
        assert await c.download_blob(blob_id, dest) == len(data)
    assert calls == [None, f"bytes={kept}-"]
    assert dest.read_bytes() == data


async def test_download_to_an_unwritable_place(serve: Callable[..., Any], tmp_path: Path) -> None:
    data = b"abc"
    blob_id = hashlib.sha256(data).hexdigest()

    async def blob(_request: web.Request) -> web.Response:
        return web.Response(body=data)

    url = await serve([("GET", f"/v1/blobs/{blob_id}", blob)])
    async with client(url) as c:
        with pytest.raises(StorageError):
            await c.download_blob(blob_id, tmp_path / "no" / "such" / "dir")


async def test_stalled_download_is_a_timeout_not_a_disk_error(
    serve: Callable[..., Any], tmp_path: Path
) -> None:
    data = os.urandom(1000)
    blob_id = hashlib.sha256(data).hexdigest()
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await resp.prepare(request)
        await resp.write(data[:10])
        await release.wait()
        return resp

    url = await serve([("GET", f"/v1/blobs/{blob_id}", stall)])
    dest = tmp_path / "d"
    async with client(url, transfer_timeout=0.3) as c:
        with pytest.raises(RelayTimeout):
            await c.download_blob(blob_id, dest)
    release.set()
    assert dest.read_bytes() == data[:10]  # kept for the resume
