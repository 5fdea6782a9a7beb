"""Pure request builders and response parsers (no network): targets, bodies, error mapping."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e2ee.errors import TransportError, UsageError
from e2ee.transport import requests as rq
from e2ee.transport.auth import DeviceSigner, canonical_string
from e2ee.transport.errors import (
    AuthFailed,
    InvalidRequest,
    MailboxFull,
    MalformedResponse,
    MismatchedDevices,
    NotFound,
    RangeNotSatisfiable,
    RateLimited,
    RelayRejected,
    SenderShareExceeded,
    TooLarge,
    Unavailable,
    UsernameTaken,
    error_from_response,
)
from e2ee.transport.frames import Delivery, decode_send

MID = bytes(range(16))
MID_B64 = "AAECAwQFBgcICQoLDA0ODw=="
KEY = bytes(range(32, 64))


def ok(status: int = 200, body: Any = None, headers: dict[str, str] | None = None) -> rq.Response:
    raw = b"" if body is None else json.dumps(body).encode()
    return rq.Response(status, headers or {}, raw)


def test_register_builds_the_documented_request() -> None:
    req = rq.register("alice", 1, KEY)
    assert (req.method, req.target, req.accepted) == ("POST", "/v1/accounts", {201})
    assert json.loads(req.body) == {
        "username": "alice",
        "device_id": 1,
        "auth_key": base64.b64encode(KEY).decode(),
    }
    assert req.headers["Content-Type"] == "application/json"
    assert req.handle(ok(201, {"username": "alice", "device_id": 1})) == rq.Registered("alice", 1)


def test_auth_headers_sign_the_exact_body() -> None:
    import hashlib

    from nacl.signing import VerifyKey

    signer = DeviceSigner.from_seed(bytes(32), "alice", 1)
    req = rq.ack_messages([MID])
    headers = req.auth_headers(signer, now_ms=5, nonce="n" * 16)
    assert headers["Content-Type"] == "application/json"
    msg = canonical_string(
        "POST", "/v1/messages/ack", "alice", 1, 5, "n" * 16, hashlib.sha256(req.body).hexdigest()
    )
    VerifyKey(signer.public_key).verify(msg, base64.b64decode(headers["X-Blindpost-Signature"]))
    assert "X-Blindpost-Content-SHA256" not in headers


def test_ack_body_carries_settled_sends() -> None:
    """``POST /v1/messages/ack`` takes the ack frame's lists: without settled sends its body
    is the one of before; ``ids`` may be empty when some are settled; the answer counts
    the removed deliveries only."""
    other = bytes(range(16, 32))
    other_b64 = base64.b64encode(other).decode()
    assert rq.ack_messages([MID]).body == b'{"ids":["%s"]}' % MID_B64.encode()
    req = rq.ack_messages([MID], [other])
    assert (req.method, req.target) == ("POST", "/v1/messages/ack")
    assert json.loads(req.body) == {"ids": [MID_B64], "settled": [other_b64]}
    only = rq.ack_messages([], settled=[other] * 1000)
    assert json.loads(only.body) == {"settled": [other_b64] * 1000}
    assert only.handle(ok(200, {"acked": 0})) == 0


def test_blob_upload_signs_the_declared_digest() -> None:
    signer = DeviceSigner.from_seed(bytes(32), "alice", 1)
    req = rq.upload_blob("cd" * 32)
    headers = req.auth_headers(signer, now_ms=5, nonce="n" * 16)
    assert headers["X-Blindpost-Content-SHA256"] == "cd" * 32
    assert req.body == b"" and req.accepted == {200, 201}
    created = req.handle(ok(201, {"id": "cd" * 32, "size": 3}))
    assert created == rq.BlobInfo("cd" * 32, 3, True)
    assert not req.handle(ok(200, {"id": "cd" * 32, "size": 3})).created


def test_healthz_is_unsigned() -> None:
    signer = DeviceSigner.from_seed(bytes(32), "alice", 1)
    req = rq.healthz()
    assert req.auth_headers(signer) == {}
    assert req.handle(ok(200, {"status": "ok"})) is True


@pytest.mark.parametrize(
    ("req", "method", "target"),
    [
        (rq.list_devices(), "GET", "/v1/devices"),
        (rq.remove_device(7), "DELETE", "/v1/devices/7"),
        (rq.key_count(), "GET", "/v1/keys/count"),
        (rq.fetch_bundles("bob"), "GET", "/v1/keys/bob"),
        (rq.fetch_bundles("bob", 3), "GET", "/v1/keys/bob/3"),
        (rq.fetch_messages(), "GET", "/v1/messages?after=0&limit=100"),
        (rq.fetch_messages(12, 1000), "GET", "/v1/messages?after=12&limit=1000"),
        (rq.download_blob("ab" * 32), "GET", "/v1/blobs/" + "ab" * 32),
        (rq.download_blob("ab" * 32, method="HEAD"), "HEAD", "/v1/blobs/" + "ab" * 32),
        (rq.websocket_upgrade(), "GET", "/v1/ws"),
    ],
)
def test_targets(req: rq.Request[Any], method: str, target: str) -> None:
    assert (req.method, req.target, req.body) == (method, target, b"")


def test_send_binary_and_json_encodings() -> None:
    binary = rq.send_message(MID, [("bob", 1), ("bob", 2)], b"ct")
    assert binary.headers["Content-Type"] == "application/vnd.blindpost.send"
    frame = decode_send(binary.body)
    assert frame.recipients == (("bob", 1), ("bob", 2)) and frame.body == b"ct"
    as_json = rq.send_message(MID, [("bob", 1)], b"ct", encoding="json")
    assert json.loads(as_json.body) == {
        "id": MID_B64,
        "recipients": [{"user": "bob", "device": 1}],
        "body": base64.b64encode(b"ct").decode(),
    }
    receipt = binary.handle(ok(200, {"id": MID_B64, "recipients": 2, "stored_at": 9}))
    assert receipt == rq.SendReceipt(MID, 2, 9)


def test_mailbox_page_parsing() -> None:
    req = rq.fetch_messages()
    page = req.handle(
        ok(
            200,
            {
                "messages": [
                    {
                        "seq": 12,
                        "id": MID_B64,
                        "sender": {"user": "alice", "device": 1},
                        "stored_at": 5,
                        "body": base64.b64encode(b"ct").decode(),
                    }
                ],
                "more": True,
            },
        )
    )
    assert page.messages == (Delivery(12, MID, "alice", 1, 5, b"ct"),)
    assert page.more and page.last_seq == 12
    assert rq.MessagePage((), False).last_seq is None


def test_device_list_and_counts() -> None:
    devices = rq.list_devices().handle(
        ok(200, {"username": "a", "devices": [{"device_id": 1, "created_at": 3, "has_keys": True}]})
    )
    assert devices == (rq.DeviceInfo(1, 3, True),)
    assert rq.key_count().handle(ok(200, {"count": 4})) == 4
    assert rq.upload_keys({"identity_key": "x"}).handle(ok(200, {"count": 4})) == 4
    assert rq.ack_messages([MID]).handle(ok(200, {"acked": 1})) == 1
    assert rq.remove_device(1).handle(ok(200, {"removed": True})) is True
    bundles = rq.fetch_bundles("bob").handle(
        ok(200, {"username": "bob", "devices": [{"device_id": 1, "anything": "kept raw"}]})
    )
    assert bundles == [{"device_id": 1, "anything": "kept raw"}]


@pytest.mark.parametrize(
    ("status", "body", "headers", "cls", "attrs"),
    [
        (400, {"error": "invalid_request", "message": "m"}, {}, InvalidRequest, {}),
        (401, {"error": "auth_stale", "message": "m"}, {}, AuthFailed, {"stale": True}),
        (404, {"error": "unknown_user"}, {}, NotFound, {"code": "unknown_user"}),
        (409, {"error": "username_taken"}, {}, UsernameTaken, {}),
        (409, {"error": "device_exists"}, {}, RelayRejected, {"code": "device_exists"}),
        (
            409,
            {
                "error": "mismatched_devices",
                "unknown_users": ["c"],
                "missing_devices": {"b": [3]},
                "stale_devices": {"b": [2]},
            },
            {},
            MismatchedDevices,
            {"unknown_users": ("c",), "missing_devices": {"b": (3,)}, "stale_devices": {"b": (2,)}},
        ),
        (413, {"error": "too_large"}, {}, TooLarge, {}),
        (416, {"error": "range_not_satisfiable"}, {}, RangeNotSatisfiable, {}),
        (
            429,
            {"error": "rate_limited", "retry_after": 7},
            {},
            RateLimited,
            {"retry_after": 7, "retryable": True},
        ),
        (429, None, {"retry-after": "3"}, RateLimited, {"retry_after": 3}),
        (
            507,
            {"error": "mailbox_full", "full": [{"user": "bob", "device": 1}]},
            {},
            MailboxFull,
            {"full": (("bob", 1),)},
        ),
        (
            507,
            {"error": "sender_share_exceeded", "full": [{"user": "bob", "device": 2}]},
            {},
            SenderShareExceeded,
            {"full": (("bob", 2),), "code": "sender_share_exceeded", "retryable": True},
        ),
        (503, None, {}, Unavailable, {"code": "unknown", "retryable": True, "retry_after": None}),
        (
            503,
            {"error": "storage_unavailable"},
            {"retry-after": "2"},
            Unavailable,
            {"retry_after": 2},
        ),
        (502, None, {}, Unavailable, {"retryable": True}),
        (500, None, {}, RelayRejected, {"retryable": True}),
    ],
)
def test_error_mapping(
    status: int, body: Any, headers: dict[str, str], cls: type, attrs: dict[str, Any]
) -> None:
    with pytest.raises(cls) as exc:
        rq.key_count().handle(ok(status, body, headers))
    assert type(exc.value) is cls and exc.value.status == status
    assert isinstance(exc.value, TransportError)
    for name, value in attrs.items():
        assert getattr(exc.value, name) == value


def test_error_body_need_not_be_json() -> None:
    resp = rq.Response(502, {}, b"<html>bad gateway</html>")
    with pytest.raises(RelayRejected) as exc:
        rq.key_count().handle(resp)
    assert exc.value.status == 502
    assert "<html>" not in str(exc.value)  # bodies never reach messages


@given(
    st.integers(100, 599),
    st.dictionaries(
        st.text(max_size=15),
        st.none() | st.integers() | st.text(max_size=5) | st.lists(st.integers(), max_size=3),
        max_size=6,
    ),
)
def test_error_mapping_never_fails(status: int, body: dict[str, Any]) -> None:
    assert isinstance(error_from_response(status, body), RelayRejected)


@pytest.mark.parametrize(
    "raw",
    [b"", b"nope", b"[]", b'{"count": "3"}', b'{"count": -1}', b'{"count": true}'],
)
def test_malformed_success_bodies(raw: bytes) -> None:
    with pytest.raises(MalformedResponse):
        rq.key_count().handle(rq.Response(200, {}, raw))


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [], "more": "no"},
        {"messages": [{"seq": 1}], "more": False},
        {
            "messages": [
                {
                    "seq": 1,
                    "id": "AAAA",
                    "sender": {"user": "al", "device": 1},
                    "stored_at": 1,
                    "body": "",
                }
            ],
            "more": False,
        },
        {
            "messages": [
                {
                    "seq": 1,
                    "id": MID_B64,
                    "sender": {"user": "alice", "device": 0},
                    "stored_at": 1,
                    "body": "",
                }
            ],
            "more": False,
        },
    ],
)
def test_malformed_pages(body: Any) -> None:
    with pytest.raises(MalformedResponse):
        rq.fetch_messages().handle(ok(200, body))


def test_content_range() -> None:
    req = rq.download_blob("ab" * 32, start=10)
    assert req.headers == {"Range": "bytes=10-"}
    info = req.handle(rq.Response(206, {"content-range": "bytes 10-19/20", "content-length": "10"}))
    assert info == rq.BlobRange(206, 10, 10, 20)
    whole = req.handle(rq.Response(200, {"content-length": "20"}))
    assert whole == rq.BlobRange(200, 0, 20, 20)
    with pytest.raises(MalformedResponse):
        req.handle(rq.Response(206, {"content-range": "bytes 0-19/20"}))  # wrong start
    with pytest.raises(MalformedResponse):
        rq.parse_content_range("bytes 5-3/20")
    assert rq.parse_content_range("bytes 0-0/*") == (0, 0, None)
    assert rq.unsatisfied_range_total(rq.Response(416, {"content-range": "bytes */20"})) == 20
    assert rq.unsatisfied_range_total(rq.Response(416, {})) is None


@pytest.mark.parametrize(
    "build",
    [
        lambda: rq.register("Alice", 1, KEY),
        lambda: rq.register("alice", 1, b"short"),
        lambda: rq.add_device(0, KEY),
        lambda: rq.remove_device(200),
        lambda: rq.upload_keys({"registration_id": 1}),
        lambda: rq.upload_keys({"identity_key": float("nan")}),
        lambda: rq.fetch_bundles("x"),
        lambda: rq.fetch_bundles("count"),  # reserved: GET /v1/keys/count is another route
        lambda: rq.fetch_messages(-1),
        lambda: rq.fetch_messages(0, 1001),
        lambda: rq.fetch_messages(0, 0),
        lambda: rq.ack_messages([]),
        lambda: rq.ack_messages([MID] * 1001),
        lambda: rq.ack_messages([], []),
        lambda: rq.ack_messages([], [b"short"]),
        lambda: rq.ack_messages([MID], [MID] * 1001),
        lambda: rq.send_message(MID, [], b""),
        lambda: rq.send_message(MID, [("bob", 1)], b"", encoding="xml"),  # type: ignore[arg-type]
        lambda: rq.upload_blob("AB" * 32),
        lambda: rq.download_blob("../etc/passwd"),
        lambda: rq.download_blob("ab" * 32, start=-1),
        lambda: rq.download_blob("ab" * 32, method="POST"),
    ],
)
def test_builders_reject_bad_arguments(build: Any) -> None:
    with pytest.raises(UsageError):
        build()
