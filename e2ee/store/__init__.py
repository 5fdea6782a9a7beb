"""Storage behind small typed interfaces: the contract, an in-memory twin, SQLite."""

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

__all__ = [
    "AccountRecord",
    "Address",
    "BatchingStore",
    "Changes",
    "IdentityRecord",
    "MemoryProtocolStore",
    "ProtocolStore",
    "SenderKeyId",
    "SignedPreKeyRow",
    "TrustLevel",
]
