"""In-memory twin of the SQLite protocol store.

Invariant: behaves exactly like :class:`e2ee.store.sqlite.SQLiteProtocolStore`
(the conformance test in ``tests/store`` checks both), minus persistence and
encryption at rest. A commit validates everything first, then applies it under
one lock, so readers never see half of a commit.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from e2ee.store.protocols import (
    AccountRecord,
    Address,
    Changes,
    IdentityRecord,
    SenderKeyId,
    SignedPreKeyRow,
)
from e2ee.store.rows import validate_changes

__all__ = ["MemoryProtocolStore", "validate_changes"]

# Re-exported: the shared checks live in e2ee.store.rows.


class MemoryProtocolStore:
    """A :class:`~e2ee.store.protocols.ProtocolStore` held in dictionaries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
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
        return self._account

    def load_prekey(self, prekey_id: int) -> bytes | None:
        return self._prekeys.get(prekey_id)

    def prekey_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._prekeys)

    def load_signed_prekey(self, prekey_id: int) -> SignedPreKeyRow | None:
        return self._signed.get(prekey_id)

    def signed_prekeys(self) -> list[SignedPreKeyRow]:
        with self._lock:
            rows = list(self._signed.values())
        return sorted(rows, key=lambda r: (r.created_at_ms, r.prekey_id))

    def load_identity(self, address: Address) -> IdentityRecord | None:
        return self._identities.get(address)

    def identities(self, name: str) -> dict[Address, IdentityRecord]:
        with self._lock:
            return {a: r for a, r in self._identities.items() if a.name == name}

    def load_session(self, address: Address) -> bytes | None:
        return self._sessions.get(address)

    def session_devices(self, name: str) -> list[int]:
        with self._lock:
            return sorted(a.device_id for a in self._sessions if a.name == name)

    def load_sender_key(self, key_id: SenderKeyId) -> bytes | None:
        return self._sender_keys.get(key_id)

    def get_meta(self, key: str) -> str | None:
        return self._meta.get(key)

    def load_app_row(self, table: str, row_id: str) -> Mapping[str, Any] | None:
        with self._lock:
            row = self._app.get(table, {}).get(row_id)
            if row is None:
                return None
            # Like SQLite: every column the table ever had, None where unset.
            return {column: row.get(column) for column in self._app_columns[table]}

    def commit(self, changes: Changes) -> None:
        app_rows = validate_changes(changes)  # everything checked and copied first
        with self._lock:
            if changes.account is not None:
                self._account = changes.account
            self._prekeys.update(changes.prekeys_put)
            for pid in changes.prekeys_delete:
                self._prekeys.pop(pid, None)
            self._signed.update(changes.signed_prekeys_put)
            for sid in changes.signed_prekeys_delete:
                self._signed.pop(sid, None)
            self._identities.update(changes.identities_put)
            self._sessions.update(changes.sessions_put)
            for addr in changes.sessions_delete:
                self._sessions.pop(addr, None)
            self._sender_keys.update(changes.sender_keys_put)
            for kid in changes.sender_keys_delete:
                self._sender_keys.pop(kid, None)
            self._meta.update(changes.meta_put)
            for table, row in app_rows:
                columns = self._app_columns.setdefault(table, ["id"])
                columns.extend(c for c in row if c not in columns)
                self._app.setdefault(table, {})[row["id"]] = row
            for table, row_id in changes.app_rows_delete:
                self._app.get(table, {}).pop(row_id, None)
