"""Binary SEND/DELIVER frames and JSON control frames (pure): known answers, round trips, fuzz."""

from __future__ import annotations

import contextlib
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindpost_wire.names import MAX_DEVICE_ID
from e2ee.errors import TransportError, UsageError
from e2ee.transport.errors import (
    InvalidRequest,
    MalformedFrame,
    MismatchedDevices,
    RateLimited,
    Unavailable,
)
from e2ee.transport.frames import (
    Acked,
    Delivery,
    Hint,
    QueueEmpty,
    SendFrame,
    SendResult,
    ServerError,
    UnknownControl,
    decode_control,
    decode_deliver,
    decode_send,
    decode_server_frame,
    encode_ack,
    encode_control,
    encode_deliver,
    encode_send,
)

MID = bytes(range(16))
MID_B64 = "AAECAwQFBgcICQoLDA0ODw=="

SEND_KAT = bytes.fromhex(
    "02"  # op SEND
    "000102030405060708090a0b0c0d0e0f"  # message id
    "0002"  # two recipients
    "03"
    "626f62"
    "01"  # "bob", device 1
    "05"
    "6361726f6c"
    "02"  # "carol", device 2
    "6869"  # body "hi"
)

DELIVER_KAT = bytes.fromhex(
    "01"  # op DELIVER
    "0000000000000005"  # seq 5
    "11111111111111111111111111111111"  # message id
    "0000019370ecfe00"  # stored_at 1732766400000 ms
    "05"
    "616c696365"  # "alice"
    "7f"  # device 127
    "00ff"  # body
)

usernames = st.from_regex(r"[a-z0-9_]{3,32}", fullmatch=True)
devices = st.integers(min_value=1, max_value=MAX_DEVICE_ID)
ids = st.binary(min_size=16, max_size=16)


def test_send_known_answer() -> None:
    assert encode_send(MID, [("bob", 1), ("carol", 2)], b"hi") == SEND_KAT
    assert decode_send(SEND_KAT) == SendFrame(MID, (("bob", 1), ("carol", 2)), b"hi")


def test_deliver_known_answer() -> None:
    d = decode_deliver(DELIVER_KAT)
    assert d == Delivery(5, b"\x11" * 16, "alice", 127, 1732766400000, b"\x00\xff")
    assert encode_deliver(d) == DELIVER_KAT


def test_delivery_repr_hides_body() -> None:
    d = Delivery(1, MID, "alice", 1, 0, b"secret-ciphertext")
    assert "secret" not in repr(d)


def test_deliver_with_empty_body() -> None:
    d = decode_deliver(DELIVER_KAT[:-2])
    assert d.body == b""


@given(
    ids,
    st.lists(st.tuples(usernames, devices), min_size=1, max_size=40, unique=True),
    st.binary(max_size=2048),
)
def test_send_round_trip(mid: bytes, recipients: list[tuple[str, int]], body: bytes) -> None:
    frame = encode_send(mid, recipients, body)
    assert decode_send(frame) == SendFrame(mid, tuple(recipients), body)


@given(
    st.integers(0, 2**64 - 1),
    ids,
    usernames,
    devices,
    st.integers(0, 2**64 - 1),
    st.binary(max_size=2048),
)
def test_deliver_round_trip(
    seq: int, mid: bytes, user: str, device: int, stored: int, body: bytes
) -> None:
    d = Delivery(seq, mid, user, device, stored, body)
    assert decode_deliver(encode_deliver(d)) == d
    assert decode_server_frame(encode_deliver(d), binary=True) == d


@given(st.binary(max_size=300))
def test_deliver_decoder_fuzz_raises_only_malformed_frame(data: bytes) -> None:
    with contextlib.suppress(MalformedFrame):
        decode_deliver(data)


@given(st.binary(max_size=300))
def test_send_decoder_fuzz_raises_only_malformed_frame(data: bytes) -> None:
    with contextlib.suppress(MalformedFrame):
        decode_send(data)


@given(st.binary(min_size=1, max_size=300), st.integers(0, 299))
def test_mutated_deliver_frames(noise: bytes, at: int) -> None:
    """Flip bytes and truncate a valid frame: still only typed errors."""
    frame = bytearray(DELIVER_KAT)
    for i, b in enumerate(noise[:8]):
        frame[(at + i * 7) % len(frame)] ^= b
    for cut in (len(frame), at % (len(frame) + 1)):
        with contextlib.suppress(MalformedFrame):
            decode_deliver(bytes(frame[:cut]))


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x01",
        DELIVER_KAT[:33],  # no sender length
        DELIVER_KAT[: 34 + 3],  # name truncated
        DELIVER_KAT[:39],  # device id missing
        b"\x02" + DELIVER_KAT[1:],  # wrong op
        DELIVER_KAT[:33] + b"\x05ALICE\x01",  # not a valid username
        DELIVER_KAT[:33] + b"\x05alice\x00",  # device 0
        DELIVER_KAT[:33] + b"\x05alice\x80",  # device 128
        DELIVER_KAT[:33] + b"\x05al\xffce\x01",  # not ASCII
    ],
)
def test_malformed_deliver_frames(frame: bytes) -> None:
    with pytest.raises(MalformedFrame):
        decode_deliver(frame)


