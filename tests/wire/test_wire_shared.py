"""The relay and the SDK speak through the same codec: identical bytes, both directions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import blindpost_wire.close as close
import blindpost_wire.frames as frames
import blindpost_wire.names as names
from e2ee.errors import UsageError
from e2ee.transport import auth as sdk_auth
from e2ee.transport import frames as sdk
from e2ee.transport import ws as sdk_ws
from e2ee.transport.errors import MalformedFrame
from relay import hub as relay_hub
from relay import wire as relay
from relay.errors import BadRequest, TooLarge
from relay.store.base import Address, Envelope, StoredMessage

usernames = st.from_regex(names.USERNAME_PATTERN, fullmatch=True)
devices = st.integers(min_value=1, max_value=names.MAX_DEVICE_ID)
ids = st.binary(min_size=16, max_size=16)
u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
recipient_lists = st.lists(st.tuples(usernames, devices), min_size=1, max_size=10, unique=True)


@given(ids, recipient_lists, st.binary(max_size=200))
def test_send_frames_are_identical_and_cross_decode(
    mid: bytes, recipients: list[tuple[str, int]], body: bytes
) -> None:
    from_sdk = sdk.encode_send(mid, recipients, body)
    env = Envelope(mid, tuple(Address(u, d) for u, d in recipients), body)
    from_relay = relay.encode_send(env)
    assert from_sdk == from_relay == frames.encode_send(mid, recipients, body)
    assert relay.decode_send(from_sdk, max_recipients=10, max_body=200) == env
    assert sdk.decode_send(from_relay) == sdk.SendFrame(mid, tuple(recipients), body)


@given(u64, ids, usernames, devices, u64, st.binary(max_size=200))
def test_deliver_frames_are_identical_and_cross_decode(
    seq: int, mid: bytes, user: str, device: int, stored_at: int, body: bytes
) -> None:
    msg = StoredMessage(seq, mid, Address(user, device), stored_at, body)
    delivery = sdk.Delivery(seq, mid, user, device, stored_at, body)
    from_relay = relay.encode_deliver(msg)
    assert from_relay == sdk.encode_deliver(delivery)
    assert sdk.decode_deliver(from_relay) == delivery
    assert relay.decode_deliver(sdk.encode_deliver(delivery)) == msg


@pytest.mark.parametrize(
    ("frame", "relay_error", "relay_code"),
    [
        (b"\x02" + b"\x00" * 16 + b"\x00\x01\x03BOB\x01", BadRequest, "invalid_username"),
        (b"\x02" + b"\x00" * 16 + b"\x00\x01\x03bob\x00", BadRequest, "invalid_request"),
        (b"\x02" + b"\x00" * 10, BadRequest, "invalid_request"),
        (b"\x02" + b"\x00" * 16 + b"\x00\x01\x03bob\x01" + b"x" * 11, TooLarge, "too_large"),
    ],
)
def test_each_side_maps_the_neutral_error_to_its_own(
    frame: bytes, relay_error: type[Exception], relay_code: str
) -> None:
    with pytest.raises(relay_error) as info:
        relay.decode_send(frame, max_recipients=5, max_body=10)
    assert getattr(info.value, "code", None) == relay_code
    assert isinstance(info.value.__cause__, frames.WireError)
    if relay_error is BadRequest:  # the SDK has no body limit of its own
        with pytest.raises(MalformedFrame) as sdk_info:
            sdk.decode_send(frame)
        assert isinstance(sdk_info.value.__cause__, frames.WireError)


def test_both_sides_use_the_shared_constants() -> None:
    assert relay.OP_SEND is frames.OP_SEND and sdk.OP_SEND is frames.OP_SEND
    assert relay.OP_DELIVER is frames.OP_DELIVER and sdk.OP_DELIVER is frames.OP_DELIVER
    assert relay.MESSAGE_ID_LEN is frames.MESSAGE_ID_LEN is sdk.MESSAGE_ID_LEN
    assert relay.MAX_DEVICE_ID is names.MAX_DEVICE_ID
    assert relay.USERNAME_RE is names.USERNAME_RE
    assert relay.RESERVED_USERNAMES is names.RESERVED_USERNAMES
    for code in ("CLOSE_REPLACED", "CLOSE_UNAUTHENTICATED"):
        assert getattr(relay_hub, code) == getattr(sdk_ws, code) == getattr(close, code)
    assert sdk_ws.CLOSE_REMOVED == relay_hub.CLOSE_DEVICE_REMOVED == close.CLOSE_DEVICE_REMOVED


@given(st.text(max_size=40) | usernames, st.integers(-5, 300))
def test_username_and_device_rules_agree(user: str, device: int) -> None:
    relay_ok = True
    try:
        relay.parse_username(user)
    except BadRequest:
        relay_ok = False
    sdk_ok = True
    try:
        sdk_auth.check_username(user)
    except UsageError:
        sdk_ok = False
    assert relay_ok is sdk_ok is names.is_username(user)
    relay_dev = True
    try:
        relay.parse_device_id(device)
    except BadRequest:
        relay_dev = False
    sdk_dev = True
    try:
        sdk_auth.check_device_id(device)
    except UsageError:
        sdk_dev = False
    assert relay_dev is sdk_dev is names.is_device_id(device)
