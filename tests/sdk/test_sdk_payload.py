"""The plaintext payload format: round trips, padding buckets, hostile input."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2ee.errors import InvalidMessage, UsageError
from e2ee.payload import (
    MAX_PAYLOAD_BYTES,
    PAD_BUCKET,
    AttachmentPointer,
    GroupAction,
    GroupControl,
    Payload,
    PayloadType,
    Quote,
    ReceiptKind,
    UnsupportedPayload,
    decode,
    encode,
    pad,
    unpad,
)

ids = st.binary(min_size=16, max_size=16)
names = st.text(min_size=1, max_size=32)
u63 = st.integers(min_value=0, max_value=2**63 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
texts = st.text(max_size=300)

quotes = st.builds(Quote, message_id=ids, author=names, text=texts)
attachments = st.builds(
    AttachmentPointer,
    blob_id=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    key=st.binary(min_size=32, max_size=32),
    digest=st.binary(min_size=32, max_size=32),
    size=u63,
    mime_type=st.sampled_from(["image/png", "video/mp4", "application/pdf", ""]),
    file_name=st.text(max_size=40),
)


@st.composite
def group_controls(draw: st.DrawFn) -> GroupControl:
    action = draw(st.sampled_from(GroupAction))
    return GroupControl(
        action=action,
        name=draw(st.text(max_size=40)),
        members=tuple(draw(st.lists(names, max_size=8))),
        admins=tuple(draw(st.lists(names, max_size=3))),
        revision=draw(u63),
        targets=tuple(draw(st.lists(names, max_size=3))),
        distribution=draw(
            st.binary(min_size=1 if action is GroupAction.SENDER_KEY else 0, max_size=200)
        ),
    )


@st.composite
def payloads(draw: st.DrawFn) -> Payload:
    kind = draw(st.sampled_from([k for k in PayloadType if k.value <= PayloadType.SESSION_RESET]))
    one_target = kind in (PayloadType.REACTION, PayloadType.EDIT, PayloadType.DELETE)
    if one_target:
        targets = (draw(ids),)
    elif kind is PayloadType.RECEIPT:
        targets = tuple(draw(st.lists(ids, min_size=1, max_size=5)))
    else:
        targets = tuple(draw(st.lists(ids, max_size=2)))
    text_min = 1 if kind in (PayloadType.TEXT, PayloadType.EDIT) else 0
    return Payload(
        type=kind,
        message_id=draw(ids),
        sent_at_ms=draw(u63),
        counter=draw(u63),
        group_id=draw(names) if kind is PayloadType.GROUP else draw(st.text(max_size=20)),
        text=draw(st.text(min_size=text_min, max_size=300)),
        quote=draw(st.none() | quotes),
        target_ids=targets,
        receipt=draw(st.sampled_from(ReceiptKind)) if kind is PayloadType.RECEIPT else None,
        reaction=draw(st.text(max_size=4)),
        typing=draw(st.booleans()),
        attachment=draw(attachments) if kind is PayloadType.ATTACHMENT else None,
        group=draw(group_controls()) if kind is PayloadType.GROUP else None,
        timer_seconds=draw(u32),
        expire_seconds=draw(u32),
    )


@given(payloads())
@settings(max_examples=300)
def test_every_payload_round_trips_and_is_bucket_padded(payload: Payload) -> None:
    data = encode(payload)
    assert len(data) % PAD_BUCKET == 0
    assert decode(data) == payload
    assert encode(payload) == data  # deterministic


@given(st.binary(max_size=1000))
def test_padding_round_trips_and_always_adds_a_byte(data: bytes) -> None:
    padded = pad(data)
    assert len(padded) % PAD_BUCKET == 0 and len(padded) > len(data)
    assert unpad(padded) == data


def test_short_messages_share_one_length() -> None:
    """An observer cannot tell "ok" from a 100-character sentence."""
    mid = os.urandom(16)
    short = encode(Payload(PayloadType.TEXT, mid, 1, counter=1, text="ok"))
    longer = encode(Payload(PayloadType.TEXT, mid, 1, counter=1, text="x" * 100))
    assert len(short) == len(longer) == PAD_BUCKET


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_decode_of_random_bytes_raises_only_invalid_message(data: bytes) -> None:
    with contextlib.suppress(InvalidMessage):
        decode(data)


@given(payloads(), st.data())
@settings(max_examples=200)
def test_decode_of_mutated_payload_is_typed(payload: Payload, data: st.DataObject) -> None:
    encoded = bytearray(encode(payload))
    index = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[index] ^= data.draw(st.integers(min_value=1, max_value=255))
    try:
        decoded = decode(bytes(encoded))
    except InvalidMessage:
        return
    assert isinstance(decoded, Payload)


def test_unknown_version_is_reported_as_unsupported() -> None:
    data = bytearray(encode(Payload(PayloadType.TYPING, os.urandom(16), 5)))
    data[0] = 2
    with pytest.raises(UnsupportedPayload) as info:
        decode(bytes(data))
    assert info.value.version == 2


def test_unknown_type_and_missing_fields_are_invalid() -> None:
    good = encode(Payload(PayloadType.TYPING, b"\x01" * 16, 5))
    # Content with type = 99 and a message id.
    body = bytes([1, 0x08, 99, 0x12, 16]) + b"\x01" * 16
    with pytest.raises(InvalidMessage):
        decode(pad(body))
    with pytest.raises(InvalidMessage):
        decode(pad(bytes([1, 0x08, 1])))  # TEXT without id or text
    with pytest.raises(InvalidMessage):
        decode(good[:-1])  # not a whole bucket
    with pytest.raises(InvalidMessage):
        decode(bytes(PAD_BUCKET))  # all zeros: no padding marker


def test_invalid_payloads_cannot_be_built() -> None:
    mid = os.urandom(16)
    with pytest.raises(UsageError):
        Payload(PayloadType.TEXT, mid, 1)  # no text
    with pytest.raises(UsageError):
        Payload(PayloadType.TEXT, b"short", 1, text="hi")
    with pytest.raises(UsageError):
        Payload(PayloadType.RECEIPT, mid, 1, target_ids=(mid,))  # no kind
    with pytest.raises(UsageError):
        Payload(PayloadType.EDIT, mid, 1, text="x", target_ids=())
    with pytest.raises(UsageError):
        Payload(PayloadType.GROUP, mid, 1, group=GroupControl(GroupAction.RENAME, name="x"))
    with pytest.raises(UsageError):
        encode(Payload(PayloadType.TEXT, mid, 1, text="x" * MAX_PAYLOAD_BYTES))


def test_secrets_stay_out_of_repr() -> None:
    key = bytes(range(32))
    pointer = AttachmentPointer("ab" * 32, key, bytes(32), 10, "image/png", "cat.png")
    control = GroupControl(GroupAction.SENDER_KEY, distribution=b"\x33secret-chain")
    payload = Payload(PayloadType.TEXT, os.urandom(16), 1, text="the secret plan")
    assert key.hex() not in repr(pointer) and repr(key) not in repr(pointer)
    assert "secret-chain" not in repr(control)
    assert "secret plan" not in repr(payload)
