"""In-memory twin of the SQLite protocol store.

Invariant: behaves exactly like :class:`e2ee.store.sqlite.SQLiteProtocolStore`
(the conformance test in ``tests/store`` checks both), minus persistence and
encryption at rest. A commit validates everything first, then applies it under
one lock, so readers never see half of a commit. Every read takes the same
(re-entrant) lock, so while one thread holds a :meth:`~MemoryProtocolStore.batch`,
other threads wait for its end and never see its commits before they stand.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from e2ee.store.protocols import (
    AccountRecord,
    Address,
    Changes,
    IdentityRecord,
    SenderKeyId,
    SignedPreKeyRow,
)
from e2ee.store.rows import BatchDepth, validate_changes

__all__ = ["MemoryProtocolStore", "validate_changes"]

# Re-exported: the shared checks live in e2ee.store.rows.


class MemoryProtocolStore:
    """A :class:`~e2ee.store.protocols.ProtocolStore` held in dictionaries."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._batch = BatchDepth()
        self._account: AccountRecord | None = None
        self._prekeys: dict[int, bytes] = {}
        self._signed: dict[int, SignedPreKeyRow] = {}
        self._identities: dict[Address, IdentityRecord] = {}
        self._sessions: dict[Address, bytes] = {}
        self._sender_keys: dict[SenderKeyId, bytes] = {}
        self._meta: dict[str, str] = {}
        self._app: dict[str, dict[str, dict[str, Any]]] = {}
        self._app_columns: dict[str, list[str]] = {}

    def __repr__(self) -> str:
        return f"MemoryProtocolStore(sessions={len(self._sessions)}, prekeys={len(self._prekeys)})"

    def load_account(self) -> AccountRecord | None:
        with self._lock:
            return self._account

    def load_prekey(self, prekey_id: int) -> bytes | None:
        with self._lock:
            return self._prekeys.get(prekey_id)

    def prekey_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._prekeys)

    def load_signed_prekey(self, prekey_id: int) -> SignedPreKeyRow | None:
        with self._lock:
            return self._signed.get(prekey_id)

    def signed_prekeys(self) -> list[SignedPreKeyRow]:
        with self._lock:
            rows = list(self._signed.values())
        return sorted(rows, key=lambda r: (r.created_at_ms, r.prekey_id))

    def load_identity(self, address: Address) -> IdentityRecord | None:
        with self._lock:
            return self._identities.get(address)

    def identities(self, name: str) -> dict[Address, IdentityRecord]:
        with self._lock:
            return {a: r for a, r in self._identities.items() if a.name == name}

    def load_session(self, address: Address) -> bytes | None:
        with self._lock:
            return self._sessions.get(address)

    def session_devices(self, name: str) -> list[int]:
        with self._lock:
            return sorted(a.device_id for a in self._sessions if a.name == name)

    def load_sender_key(self, key_id: SenderKeyId) -> bytes | None:
        with self._lock:
            return self._sender_keys.get(key_id)

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            return self._meta.get(key)

    def load_app_row(self, table: str, row_id: str) -> Mapping[str, Any] | None:
        with self._lock:
            row = self._app.get(table, {}).get(row_id)
            if row is None:
                return None
            # Like SQLite: every column the table ever had, None where unset.
            return {column: row.get(column) for column in self._app_columns[table]}

    def load_app_rows(self, table: str, column: str, value: str | int) -> list[Mapping[str, Any]]:
        with self._lock:
            columns = self._app_columns.get(table, [])
            if column not in columns:
                return []
            found = [r for r in self._app.get(table, {}).values() if r.get(column) == value]
            return [{c: r.get(c) for c in columns} for r in sorted(found, key=lambda r: r["id"])]

    @property
    def in_batch(self) -> bool:
        """True inside :meth:`batch` (on the thread that holds it)."""
        return self._batch.depth > 0

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Group commits, as :meth:`SQLiteProtocolStore.batch`: all stand, or none.

        Commits inside the block are visible to reads inside it; if the block
        raises, the store returns to its state at the start of the block. Other
        threads wait until the block ends. Nested batches join the outer one.
        """
        with self._lock, self._batch.level():
            if self._batch.depth > 1:
                yield  # joins the outer batch
                return
            saved = self._snapshot()
            try:
                yield
            except BaseException:
                self._restore(saved)
                raise

    def _snapshot(self) -> tuple[Any, ...]:
        # Rows are replaced whole, never mutated, so copying the containers suffices.
        return (
            self._account,
            dict(self._prekeys),
            dict(self._signed),
            dict(self._identities),
            dict(self._sessions),
            dict(self._sender_keys),
            dict(self._meta),
            {table: dict(rows) for table, rows in self._app.items()},
            {table: list(columns) for table, columns in self._app_columns.items()},
        )

    def _restore(self, saved: tuple[Any, ...]) -> None:
        (
            self._account,
            self._prekeys,
            self._signed,
            self._identities,
            self._sessions,
            self._sender_keys,
            self._meta,
            self._app,
            self._app_columns,
        ) = saved

    def commit(self, changes: Changes) -> None:
        app_rows = validate_changes(changes)  # everything checked and copied first
        with self._lock:
            if changes.account is not None:
                self._account = changes.account
            # Most commits carry one or two parts; skip the empty ones cheaply.
            if changes.prekeys_put:
                self._prekeys.update(changes.prekeys_put)
            for pid in changes.prekeys_delete:
                self._prekeys.pop(pid, None)
            if changes.signed_prekeys_put:
                self._signed.update(changes.signed_prekeys_put)
            for sid in changes.signed_prekeys_delete:
                self._signed.pop(sid, None)
            if changes.identities_put:
                self._identities.update(changes.identities_put)
            if changes.sessions_put:
                self._sessions.update(changes.sessions_put)
            for addr in changes.sessions_delete:
                self._sessions.pop(addr, None)
            if changes.sender_keys_put:
                self._sender_keys.update(changes.sender_keys_put)
            for kid in changes.sender_keys_delete:
                self._sender_keys.pop(kid, None)
            if changes.meta_put:
                self._meta.update(changes.meta_put)
            for table, row in app_rows:
                columns = self._app_columns.setdefault(table, ["id"])
                columns.extend(c for c in row if c not in columns)
                self._app.setdefault(table, {})[row["id"]] = row
            for table, row_id in changes.app_rows_delete:
                self._app.get(table, {}).pop(row_id, None)
