"""blindpost_wire's frame codec on its own: round trips, known bytes, and fuzzed input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blindpost_wire import frames
from blindpost_wire.frames import WireError
from blindpost_wire.names import (
    MAX_DEVICE_ID,
    MIN_DEVICE_ID,
    USERNAME_PATTERN,
    is_device_id,
    is_username,
)

usernames = st.from_regex(USERNAME_PATTERN, fullmatch=True)
devices = st.integers(min_value=MIN_DEVICE_ID, max_value=MAX_DEVICE_ID)
ids = st.binary(min_size=16, max_size=16)
u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
recipient_lists = st.lists(st.tuples(usernames, devices), min_size=1, max_size=20, unique=True)


def _pair(user: str, device: int) -> tuple[str, int]:
    return (user, device)


@given(ids, recipient_lists, st.binary(max_size=300))
def test_send_round_trips(mid: bytes, recipients: list[tuple[str, int]], body: bytes) -> None:
    frame = frames.encode_send(mid, recipients, body)
    assert frame[0] == frames.OP_SEND
    assert frames.decode_send(frame, address=_pair) == (mid, tuple(recipients), body)


@given(ids, st.one_of(st.none(), ids), recipient_lists, st.binary(max_size=300))
def test_send_and_send_after_round_trip(
    mid: bytes, after: bytes | None, recipients: list[tuple[str, int]], body: bytes
) -> None:
    frame = frames.encode_send(mid, recipients, body, after=after)
    assert frame[0] == (frames.OP_SEND if after is None else frames.OP_SEND_AFTER)
    decoded = frames.decode_send_frame(frame, address=_pair)
    assert decoded == (mid, after, tuple(recipients), body)
    if after is not None:  # the SEND-only decoder does not drop the condition silently
        with pytest.raises(WireError):
            frames.decode_send(frame, address=_pair)


def test_known_send_after_bytes() -> None:
    frame = frames.encode_send(b"\x11" * 16, [("bob", 2)], b"\xff", after=b"\x22" * 16)
    assert frame == b"\x03" + b"\x11" * 16 + b"\x22" * 16 + b"\x00\x01" + b"\x03bob\x02\xff"
    with pytest.raises(WireError):
        frames.encode_send(b"\x11" * 16, [("bob", 2)], b"", after=b"\x22" * 15)


@given(u64, ids, usernames, devices, u64, st.binary(max_size=300))
def test_deliver_round_trips(
    seq: int, mid: bytes, user: str, device: int, stored_at: int, body: bytes
) -> None:
    frame = frames.encode_deliver(seq, mid, user, device, stored_at, body)
    assert frame[0] == frames.OP_DELIVER
    assert frames.decode_deliver(frame) == (seq, mid, user, device, stored_at, body)


def test_known_send_bytes() -> None:
    frame = frames.encode_send(b"\x11" * 16, [("bob", 2), ("carol", 127)], b"\xff")
    assert frame == (
        b"\x02" + b"\x11" * 16 + b"\x00\x02" + b"\x03bob\x02" + b"\x05carol\x7f" + b"\xff"
    )


def test_known_deliver_bytes() -> None:
    frame = frames.encode_deliver(5, b"\x22" * 16, "alice", 1, 7, b"x")
    assert frame == struct.pack(">BQ16sQ", 1, 5, b"\x22" * 16, 7) + b"\x05alice\x01x"


@given(st.binary(max_size=120))
def test_decoders_raise_only_wire_error(data: bytes) -> None:
    for decode in (
        lambda: frames.decode_send(data, address=_pair, max_recipients=10, max_body=50),
        lambda: frames.decode_send_frame(data, address=_pair, max_recipients=10, max_body=50),
        lambda: frames.decode_send_frame(b"\x03" + data, address=_pair),
        lambda: frames.decode_deliver(data),
    ):
        try:
            decode()
        except WireError as exc:
            assert exc.code in {"malformed", "invalid_username", "too_large"}


@given(ids, recipient_lists, st.binary(max_size=60), st.data())
def test_truncated_send_frames_are_refused(
    mid: bytes, recipients: list[tuple[str, int]], body: bytes, data: st.DataObject
) -> None:
    frame = frames.encode_send(mid, recipients, body)
    # Cutting inside the header or the recipient list always leaves a malformed frame.
    head = frames.SEND_HEAD_LEN + sum(len(u) + 2 for u, _ in recipients)
    cut = data.draw(st.integers(min_value=0, max_value=head - 1))
    with pytest.raises(WireError) as info:
        frames.decode_send(frame[:cut], address=_pair)
    assert info.value.code == "malformed"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x01" + b"\x00" * 18, "malformed"),  # wrong op for SEND
        (b"\x02" + b"\x00" * 16 + b"\x00\x00", "malformed"),  # no recipients
        (b"\x02" + b"\x00" * 16 + b"\x00\x01\x03BOB\x01", "invalid_username"),
        (b"\x02" + b"\x00" * 16 + b"\x00\x01\x03bob\x00", "malformed"),  # device 0
        (b"\x02" + b"\x00" * 16 + b"\x00\x01\x03bob\x80", "malformed"),  # device 128
        (b"\x02" + b"\x00" * 16 + b"\x00\x02\x03bob\x01\x03bob\x01", "malformed"),  # dup
        (b"\x02" + b"\x00" * 16 + b"\x00\x01\x03bob\x01" + b"x" * 11, "too_large"),
    ],
)
def test_bad_send_frames_name_their_fault(frame: bytes, code: str) -> None:
    with pytest.raises(WireError) as info:
        frames.decode_send(frame, address=_pair, max_recipients=5, max_body=10)
    assert info.value.code == code


def test_recipient_count_over_the_limit_is_refused() -> None:
    frame = frames.encode_send(b"\x00" * 16, [("bob", d) for d in range(1, 4)], b"")
    with pytest.raises(WireError, match=r"1\.\.2"):
        frames.decode_send(frame, address=_pair, max_recipients=2)


@pytest.mark.parametrize(
    "args",
    [
        (b"short", [("bob", 1)], b""),  # id not 16 bytes
        (b"\x00" * 16, [("bob", 256)], b""),  # device does not fit a byte
        (b"\x00" * 16, [("b" * 256, 1)], b""),  # name longer than 255
        (b"\x00" * 16, [("böb", 1)], b""),  # not ASCII
    ],
)
def test_encode_send_refuses_values_that_do_not_fit(
    args: tuple[bytes, list[tuple[str, int]], bytes],
) -> None:
    with pytest.raises(WireError):
        frames.encode_send(*args)


def test_encode_deliver_refuses_values_that_do_not_fit() -> None:
    with pytest.raises(WireError):
        frames.encode_deliver(-1, b"\x00" * 16, "bob", 1, 0, b"")
    with pytest.raises(WireError):
        frames.encode_deliver(0, b"\x00" * 15, "bob", 1, 0, b"")


@given(st.text(max_size=40) | usernames)
def test_username_rule(value: str) -> None:
    expected = 3 <= len(value) <= 32 and all(
        c in "abcdefghijklmnopqrstuvwxyz0123456789_" for c in value
    )
    assert is_username(value) is expected


def test_device_id_rule() -> None:
    assert [d for d in range(-2, 300) if is_device_id(d)] == list(range(1, 128))
    assert not is_device_id(True)
    assert not is_device_id("5")