def test_malformed_frame_is_a_transport_error() -> None:
    assert issubclass(MalformedFrame, TransportError)


@pytest.mark.parametrize(
    "frame",
    [
        SEND_KAT[:18],
        SEND_KAT[:17] + b"\x00\x00" + b"body",  # zero recipients
        SEND_KAT[:17] + b"\x00\x02\x03bob\x01\x03bob\x01",  # duplicate
        SEND_KAT[:17] + b"\x00\x03" + SEND_KAT[19:],  # count larger than the list
    ],
)
def test_malformed_send_frames(frame: bytes) -> None:
    with pytest.raises(MalformedFrame):
        decode_send(frame)


@pytest.mark.parametrize(
    ("mid", "recipients", "body"),
    [
        (b"short", [("bob", 1)], b""),
        (MID, [], b""),
        (MID, [("bob", 1), ("bob", 1)], b""),
        (MID, [("Bob", 1)], b""),
        (MID, [("bob", 0)], b""),
        (MID, [("bob", 1)], "text"),
        (MID, [("bob",)], b""),
    ],
)
def test_encode_send_rejects_bad_arguments(mid: bytes, recipients: list, body: object) -> None:
    with pytest.raises(UsageError):
        encode_send(mid, recipients, body)  # type: ignore[arg-type]


# -- control frames ---------------------------------------------------------------------------


def test_control_known_answers() -> None:
    assert decode_control('{"type":"hint","waiting":3}') == Hint(3)
    assert decode_control('{"type":"empty"}') == QueueEmpty()
    assert decode_control('{"type":"acked","ref":"r1","count":2}') == Acked("r1", 2)
    assert decode_control('{"type":"error","error":"bad_frame","message":"x"}') == ServerError(
        "bad_frame", "x"
    )
    refused = decode_control(
        '{"type":"error","error":"storage_unavailable","message":"m","status":503,"ref":"a7"}'
    )
    assert refused == ServerError("storage_unavailable", "m", 503, "a7")
    assert isinstance(refused.exception(), Unavailable)
    assert decode_control(encode_control(refused)) == refused
    assert isinstance(ServerError("bad_frame", "x").exception(), InvalidRequest)
    with pytest.raises(MalformedFrame):
        decode_control('{"type":"error","error":"x","message":"m","status":200}')
    ok = decode_control(
        f'{{"type":"send_result","id":"{MID_B64}","status":200,"recipients":2,"stored_at":7}}'
    )
    assert ok == SendResult(MID, 200, recipients=2, stored_at=7)
    assert ok.ok and ok.exception() is None
    assert decode_control('{"type":"shiny_new","x":1}') == UnknownControl("shiny_new")


def test_send_result_errors_map_to_http_error_types() -> None:
    doc = {
        "type": "send_result",
        "id": MID_B64,
        "status": 409,
        "error": "mismatched_devices",
        "message": "m",
        "unknown_users": ["carol"],
        "missing_devices": {"bob": [3]},
        "stale_devices": {"bob": [2]},
    }
    res = decode_control(json.dumps(doc))
    assert isinstance(res, SendResult) and not res.ok
    exc = res.exception()
    assert isinstance(exc, MismatchedDevices)
    assert exc.unknown_users == ("carol",)
    assert exc.missing_devices == {"bob": (3,)}
    assert exc.stale_devices == {"bob": (2,)}
    limited = decode_control(
        json.dumps(
            {
                "type": "send_result",
                "id": MID_B64,
                "status": 429,
                "error": "rate_limited",
                "message": "",
                "retry_after": 4,
            }
        )
    )
    assert isinstance(limited, SendResult)
    exc2 = limited.exception()
    assert isinstance(exc2, RateLimited) and exc2.retry_after == 4


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "[]",
        '"hint"',
        "{}",
        '{"type":5}',
        '{"type":"hint"}',
        '{"type":"hint","waiting":-1}',
        '{"type":"hint","waiting":true}',
        '{"type":"hint","waiting":"3"}',
        '{"type":"acked","count":1}',
        '{"type":"acked","ref":"r","count":null}',
        '{"type":"send_result","id":"AAAA","status":200,"recipients":1,"stored_at":1}',
        f'{{"type":"send_result","id":"{MID_B64}","status":200}}',
        f'{{"type":"send_result","id":"{MID_B64}","status":99}}',
        f'{{"type":"send_result","id":"{MID_B64}","status":409,"error":7}}',
        '{"type":"send_result","id":"AAECAwQFBgcICQoLDA0ODw","status":200}',  # no padding
        b"\xff\xfe",
        "[" * 100000,
    ],
)
def test_malformed_control_frames(text: str | bytes) -> None:
    with pytest.raises(MalformedFrame):
        decode_control(text)


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_control_decoder_fuzz(text: str | bytes) -> None:
    with contextlib.suppress(MalformedFrame):
        decode_control(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.sampled_from(["hint", "empty", "send_result", "acked", "error"]),
    st.dictionaries(
        st.sampled_from(
            [
                "waiting",
                "id",
                "status",
                "recipients",
                "stored_at",
                "ref",
                "count",
                "error",
                "message",
                "retry_after",
            ]
        ),
        json_values,
        max_size=8,
    ),
)
def test_control_decoder_structured_fuzz(kind: str, fields: dict) -> None:
    with contextlib.suppress(MalformedFrame):
        decode_control(json.dumps({"type": kind, **fields}))


