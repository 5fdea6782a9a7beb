"""Numbers are ASCII only: a Unicode digit where a number is read is a 4xx or 4401, never a 500.

``str.isdigit()`` accepts ``"²"`` (bytes C2 B2) which ``int()`` then refuses, and ``int()`` itself
accepts every Unicode decimal (Arabic-Indic, fullwidth, ...). Every character that any of
``\\d``, ``isdigit``, ``isdecimal`` or ``isnumeric`` accepts, other than ``0-9``, is tried in the
timestamp header, the device header, the ``?after=``/``?limit=`` query, the device-id path
segments and the WebSocket auth frame, against a real relay process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import sys
import time
import urllib.parse
import urllib.request

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from relay_harness import RelayProcess
from relay_testclient import Device, b64

from blindpost_wire.registration import solve_pow
from relay.auth import parse_signed_headers, sign_request
from relay.errors import AuthError, BadRequest
from relay.wire import parse_ascii_uint, parse_device_id

_DIGIT_RE = re.compile(r"\d")
#: Every non-ASCII character some digit test accepts (about 1,900 of them).
UNICODE_DIGITS = sorted(
    c
    for c in map(chr, range(sys.maxunicode + 1))
    if c not in "0123456789"
    and (_DIGIT_RE.match(c) or c.isdigit() or c.isdecimal() or c.isnumeric())
)
ONE_DIGIT = st.sampled_from(UNICODE_DIGITS)


def with_digit(draw_digit: str, ascii_digits: str, position: int) -> str:
    """``ascii_digits`` with ``draw_digit`` inserted at ``position`` (clamped)."""
    position = min(position, len(ascii_digits))
    return ascii_digits[:position] + draw_digit + ascii_digits[position:]


MIXED = st.builds(
    with_digit, ONE_DIGIT, st.text("0123456789", min_size=0, max_size=5), st.integers(0, 5)
)


def test_the_classes_are_covered() -> None:
    assert "²" in UNICODE_DIGITS and "\u0663" in UNICODE_DIGITS and "\uff11" in UNICODE_DIGITS
    assert "\u2155" in UNICODE_DIGITS  # VULGAR FRACTION ONE FIFTH: isnumeric only
    assert len(UNICODE_DIGITS) > 1000


@given(MIXED)
def test_parsers_refuse_every_unicode_digit_with_a_typed_error(text: str) -> None:
    with pytest.raises(BadRequest):
        parse_ascii_uint(text, "n", 19)
    with pytest.raises(BadRequest):
        parse_device_id(text)
    headers = sign_request(
        Device("alice_digits").key,
        "GET",
        "/v1/devices",
        "alice_digits",
        1,
        timestamp_ms=1,
        nonce="n" * 16,
    )
    for name in ("X-Blindpost-Timestamp", "X-Blindpost-Device"):
        with pytest.raises(AuthError):
            parse_signed_headers({**headers, name: text})


def raw_status(port: int, method: str, target: str, headers: dict[str, str]) -> int:
    """Send one request with header values encoded as UTF-8 bytes; return the status code."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def registered(shared_relay: RelayProcess) -> Device:
    dev = Device(f"digits_{os.urandom(4).hex()}")
    doc: dict[str, object] = {"username": dev.user, "device_id": 1, "auth_key": dev.auth_key_b64}
    with urllib.request.urlopen(shared_relay.url + "/v1/registration", timeout=30) as resp:
        info = json.loads(resp.read())
    if info["mode"] == "pow":  # the relay's default registration mode
        nonce = solve_pow(info["challenge"], dev.user, info["difficulty"])
        doc["pow"] = {"challenge": info["challenge"], "nonce": nonce}
    body = json.dumps(doc).encode()
    headers = sign_request(
        dev.key,
        "POST",
        "/v1/accounts",
        dev.user,
        1,
        body,
        timestamp_ms=time.time_ns() // 1_000_000,
        nonce=b64(os.urandom(16)),
    )
    req = urllib_request(shared_relay.url + "/v1/accounts", body, headers)
    assert req == 201
    return dev


@pytest.fixture(scope="module")
def blob_id(shared_relay: RelayProcess, registered: Device) -> str:
    data = os.urandom(1000)
    digest = hashlib.sha256(data).hexdigest()
    headers = sign_request(
        registered.key,
        "POST",
        "/v1/blobs",
        registered.user,
        1,
        timestamp_ms=time.time_ns() // 1_000_000,
        nonce=b64(os.urandom(16)),
        body_sha256=digest,
    )
    headers["X-Blindpost-Content-SHA256"] = digest
    status = urllib_request(
        shared_relay.url + "/v1/blobs", data, headers, "application/octet-stream"
    )
    assert status == 201
    return digest


def urllib_request(
    url: str, body: bytes, headers: dict[str, str], content_type: str = "application/json"
) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def signed(dev: Device, method: str, target: str) -> dict[str, str]:
    return sign_request(
        dev.key,
        method,
        target,
        dev.user,
        dev.device,
        timestamp_ms=time.time_ns() // 1_000_000,
        nonce=b64(os.urandom(16)),
    )


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(MIXED)
def test_relay_answers_4xx_for_unicode_digits_in_headers_query_and_path(
    shared_relay: RelayProcess, registered: Device, blob_id: str, text: str
) -> None:
    port = shared_relay.port
    quoted = urllib.parse.quote(text, safe="")
    dev = registered
    # Auth headers: the timestamp and the device id.
    for name in ("X-Blindpost-Timestamp", "X-Blindpost-Device"):
        headers = {**signed(dev, "GET", "/v1/devices"), name: text}
        assert raw_status(port, "GET", "/v1/devices", headers) == 401
    # Query numbers, on an otherwise valid signed request.
    for query in (f"after={quoted}", f"limit={quoted}"):
        target = f"/v1/messages?{query}"
        assert raw_status(port, "GET", target, signed(dev, "GET", target)) == 400
    # Device ids in the path.
    for method, target in (
        ("DELETE", f"/v1/devices/{quoted}"),
        ("GET", f"/v1/keys/{dev.user}/{quoted}"),
    ):
        assert raw_status(port, method, target, signed(dev, method, target)) == 400
    # A Range header with such digits on a stored blob: a 416, not a 500.
    target = f"/v1/blobs/{blob_id}"
    status = raw_status(
        port, "GET", target, {**signed(dev, "GET", target), "Range": f"bytes={text}-"}
    )
    assert status == 416


async def frame_auth_close_code(url: str, frame: dict[str, object]) -> int | None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url + "/v1/ws", autoclose=False) as ws,
    ):
        await ws.send_str(json.dumps(frame))
        msg = await ws.receive(timeout=30)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
        return ws.close_code


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(MIXED, st.sampled_from(["timestamp", "device"]))
def test_websocket_auth_frame_with_unicode_digits_closes_4401(
    shared_relay: RelayProcess, registered: Device, text: str, field: str
) -> None:
    headers = signed(registered, "GET", "/v1/ws")
    frame: dict[str, object] = {
        "type": "auth",
        "user": registered.user,
        "device": headers["X-Blindpost-Device"],
        "timestamp": headers["X-Blindpost-Timestamp"],
        "nonce": headers["X-Blindpost-Nonce"],
        "signature": headers["X-Blindpost-Signature"],
        field: text,
    }
    assert asyncio.run(frame_auth_close_code(shared_relay.url, frame)) == 4401
