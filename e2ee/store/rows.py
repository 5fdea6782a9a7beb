"""Validation shared by every :class:`~e2ee.store.protocols.ProtocolStore` implementation.

Invariant: a :class:`~e2ee.store.protocols.Changes` value either passes
:func:`validate_changes` and then commits the same way in every implementation,
or is refused with :class:`~e2ee.errors.StorageError` before anything is written.
The rules are what SQLite can hold exactly (the strictest implementation), so
code tested against the in-memory twin cannot fail only on SQLite.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from e2ee.errors import StorageError
from e2ee.store.protocols import Changes, TrustLevel

__all__ = [
    "APP_NAME",
    "INT64_MAX",
    "INT64_MIN",
    "BatchDepth",
    "check_app_row",
    "validate_changes",
]

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
#: App table and column names: lower-case ASCII identifiers of at most 60 characters.
APP_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,59}")
_APP_VALUE_TYPES: Final = (type(None), int, float, str, bytes)
#: Names, and rows' column tuples, that matched APP_NAME: every row of every commit is
#: checked, and the regular expression per column was most of a history row's checking
#: cost. Only exact ``str`` names are remembered; both sets are bounded.
_NAMES_OK: set[str] = set()
_COLUMNS_OK: set[tuple[str, ...]] = set()
_REMEMBERED_MAX: Final = 4096


def _is_app_name(name: object) -> bool:
    """Whether ``name`` is a ``str`` matching :data:`APP_NAME` (remembered once it did)."""
    if type(name) is str and name in _NAMES_OK:
        return True
    if not isinstance(name, str) or not APP_NAME.fullmatch(name):
        return False
    if type(name) is str:
        if len(_NAMES_OK) >= _REMEMBERED_MAX:
            _NAMES_OK.clear()
        _NAMES_OK.add(name)
    return True


def _check_columns(table: str, columns: tuple[Any, ...]) -> None:
    if columns in _COLUMNS_OK:
        return
    for column in columns:
        if not _is_app_name(column):
            raise StorageError(f"app table {table!r}: a column name is a lower-case identifier")
    if all(type(column) is str for column in columns):
        if len(_COLUMNS_OK) >= _REMEMBERED_MAX:
            _COLUMNS_OK.clear()
        _COLUMNS_OK.add(columns)


def check_app_row(table: str, row: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Check one app row can be stored and read back exactly; return a plain copy.

    What SQLite holds exactly, and so what this accepts: table and column names
    that are lower-case ASCII identifiers (at most 60 characters); a ``str``
    ``id``; values that are None, ``int`` (64-bit), ``float`` (not NaN), ``str``
    or ``bytes``. ``bool``, containers and other objects are refused rather than
    converted. A row replaces the stored row with its id; the table's other
    columns read back as None.

    Args:
        table: the app table name (stored as ``app_<table>``).
        row: the row, with an ``id``.

    Returns:
        ``(table, row)`` with the row copied into a plain dict.

    Raises:
        StorageError: the row cannot be stored exactly.
    """
    if not _is_app_name(table):
        raise StorageError("an app table name is a lower-case ASCII identifier")
    try:
        copy = dict(row.items())
    except Exception as exc:  # a caller's Mapping may raise anything; keep it typed
        raise StorageError(f"app row for {table!r} cannot be read") from exc
    _check_columns(table, tuple(copy))
    for column, value in copy.items():
        if type(value) not in _APP_VALUE_TYPES:
            raise StorageError(
                f"app table {table!r}, column {column!r}: "
                f"{type(value).__name__} values are not stored"
            )
        if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
            raise StorageError(f"app table {table!r}, column {column!r}: int exceeds 64 bits")
        if type(value) is float and math.isnan(value):
            raise StorageError(f"app table {table!r}, column {column!r}: NaN is not stored")
    if not isinstance(copy.get("id"), str):
        raise StorageError(f"app row for {table!r} needs a str 'id'")
    return table, copy


def validate_changes(changes: Changes) -> list[tuple[str, dict[str, Any]]]:
    """Check a commit before anything is applied; return its app rows as plain dicts.

    Raises:
        StorageError: an unknown trust level, an app row that cannot be stored
            exactly, or a malformed app row deletion.
    """
    for record in changes.identities_put.values():
        if record.trust not in TrustLevel.ALL:
            raise StorageError(f"unknown trust level {record.trust!r}")
    for table, row_id in changes.app_rows_delete:
        if not isinstance(table, str) or not APP_NAME.fullmatch(table):
            raise StorageError("an app table name is a lower-case ASCII identifier")
        if not isinstance(row_id, str):
            raise StorageError(f"app row deletion in {table!r} needs a str id")
    return [check_app_row(table, row) for table, row in changes.app_rows]


@dataclass(slots=True)
class BatchDepth:
    """How deep the lock holder is in a store's ``batch()`` blocks (0: in none).

    Shared by the store implementations: an inner block joins the outer one, so
    only the outermost block begins and ends the batch. Compares by value, so two
    idle stores compare alike (tests compare store internals).
    """

    depth: int = 0

    @contextlib.contextmanager
    def level(self) -> Iterator[None]:
        """One more level for the duration of the block."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