control_frames = st.one_of(
    st.builds(Hint, st.integers(0, 2**63)),
    st.just(QueueEmpty()),
    st.builds(Acked, st.text(min_size=1, max_size=64), st.integers(0, 1000)),
    st.builds(ServerError, st.text(max_size=20), st.text(max_size=40)),
    st.builds(
        lambda mid, n, t: SendResult(mid, 200, recipients=n, stored_at=t),
        ids,
        st.integers(0, 2000),
        st.integers(0, 2**63),
    ),
    st.builds(
        lambda mid, r: SendResult(mid, 429, error="rate_limited", message="slow", retry_after=r),
        ids,
        st.integers(1, 3600),
    ),
)


@given(control_frames)
def test_control_round_trip(frame: Hint | QueueEmpty | Acked | ServerError | SendResult) -> None:
    text = encode_control(frame)
    assert decode_control(text) == frame
    assert decode_server_frame(text, binary=False) == frame


def test_encode_ack() -> None:
    assert json.loads(encode_ack([MID], ref="r7")) == {"type": "ack", "ids": [MID_B64], "ref": "r7"}
    assert json.loads(encode_ack([MID])) == {"type": "ack", "ids": [MID_B64]}
    # Nothing to settle: byte for byte the frame of before.
    assert encode_ack([MID], "r7", ()) == f'{{"type":"ack","ids":["{MID_B64}"],"ref":"r7"}}'


OTHER = bytes(range(16, 32))
OTHER_B64 = "EBESExQVFhcYGRobHB0eHw=="


def test_encode_ack_carries_settled_sends() -> None:
    """Our own sends the relay may forget ride in ``settled``; ``ids`` may then be empty
    (an empty list is left out)."""
    assert json.loads(encode_ack([MID], "r1", [OTHER])) == {
        "type": "ack",
        "ids": [MID_B64],
        "settled": [OTHER_B64],
        "ref": "r1",
    }
    assert json.loads(encode_ack([], "r2", settled=[OTHER, MID])) == {
        "type": "ack",
        "settled": [OTHER_B64, MID_B64],
        "ref": "r2",
    }
    full = encode_ack([MID] * 1000, settled=[OTHER] * 1000)  # 1000 of each is allowed
    assert [len(v) for k, v in json.loads(full).items() if k != "type"] == [1000, 1000]


@pytest.mark.parametrize(
    ("ids_", "ref"),
    [([], None), ([b"x"], None), ([MID] * 1001, None), ([MID], ""), ([MID], "r" * 65)],
)
def test_encode_ack_rejects_bad_arguments(ids_: list[bytes], ref: str | None) -> None:
    with pytest.raises(UsageError):
        encode_ack(ids_, ref)


@pytest.mark.parametrize(
    ("ids_", "settled"),
    [
        ([], []),  # nothing at all
        ([], [b"short"]),  # not 16 bytes
        ([MID], ["not bytes"]),
        ([], [MID] * 1001),  # over MAX_ACK_IDS
        ([MID] * 1001, [MID]),
    ],
)
def test_encode_ack_rejects_bad_settled_lists(ids_: list[bytes], settled: list[object]) -> None:
    with pytest.raises(UsageError):
        encode_ack(ids_, "r", settled)  # type: ignore[arg-type]


def test_deliver_layout_offsets_match_spec_table() -> None:
    """Offsets of section 5's table, read back with struct independently of the decoder."""
    frame = encode_deliver(Delivery(9, MID, "bob", 4, 1234, b"payload"))
    op, seq = struct.unpack_from(">BQ", frame, 0)
    assert (op, seq) == (1, 9)
    assert frame[9:25] == MID
    assert struct.unpack_from(">Q", frame, 25)[0] == 1234
    assert frame[33] == 3 and frame[34:37] == b"bob" and frame[37] == 4
    assert frame[38:] == b"payload"
