"""A small signing test client for the relay (mirrors docs/relay-api.md section 1)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from nacl.signing import SigningKey

from blindpost_wire.registration import solve_pow
from relay.auth import H_CONTENT_SHA256, sign_request
from relay.store.base import Address, Envelope
from relay.wire import encode_send


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def new_username(prefix: str = "u") -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


def new_mid() -> bytes:
    return os.urandom(16)


@dataclass
class Device:
    user: str
    device: int = 1
    key: SigningKey = field(default_factory=SigningKey.generate)

    @property
    def addr(self) -> Address:
        return Address(self.user, self.device)

    @property
    def auth_key_b64(self) -> str:
        return b64(bytes(self.key.verify_key))

    def rcpt(self) -> dict[str, Any]:
        return {"user": self.user, "device": self.device}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class RelayClient:
    """Signs and sends requests to one relay."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base = base_url
        self.session = session

    def sign(
        self,
        dev: Device,
        method: str,
        target: str,
        body: bytes = b"",
        *,
        timestamp_ms: int | None = None,
        nonce: str | None = None,
        body_sha256: str | None = None,
    ) -> dict[str, str]:
        return sign_request(
            dev.key,
            method,
            target,
            dev.user,
            dev.device,
            body,
            timestamp_ms=time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms,
            nonce=nonce or b64(os.urandom(16)),
            body_sha256=body_sha256,
        )

    async def request(
        self,
        dev: Device | None,
        method: str,
        target: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Reply:
        body = (
            data
            if data is not None
            else (json.dumps(json_body).encode() if json_body is not None else b"")
        )
        hdrs: dict[str, str] = {}
        if body:
            hdrs["Content-Type"] = content_type
        if dev is not None:
            hdrs.update(self.sign(dev, method, target, body))
        hdrs.update(headers or {})
        async with self.session.request(
            method, self.base + target, data=body or None, headers=hdrs
        ) as resp:
            raw = await resp.read()
            return Reply(resp.status, dict(resp.headers), raw)

    async def registration(self) -> dict[str, Any]:
        async with self.session.get(self.base + "/v1/registration") as resp:
            assert resp.status == 200
            doc: dict[str, Any] = await resp.json()
            return doc

    async def register(
        self, dev: Device, *, invite: str | None = None, pow: dict[str, Any] | None = None
    ) -> Reply:
        """Register ``dev`` (solving the relay's proof of work when it asks for one)."""
        body: dict[str, Any] = {
            "username": dev.user,
            "device_id": dev.device,
            "auth_key": dev.auth_key_b64,
        }
        if invite is not None:
            body["invite"] = invite
        elif pow is not None:
            body["pow"] = pow
        else:
            info = await self.registration()
            if info["mode"] == "pow":
                nonce = solve_pow(info["challenge"], dev.user, info["difficulty"])
                body["pow"] = {"challenge": info["challenge"], "nonce": nonce}
        return await self.request(dev, "POST", "/v1/accounts", json_body=body)

    async def new_device(self, prefix: str = "u") -> Device:
        dev = Device(new_username(prefix))
        r = await self.register(dev)
        assert r.status == 201, r.body
        return dev

    async def add_device(self, existing: Device, device_id: int) -> Device:
        dev = Device(existing.user, device_id)
        r = await self.request(
            existing,
            "POST",
            "/v1/devices",
            json_body={"device_id": device_id, "auth_key": dev.auth_key_b64},
        )
        assert r.status == 201, r.body
        return dev

    async def send(
        self, sender: Device, recipients: list[Device], body: bytes, mid: bytes | None = None
    ) -> Reply:
        return await self.request(
            sender,
            "PUT",
            "/v1/messages",
            json_body={
                "id": b64(mid or new_mid()),
                "recipients": [r.rcpt() for r in recipients],
                "body": b64(body),
            },
        )

    async def send_binary(
        self, sender: Device, recipients: list[Device], body: bytes, mid: bytes | None = None
    ) -> Reply:
        frame = encode_send(Envelope(mid or new_mid(), tuple(r.addr for r in recipients), body))
        return await self.request(
            sender,
            "PUT",
            "/v1/messages",
            data=frame,
            content_type="application/vnd.blindpost.send",
        )

    async def ack(self, dev: Device, mids: list[bytes]) -> Reply:
        return await self.request(
            dev, "POST", "/v1/messages/ack", json_body={"ids": [b64(m) for m in mids]}
        )

    async def read(self, dev: Device, after: int = 0, limit: int = 100) -> Reply:
        return await self.request(dev, "GET", f"/v1/messages?after={after}&limit={limit}")

    async def ws(self, dev: Device, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
        headers = self.sign(dev, "GET", "/v1/ws")
        return await self.session.ws_connect(
            self.base + "/v1/ws", headers=headers, autoclose=False, **kwargs
        )

    async def upload_blob(self, dev: Device, data: bytes) -> Reply:
        digest = hashlib.sha256(data).hexdigest()
        headers = self.sign(dev, "POST", "/v1/blobs", body_sha256=digest)
        headers[H_CONTENT_SHA256] = digest
        headers["Content-Type"] = "application/octet-stream"
        async with self.session.post(self.base + "/v1/blobs", data=data, headers=headers) as resp:
            return Reply(resp.status, dict(resp.headers), await resp.read())


async def next_frame(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> Any:
    """Return the next data frame: a dict for text, a StoredMessage for DELIVER frames, or the
    raw aiohttp message for close/error."""
    from relay.wire import decode_deliver

    msg = await ws.receive(timeout=timeout)
    if msg.type == aiohttp.WSMsgType.TEXT:
        return json.loads(msg.data)
    if msg.type == aiohttp.WSMsgType.BINARY:
        return decode_deliver(msg.data)
    return msg


async def drain_until_empty(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> list[Any]:
    """Read the hint, the backlog and the empty marker; return the delivered messages."""
    hint = await next_frame(ws, timeout)
    assert isinstance(hint, dict) and hint["type"] == "hint", hint
    out = []
    for _ in range(100_000):
        f = await next_frame(ws, timeout)
        if isinstance(f, dict) and f.get("type") == "empty":
            return out
        assert not isinstance(f, dict), f
        out.append(f)
    raise AssertionError("no empty marker")
