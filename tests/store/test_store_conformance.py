"""One storage contract, every implementation: memory and SQLite behave the same.

Each test takes the ``store`` fixture and runs once per implementation. The
Hypothesis state machine at the end applies the same random commits to both and
compares every read after each step, including across SQLite close/reopen.

The generated values stay inside what both implementations hold exactly (see
``e2ee.store.sqlite.check_app_row`` for app rows); rows of one app table carry
the same columns, since SQLite reads columns a row left out as None.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from e2ee.errors import StorageError
from e2ee.store.memory import MemoryProtocolStore
from e2ee.store.protocols import (
    AccountRecord,
    Address,
    BatchingStore,
    Changes,
    IdentityRecord,
    ProtocolStore,
    SenderKeyId,
    SignedPreKeyRow,
    TrustLevel,
)
from e2ee.store.sealing import KDF_MINIMUM
from e2ee.store.sqlite import SQLiteProtocolStore

ALICE = Address("alice", 1)
BOB1, BOB2, BOB7 = Address("bob", 1), Address("bob", 2), Address("bob", 7)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BatchingStore]:
    if request.param == "memory":
        yield MemoryProtocolStore()
        return
    opened = SQLiteProtocolStore.open(tmp_path / "store.db", "conformance", kdf_limits=KDF_MINIMUM)
    try:
        yield opened
    finally:
        opened.close()


def commit(store: ProtocolStore, **fields: Any) -> None:
    store.commit(Changes(**fields))


# -- a universe of keys small enough to read completely ----------------------------------

NAMES = ("alice", "bob", "Bob", "bobby", "", "ünï ☃", "a\x00b")
DEVICES = (0, 1, 2, -1, 2**31 - 1)
PREKEY_IDS = (0, 1, 2, 3, 0xFFFFFE, -5, 2**63 - 1)
GROUPS = ("g1", "g2", "")
META_KEYS = ("k", "K", "next_prekey_id", "")
APP_TABLES: dict[str, tuple[str, ...]] = {
    "messages": ("body", "sent_at_ms", "raw"),
    "threads": ("title",),
}
APP_IDS = ("1", "2", "x")
ADDRESSES = tuple(Address(n, d) for n in NAMES for d in DEVICES)
SENDER_KEYS = tuple(SenderKeyId(g, a) for g in GROUPS for a in ADDRESSES)


def exact(row: Mapping[str, Any] | None) -> object:
    """An app row as a value that tells 1 from 1.0 from True and 0.0 from -0.0."""
    if row is None:
        return None
    return sorted((k, type(v).__name__, repr(v)) for k, v in row.items())


def read_all(store: ProtocolStore) -> dict[str, object]:
    """Every read the contract offers, over the whole universe."""
    return {
        "account": store.load_account(),
        "prekey_ids": store.prekey_ids(),
        "prekeys": [store.load_prekey(i) for i in PREKEY_IDS],
        "signed_prekeys": store.signed_prekeys(),
        "signed": [store.load_signed_prekey(i) for i in PREKEY_IDS],
        "identity": [store.load_identity(a) for a in ADDRESSES],
        "identities": [store.identities(n) for n in NAMES],
        "sessions": [store.load_session(a) for a in ADDRESSES],
        "session_devices": [store.session_devices(n) for n in NAMES],
        "sender_keys": [store.load_sender_key(k) for k in SENDER_KEYS],
        "meta": [store.get_meta(k) for k in META_KEYS],
        "app": [exact(store.load_app_row(t, i)) for t in APP_TABLES for i in APP_IDS],
    }


# -- the contract, method by method ------------------------------------------------------


def test_implements_the_protocol(store: ProtocolStore) -> None:
    assert isinstance(store, BatchingStore)
    assert isinstance(store, ProtocolStore)


def test_a_new_store_is_empty(store: ProtocolStore) -> None:
    assert store.load_account() is None
    assert store.prekey_ids() == []
    assert store.load_prekey(1) is None
    assert store.signed_prekeys() == []
    assert store.load_signed_prekey(1) is None
    assert store.load_identity(ALICE) is None
    assert store.identities("alice") == {}
    assert store.load_session(ALICE) is None
    assert store.session_devices("alice") == []
    assert store.load_sender_key(SenderKeyId("g", ALICE)) is None
    assert store.get_meta("k") is None
    assert store.load_app_row("messages", "1") is None


def test_account_round_trips_and_is_replaced(store: ProtocolStore) -> None:
    first = AccountRecord("me", 3, 12345, bytes(range(256)) * 2, 1_700_000_000_000)
    commit(store, account=first)
    assert store.load_account() == first
    second = replace(first, registration_id=1, identity_key_pair=b"\x00other")
    commit(store, account=second)
    loaded = store.load_account()
    assert loaded == second
    assert loaded is not None and loaded.identity_key_pair == b"\x00other"


@pytest.mark.parametrize(
    "blob", [b"", b"\x00", bytes(range(256)), b"\xff" * 65536], ids=["empty", "nul", "all", "64k"]
)
def test_secret_blobs_round_trip_byte_for_byte(store: ProtocolStore, blob: bytes) -> None:
    key = SenderKeyId("g", BOB1)
    commit(
        store,
        prekeys_put={1: blob},
        signed_prekeys_put={2: SignedPreKeyRow(2, blob, 5)},
        sessions_put={BOB1: blob},
        sender_keys_put={key: blob},
        account=AccountRecord("me", 1, 1, blob, 0),
    )
    assert store.load_prekey(1) == blob
    signed = store.load_signed_prekey(2)
    assert signed is not None and signed.record == blob
    assert store.load_session(BOB1) == blob
    assert store.load_sender_key(key) == blob
    account = store.load_account()
    assert account is not None and account.identity_key_pair == blob


def test_prekeys_are_listed_ascending_and_deleted(store: ProtocolStore) -> None:
    commit(store, prekeys_put={0xFFFFFE: b"c", 7: b"b", 2: b"a", -3: b"n"})
    assert store.prekey_ids() == [-3, 2, 7, 0xFFFFFE]
    commit(store, prekeys_delete=frozenset({7, 99}))  # an unknown id is no error
    assert store.prekey_ids() == [-3, 2, 0xFFFFFE]
    assert store.load_prekey(7) is None
    assert store.load_prekey(2) == b"a"


def test_put_then_delete_in_one_commit_ends_deleted(store: ProtocolStore) -> None:
    commit(
        store,
        prekeys_put={1: b"p"},
        prekeys_delete=frozenset({1}),
        signed_prekeys_put={1: SignedPreKeyRow(1, b"s", 0)},
        signed_prekeys_delete=frozenset({1}),
        sessions_put={BOB1: b"s"},
        sessions_delete=frozenset({BOB1}),
        sender_keys_put={SenderKeyId("g", BOB1): b"k"},
        sender_keys_delete=frozenset({SenderKeyId("g", BOB1)}),
    )
    assert store.prekey_ids() == []
    assert store.signed_prekeys() == []
    assert store.load_session(BOB1) is None
    assert store.load_sender_key(SenderKeyId("g", BOB1)) is None


def test_signed_prekeys_are_oldest_first_then_by_id(store: ProtocolStore) -> None:
    rows = {
        5: SignedPreKeyRow(5, b"five", 200),
        9: SignedPreKeyRow(9, b"nine", 100),
        3: SignedPreKeyRow(3, b"three", 200),
        1: SignedPreKeyRow(1, b"one", 300),
    }
    commit(store, signed_prekeys_put=rows)
    assert store.signed_prekeys() == [rows[9], rows[3], rows[5], rows[1]]
    assert store.load_signed_prekey(3) == rows[3]
    commit(store, signed_prekeys_delete=frozenset({3}))
    assert [r.prekey_id for r in store.signed_prekeys()] == [9, 5, 1]
    assert store.load_signed_prekey(3) is None


def test_identities_are_per_name_and_updated(store: ProtocolStore) -> None:
    key = bytes([5]) + bytes(range(32))
    commit(
        store,
        identities_put={
            BOB1: IdentityRecord(key, TrustLevel.TOFU, 1),
            BOB2: IdentityRecord(key[::-1], TrustLevel.VERIFIED, 2),
            Address("bobby", 1): IdentityRecord(key, TrustLevel.UNTRUSTED, 3),
            Address("Bob", 1): IdentityRecord(key, TrustLevel.TOFU, 4),
        },
    )
    assert store.identities("bob") == {
        BOB1: IdentityRecord(key, TrustLevel.TOFU, 1),
        BOB2: IdentityRecord(key[::-1], TrustLevel.VERIFIED, 2),
    }
    assert store.identities("nobody") == {}
    commit(store, identities_put={BOB1: IdentityRecord(key, TrustLevel.VERIFIED, 9)})
    assert store.load_identity(BOB1) == IdentityRecord(key, TrustLevel.VERIFIED, 9)
    assert store.load_identity(Address("Bob", 1)) == IdentityRecord(key, TrustLevel.TOFU, 4)


def test_session_devices_are_per_name_and_ascending(store: ProtocolStore) -> None:
    commit(
        store,
        sessions_put={BOB7: b"7", BOB1: b"1", BOB2: b"2", Address("bobby", 3): b"x", ALICE: b"a"},
    )
    assert store.session_devices("bob") == [1, 2, 7]
    assert store.session_devices("bobby") == [3]
    assert store.session_devices("bo") == []
    commit(store, sessions_delete=frozenset({BOB2}))
    assert store.session_devices("bob") == [1, 7]
    assert store.load_session(BOB7) == b"7"


def test_sender_keys_are_keyed_by_group_and_sender(store: ProtocolStore) -> None:
    keys = {
        SenderKeyId("g", BOB1): b"g-bob1",
        SenderKeyId("g", BOB2): b"g-bob2",
        SenderKeyId("h", BOB1): b"h-bob1",
    }
    commit(store, sender_keys_put=keys)
    for key_id, record in keys.items():
        assert store.load_sender_key(key_id) == record
    commit(store, sender_keys_delete=frozenset({SenderKeyId("g", BOB1)}))
    assert store.load_sender_key(SenderKeyId("g", BOB1)) is None
    assert store.load_sender_key(SenderKeyId("h", BOB1)) == b"h-bob1"


def test_meta_round_trips_and_overwrites(store: ProtocolStore) -> None:
    commit(store, meta_put={"next_prekey_id": "17", "ünï": "☃", "K": "upper"})
    commit(store, meta_put={"next_prekey_id": "18"})
    assert store.get_meta("next_prekey_id") == "18"
    assert store.get_meta("ünï") == "☃"
    assert store.get_meta("K") == "upper"
    assert store.get_meta("k") is None


def test_app_rows_round_trip_and_are_replaced_in_order(store: ProtocolStore) -> None:
    row = {"id": "m1", "body": "007", "sent_at_ms": 2**62, "raw": b"\x00\xff", "score": -0.0}
    commit(store, app_rows=(("messages", row), ("threads", {"id": "m1", "title": "t"})))
    assert exact(store.load_app_row("messages", "m1")) == exact(row)
    assert exact(store.load_app_row("threads", "m1")) == exact({"id": "m1", "title": "t"})
    later = {"id": "m1", "body": "edited", "sent_at_ms": None, "raw": b"", "score": 1.5}
    last = {**later, "body": "last"}
    commit(store, app_rows=(("messages", later), ("messages", last)))
    assert exact(store.load_app_row("messages", "m1")) == exact(last)
    assert store.load_app_row("messages", "m2") is None
    assert store.load_app_row("nothing", "m1") is None


def test_many_app_rows_in_one_commit_land_as_if_written_one_by_one(store: ProtocolStore) -> None:
    """Hundreds of rows of two tables, columns appearing midway, ids repeated near and far
    (a later row replaces the earlier one and clears the columns it leaves out)."""
    pick = random.Random(7)
    rows: list[tuple[str, dict[str, object]]] = []
    last: dict[str, dict[str, object]] = {}
    for i in range(400):
        rows.append(("outbox", {"id": f"o{i}", "seq": i}))
        row: dict[str, object] = {"id": f"m{pick.randrange(120)}", "text": f"t{i}"}
        if i >= 100:
            row["status"] = "sent" if i % 2 else None
        if i == 150:
            row["late"] = b"\x01"
        rows.append(("messages", row))
        last[str(row["id"])] = row
    commit(store, app_rows=tuple(rows))
    for row_id, row in last.items():
        found = store.load_app_row("messages", row_id)
        assert found is not None
        columns = ("id", "text", "status", "late")
        assert [found.get(c) for c in columns] == [row.get(c) for c in columns], row_id
    assert exact(store.load_app_row("outbox", "o399")) == exact({"id": "o399", "seq": 399})


def test_app_rows_are_found_by_a_column_value(store: ProtocolStore) -> None:
    rows = (
        ("members", {"id": "g:b", "group_id": "g", "role": "admin"}),
        ("members", {"id": "g:a", "group_id": "g", "role": "member"}),
        ("members", {"id": "h:a", "group_id": "h", "role": "member"}),
    )
    commit(store, app_rows=rows)
    found = store.load_app_rows("members", "group_id", "g")
    assert [exact(r) for r in found] == [exact(rows[1][1]), exact(rows[0][1])]  # by id
    assert store.load_app_rows("members", "group_id", "x") == []
    assert store.load_app_rows("members", "no_such_column", "g") == []
    assert store.load_app_rows("nothing", "group_id", "g") == []
    if isinstance(store, BatchingStore):
        with store.batch():
            commit(store, app_rows=(("members", {"id": "g:c", "group_id": "g", "role": "x"}),))
            inside = store.load_app_rows("members", "group_id", "g")
            assert [r["id"] for r in inside] == ["g:a", "g:b", "g:c"]  # the batch's own rows


def test_app_rows_read_back_as_copies(store: ProtocolStore) -> None:
    commit(store, app_rows=(("threads", {"id": "t", "title": "a"}),))
    loaded = store.load_app_row("threads", "t")
    if isinstance(loaded, MutableMapping):
        loaded["title"] = "changed"
    assert exact(store.load_app_row("threads", "t")) == exact({"id": "t", "title": "a"})


def test_an_empty_commit_changes_nothing(store: ProtocolStore) -> None:
    commit(store, meta_put={"k": "v"})
    before = read_all(store)
    store.commit(Changes())
    assert read_all(store) == before


# -- atomicity -------------------------------------------------------------------------------


def everything() -> Changes:
    """A commit that touches every kind of record."""
    return Changes(
        account=AccountRecord("me", 1, 2, b"pair", 3),
        prekeys_put={1: b"p1", 2: b"p2"},
        signed_prekeys_put={1: SignedPreKeyRow(1, b"s1", 1)},
        identities_put={BOB1: IdentityRecord(b"\x05" * 33)},
        sessions_put={BOB1: b"session"},
        sender_keys_put={SenderKeyId("g", BOB1): b"sender"},
        meta_put={"k": "v"},
        app_rows=(("messages", {"id": "1", "body": "hi", "sent_at_ms": 1, "raw": None}),),
    )


def overwrite_everything() -> Changes:
    return Changes(
        account=AccountRecord("me", 1, 2, b"pair2", 3),
        prekeys_put={3: b"p3"},
        prekeys_delete=frozenset({1}),
        signed_prekeys_delete=frozenset({1}),
        identities_put={BOB2: IdentityRecord(b"\x05" * 33)},
        sessions_put={BOB1: b"session2"},
        sender_keys_delete=frozenset({SenderKeyId("g", BOB1)}),
        meta_put={"k": "v2"},
        app_rows=(("messages", {"id": "1", "body": "bye", "sent_at_ms": 2, "raw": b""}),),
    )


@pytest.mark.parametrize(
    "spoil",
    [
        lambda c: replace(c, identities_put={BOB7: IdentityRecord(b"k", trust="maybe")}),
        lambda c: replace(c, app_rows=(*c.app_rows, ("messages", {"body": "no id"}))),
        lambda c: replace(c, app_rows=(*c.app_rows, ("no such-table", {"id": "1"}))),
    ],
    ids=["unknown-trust", "app-row-without-id", "bad-table-name"],
)
def test_a_commit_failing_validation_changes_nothing(
    store: ProtocolStore, spoil: Callable[[Changes], Changes]
) -> None:
    store.commit(everything())
    before = read_all(store)
    with pytest.raises(StorageError):
        store.commit(spoil(overwrite_everything()))
    assert read_all(store) == before


class _Unprintable:
    """An app-row id whose ``str()`` fails: a value no store may half-apply."""

    def __str__(self) -> str:
        raise ValueError("no text for this id")


def fails_while_applied() -> Changes:
    """:func:`overwrite_everything` plus an app row no store can write."""
    return replace(
        overwrite_everything(),
        app_rows=(*overwrite_everything().app_rows, ("messages", {"id": _Unprintable()})),
    )


def test_a_commit_failing_while_applied_changes_nothing(store: ProtocolStore) -> None:
    store.commit(everything())
    before = read_all(store)
    with pytest.raises(StorageError):
        store.commit(fails_while_applied())
    assert read_all(store) == before


def test_concurrent_commits_and_reads_from_threads(store: ProtocolStore) -> None:
    def work(n: int) -> None:
        address = Address(f"peer{n}", n)
        for i in range(30):
            store.commit(
                Changes(
                    sessions_put={address: i.to_bytes(2, "big") * 100},
                    meta_put={f"count{n}": str(i)},
                    app_rows=(("threads", {"id": f"{n}-{i}", "title": str(i)}),),
                )
            )
            assert store.load_session(address) == i.to_bytes(2, "big") * 100
            assert store.session_devices(f"peer{n}") == [n]

    with ThreadPoolExecutor(max_workers=6) as pool:
        for done in [pool.submit(work, n) for n in range(6)]:
            done.result()  # re-raises a worker's failure here
    for n in range(6):
        assert store.get_meta(f"count{n}") == "29"
        assert exact(store.load_app_row("threads", f"{n}-29")) == exact(
            {"id": f"{n}-29", "title": "29"}
        )


# -- group commit (batch) ---------------------------------------------------------------------


def test_commits_in_a_batch_are_read_inside_it_and_all_stand_after(store: BatchingStore) -> None:
    store.commit(everything())
    assert not store.in_batch
    with store.batch():
        assert store.in_batch
        commit(
            store, sessions_put={BOB1: b"s1"}, app_rows=(("threads", {"id": "t", "title": "a"}),)
        )
        assert store.load_session(BOB1) == b"s1"  # the batch reads its own commits
        commit(store, sessions_put={BOB1: b"s2"}, prekeys_delete=frozenset({1}))
        with store.batch():  # a nested batch joins the outer one
            commit(store, meta_put={"k": "nested"})
        assert store.load_session(BOB1) == b"s2"
    assert not store.in_batch
    assert store.load_session(BOB1) == b"s2"
    assert store.prekey_ids() == [2]
    assert store.get_meta("k") == "nested"
    assert exact(store.load_app_row("threads", "t")) == exact({"id": "t", "title": "a"})


def test_a_batch_that_raises_leaves_none_of_its_commits(store: BatchingStore) -> None:
    store.commit(everything())
    before = read_all(store)
    with pytest.raises(RuntimeError), store.batch():
        store.commit(overwrite_everything())
        commit(store, app_rows=(("threads", {"id": "t", "title": "new table"}),))
        assert store.load_app_row("threads", "t") is not None
        raise RuntimeError("the caller failed after two commits")
    assert read_all(store) == before
    assert store.load_app_row("threads", "t") is None
    # The store is usable again, and a new column of a rolled-back batch is gone.
    commit(store, app_rows=(("messages", {"id": "2", "body": "x", "sent_at_ms": 1, "raw": None}),))
    assert store.load_app_row("messages", "2") is not None


def test_a_failing_commit_inside_a_batch_is_undone_alone(store: BatchingStore) -> None:
    store.commit(everything())
    with store.batch():
        commit(store, meta_put={"k": "kept"})
        before = read_all(store)
        with pytest.raises(StorageError):
            store.commit(fails_while_applied())
        assert read_all(store) == before
        commit(store, sessions_put={BOB2: b"after"})
    assert store.get_meta("k") == "kept"
    assert store.load_session(BOB2) == b"after"
    assert store.load_session(BOB1) == b"session"  # the failed commit left nothing


def test_other_threads_wait_for_a_batch_and_keep_their_commits(store: BatchingStore) -> None:
    import threading

    seen: list[bytes | None] = []

    def other() -> None:
        seen.append(store.load_session(BOB1))  # never the batch's uncommitted state
        commit(store, meta_put={"other": "yes"})

    thread = threading.Thread(target=other)
    with pytest.raises(RuntimeError), store.batch():
        commit(store, sessions_put={BOB1: b"uncommitted"})
        thread.start()
        thread.join(0.2)
        assert thread.is_alive()  # blocked until the batch ends
        raise RuntimeError("roll the batch back")
    thread.join(10)
    assert not thread.is_alive()
    assert seen == [None]
    assert store.get_meta("other") == "yes"  # not rolled back with the batch
    assert store.load_session(BOB1) is None


# -- model-based: memory and SQLite agree on every read, step after step ----------------------

names = st.sampled_from(NAMES)
devices = st.sampled_from(DEVICES)
addresses = st.builds(Address, names, devices)
prekey_ids = st.sampled_from(PREKEY_IDS)
blobs = st.binary(max_size=48)
timestamps = st.sampled_from((0, 1, 1, 5, -(2**63), 2**63 - 1))
sender_key_ids = st.builds(SenderKeyId, st.sampled_from(GROUPS), addresses)
app_values = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
)


@st.composite
def app_rows(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    table = draw(st.sampled_from(sorted(APP_TABLES)))
    row: dict[str, Any] = {"id": draw(st.sampled_from(APP_IDS))}
    row.update({column: draw(app_values) for column in APP_TABLES[table]})
    return table, row


@st.composite
def signed_prekeys(draw: st.DrawFn) -> dict[int, SignedPreKeyRow]:
    ids = draw(st.lists(prekey_ids, max_size=2, unique=True))
    return {i: SignedPreKeyRow(i, draw(blobs), draw(timestamps)) for i in ids}


changes = st.builds(
    Changes,
    account=st.none()
    | st.builds(
        AccountRecord,
        names,
        devices,
        st.integers(0, 2**31 - 1),
        blobs,
        timestamps,
    ),
    prekeys_put=st.dictionaries(prekey_ids, blobs, max_size=3),
    prekeys_delete=st.frozensets(prekey_ids, max_size=2),
    signed_prekeys_put=signed_prekeys(),
    signed_prekeys_delete=st.frozensets(prekey_ids, max_size=2),
    identities_put=st.dictionaries(
        addresses,
        st.builds(
            IdentityRecord,
            st.binary(min_size=33, max_size=33),
            st.sampled_from(sorted(TrustLevel.ALL)),
            timestamps,
        ),
        max_size=2,
    ),
    sessions_put=st.dictionaries(addresses, blobs, max_size=3),
    sessions_delete=st.frozensets(addresses, max_size=2),
    sender_keys_put=st.dictionaries(sender_key_ids, blobs, max_size=2),
    sender_keys_delete=st.frozensets(sender_key_ids, max_size=2),
    meta_put=st.dictionaries(st.sampled_from(META_KEYS), st.text(max_size=8), max_size=2),
    app_rows=st.lists(app_rows(), max_size=3).map(tuple),
)

spoilers = st.sampled_from(
    [
        lambda c: replace(c, identities_put={ALICE: IdentityRecord(b"k", trust="")}),
        lambda c: replace(c, app_rows=(*c.app_rows, ("threads", {"title": "no id"}))),
    ]
)


class _Abort(Exception):
    """Raised inside a batch to roll it back."""


class MemoryVersusSQLite(RuleBasedStateMachine):
    """The in-memory twin is the model; the SQLite store must read exactly the same."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="store-conformance-"))
        self.path = self.dir / "model.db"
        self.memory = MemoryProtocolStore()
        self.sqlite = SQLiteProtocolStore.open(self.path, "model", kdf_limits=KDF_MINIMUM)

    @rule(change=changes)
    def commit_both(self, change: Changes) -> None:
        self.memory.commit(change)
        self.sqlite.commit(change)

    @rule(change=changes, spoil=spoilers)
    def commit_invalid(self, change: Changes, spoil: Callable[[Changes], Changes]) -> None:
        before = read_all(self.sqlite)
        for store in (self.memory, self.sqlite):
            with pytest.raises(StorageError):
                store.commit(spoil(change))
        assert read_all(self.sqlite) == before

    @rule(batch=st.lists(changes, min_size=1, max_size=3), fail=st.booleans())
    def batch_both(self, batch: list[Changes], fail: bool) -> None:
        with contextlib.suppress(_Abort), self.memory.batch(), self.sqlite.batch():
            for change in batch:
                self.memory.commit(change)
                self.sqlite.commit(change)
                # Reads inside the batch see its commits, the same way in both.
                assert read_all(self.sqlite) == read_all(self.memory)
            if fail:
                raise _Abort

    @rule()
    def reopen(self) -> None:
        self.sqlite.close()
        self.sqlite = SQLiteProtocolStore.open(self.path, "model")

    @invariant()
    def same_reads(self) -> None:
        assert read_all(self.sqlite) == read_all(self.memory)

    def teardown(self) -> None:
        self.sqlite.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestMemoryVersusSQLite = MemoryVersusSQLite.TestCase
TestMemoryVersusSQLite.settings = settings(
    max_examples=40,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_exact_tells_floats_and_ints_apart() -> None:
    # The comparison the model test relies on must not hide a type change.
    assert exact({"v": 1}) != exact({"v": 1.0})
    assert exact({"v": 0.0}) != exact({"v": -0.0})
    assert exact({"v": math.inf}) == exact({"v": math.inf})


def test_app_rows_can_be_deleted_with_the_rest_of_a_commit(store: ProtocolStore) -> None:
    store.commit(
        Changes(
            app_rows=(
                ("messages", {"id": "m1", "text": "hi"}),
                ("messages", {"id": "m2", "text": "there"}),
            )
        )
    )
    store.commit(Changes(app_rows_delete=frozenset({("messages", "m1"), ("nothing", "x")})))
    assert store.load_app_row("messages", "m1") is None
    assert store.load_app_row("messages", "m2") == {"id": "m2", "text": "there"}
    with pytest.raises(StorageError):
        store.commit(Changes(app_rows_delete=frozenset({("Bad-Name", "m2")})))
    assert store.load_app_row("messages", "m2") is not None
