"""The relay-body envelope: round trips and hostile input."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blindpost_wire.names import MAX_DEVICE_ID
from e2ee.envelope import (
    Entry,
    GroupEnvelope,
    PairwiseEnvelope,
    UnsupportedEnvelope,
    build_group,
    build_pairwise,
    parse,
)
from e2ee.errors import InvalidMessage, UsageError

users = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=3, max_size=32)
entries = st.builds(
    Entry,
    user=users,
    device=st.integers(min_value=1, max_value=MAX_DEVICE_ID),
    kind=st.sampled_from(["prekey", "message"]),
    body=st.binary(min_size=1, max_size=300),
)


@given(st.lists(entries, min_size=1, max_size=8))
def test_pairwise_round_trip(items: list[Entry]) -> None:
    env = parse(build_pairwise(items))
    assert isinstance(env, PairwiseEnvelope) and list(env.entries) == items
    first = items[0]
    found = env.entry_for(first.user, first.device)
    assert found is not None and found.user == first.user


@given(users, st.binary(min_size=1, max_size=500))
def test_group_round_trip(group_id: str, body: bytes) -> None:
    assert parse(build_group(group_id, body)) == GroupEnvelope(group_id, body)


@given(st.binary(max_size=600))
@settings(max_examples=500)
def test_random_bytes_raise_only_invalid_message(data: bytes) -> None:
    with contextlib.suppress(InvalidMessage):
        parse(data)


def test_truncation_trailing_bytes_and_versions_are_rejected() -> None:
    data = build_pairwise([Entry("bob", 1, "message", b"x" * 40)])
    with pytest.raises(InvalidMessage):
        parse(data[:-1])
    with pytest.raises(InvalidMessage):
        parse(data + b"\x00")
    with pytest.raises(UnsupportedEnvelope):
        parse(b"\x02" + data[1:])
    with pytest.raises(InvalidMessage):
        parse(b"\x01\x03" + data[2:])  # unknown kind
    with pytest.raises(UsageError):
        build_pairwise([])
    with pytest.raises(UsageError):
        build_group("", b"x")


def test_repr_hides_ciphertext() -> None:
    entry = Entry("bob", 1, "message", b"ciphertext-bytes")
    assert "ciphertext-bytes" not in repr(entry)
